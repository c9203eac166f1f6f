"""Phi-4-Multimodal's speech features in pure torch: 16 kHz clips to 80 log-Mel bins.

    feats = log_mel(clip)                 # [frames, 80] for a 1-D float clip in [-1, 1]
    batch = extract_features([c1, c2])    # the feature extractor's outputs (padded batch)

Per 25 ms frame (400 samples, hop 160, edges snipped): pre-emphasis 0.97 within the frame,
samples scaled to the int16 range, a symmetric Hamming window, a 512-point power spectrum, 80
triangular filters on the Kaldi/HTK mel scale from 0 to 7690 Hz (unnormalised) and
log(max(x, 1)). No dither, no DC removal. Needs only torch (no megatron).

`lhotse_log_mel` computes the same features with lhotse's Kaldi-compatible `Fbank`, configured
from the constants below (`lhotse_fbank_config`), for features precomputed into a corpus; the
tests hold both to transformers' extractor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

SAMPLE_RATE = 16000
WIN = 400
HOP = 160
N_FFT = 512
MEL_BINS = 80
MEL_LOW_HZ = 0.0
MEL_HIGH_HZ = 7690.0
PREEMPHASIS = 0.97
INT16_SCALE = 32768.0
TIME_REDUCTION = 8


def num_frames(num_samples: int) -> int:
    """Feature frames of a clip: (n - 400) // 160 + 1, none for clips shorter than a window."""
    return max(0, (num_samples - WIN) // HOP + 1)


def num_audio_tokens(num_samples: int, time_reduction: int = TIME_REDUCTION) -> int:
    """Placeholder tokens of a 16 kHz clip of num_samples: ceil(frames / 8)."""
    return math.ceil(num_frames(num_samples) / time_reduction)


def _kaldi_mel(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(hz / 700.0)


@functools.lru_cache(maxsize=4)
def mel_filters(num_bins: int = MEL_BINS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                low_hz: float = MEL_LOW_HZ, high_hz: float = MEL_HIGH_HZ) -> torch.Tensor:
    """[n_fft // 2 + 1, num_bins] float32: triangles in mel space, peak 1, no area norm."""
    fft_mel = _kaldi_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64)
                         * (sample_rate / n_fft))
    edges = torch.linspace(float(_kaldi_mel(torch.tensor(low_hz, dtype=torch.float64))),
                           float(_kaldi_mel(torch.tensor(high_hz, dtype=torch.float64))),
                           num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rise = (fft_mel[:, None] - left) / (centre - left)
    fall = (right - fft_mel[:, None]) / (right - centre)
    return torch.clamp(torch.minimum(rise, fall), min=0.0).to(torch.float32)


def _frames_to_log_mel(frames: torch.Tensor) -> torch.Tensor:
    """[..., n, 400] float32 frames -> [..., n, 80] log-Mel."""
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0], as Kaldi
    frames = (frames - PREEMPHASIS * prev) * INT16_SCALE
    window = torch.hamming_window(WIN, periodic=False, dtype=torch.float64, device=frames.device)
    spec = torch.fft.rfft(window * frames, n=N_FFT, dim=-1).to(torch.complex64)
    power = spec.abs() ** 2
    mel = power @ mel_filters().to(frames.device)
    return torch.log(torch.clamp(mel, min=1.0))


def lhotse_fbank_config():
    """The `FbankConfig` of lhotse that equals these features (its defaults do not: povey window,
    DC removal, 20 Hz low edge, no edge snipping). Apply it to samples scaled to the int16
    range, then clamp at 0 (lhotse has no log-floor setting)."""
    from lhotse import FbankConfig

    return FbankConfig(
        sampling_rate=SAMPLE_RATE, frame_length=WIN / SAMPLE_RATE, frame_shift=HOP / SAMPLE_RATE,
        remove_dc_offset=False, preemph_coeff=PREEMPHASIS, window_type="hamming", dither=0.0,
        snip_edges=True, low_freq=MEL_LOW_HZ, high_freq=MEL_HIGH_HZ, num_filters=MEL_BINS,
        torchaudio_compatible_mel_scale=True)


@functools.lru_cache(maxsize=1)
def _lhotse_fbank():
    import warnings

    from lhotse import Fbank

    with warnings.catch_warnings():  # "snip_edges=True" is what Phi-4 does; lhotse warns
        warnings.simplefilter("ignore", UserWarning)
        return Fbank(lhotse_fbank_config())


def lhotse_log_mel(clip: Any):
    """[frames, 80] float32 numpy features of one mono 16 kHz clip, through lhotse."""
    import warnings

    import numpy as np

    x = np.asarray(clip, dtype=np.float32)
    if x.ndim != 1 or x.size < WIN:
        raise ValueError(f"expected a mono clip of at least {WIN} samples, got shape {x.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        feats = _lhotse_fbank().extract(x * INT16_SCALE, SAMPLE_RATE)
    return np.maximum(np.asarray(feats, dtype=np.float32), 0.0)  # log(max(x, 1))


def log_mel(clip: Any) -> torch.Tensor:
    """[frames, 80] float32 features of one mono 16 kHz clip (1-D samples in [-1, 1])."""
    x = torch.as_tensor(clip).to(torch.float32)
    if x.dim() != 1:
        raise ValueError(f"expected a mono clip [samples], got shape {tuple(x.shape)}")
    if x.numel() < WIN:
        raise ValueError(f"a clip needs at least {WIN} samples (25 ms at 16 kHz), got "
                         f"{x.numel()}")
    return _frames_to_log_mel(x.unfold(0, WIN, HOP))


def extract_features(clips: Sequence[Any], sampling_rate: int = SAMPLE_RATE
                     ) -> dict[str, torch.Tensor]:
    """A batch as the feature extractor returns it: `audio_input_features` [B, T, 80] (the
    frames past a shorter clip's end are 0), `audio_embed_sizes` [B] (tokens per clip) and
    `audio_attention_mask` [B, T] (True on real frames)."""
    if sampling_rate != SAMPLE_RATE:
        raise ValueError(f"speech must be sampled at {SAMPLE_RATE} Hz, got {sampling_rate} Hz; "
                         "resample it first")
    if not clips:
        raise ValueError("extract_features needs at least one clip")
    return pad_features([log_mel(c) for c in clips])


def pad_features(feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-clip [frames, 80] features (computed here or precomputed into a corpus) as the
    batch `extract_features` returns."""
    if not feats:
        raise ValueError("pad_features needs at least one clip")
    longest = max(f.shape[0] for f in feats)
    out = torch.zeros(len(feats), longest, MEL_BINS)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    lengths = torch.tensor([f.shape[0] for f in feats])
    return {
        "audio_input_features": out,
        "audio_embed_sizes": (lengths + TIME_REDUCTION - 1) // TIME_REDUCTION,
        "audio_attention_mask": torch.arange(longest)[None, :] < lengths[:, None],
    }
