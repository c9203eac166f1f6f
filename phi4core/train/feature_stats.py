"""A fresh audio encoder's feature normalisation, fitted on the stage's own training clips.

The released encoder carries the global mean and inverse std of its log-Mel features, computed
over its training corpus. An encoder that starts from random weights has only the identity
(mean 0, inverse std 1), and log-Mel features (mean ~16, std ~3 on the demo's speech) then reach
its conformer as a constant plus a little content, from which a tower learns nothing in a short
stage (docs/media_learning_investigation.md). Such a stage fits the statistics on the clips of
its first training samples before it trains: every rank reads the same samples, so all compute
the same values. Statistics that were loaded are never touched.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("phi4core.train")

MAX_CLIPS = 64  # enough for 80 per-bin means and stds of thousands of frames
MAX_SCAN = 1024  # samples looked at for clips (a mixture may hold few audio samples)


def carries_audio(sources) -> bool:
    """Whether any of a stage's data sources holds clips (a lhotse corpus, synthetic audio)."""
    from phi4core.data.multimodal import media_modality

    return any(s.kind == "lhotse"
               or (s.kind == "synthetic" and "audio" in media_modality(s.modality or ""))
               for s in sources)


def fit_fresh_feature_norms(chunks, samples, sources=None) -> int:
    """Fit every identity MeanVarianceNorm of `chunks` on the clips of `samples` (an indexed
    sample set whose items list their `audios`); returns how many clips were used (0: nothing
    to fit, no clips to fit on, which is logged, or `sources` given and holding no audio: an
    image stage's audio tower sees no clip, and reading its images for clips would be waste)."""
    from phi4core.models.audio import MeanVarianceNorm
    from phi4core.models.audio_features import log_mel

    norms = [m for chunk in chunks for m in chunk.modules()
             if isinstance(m, MeanVarianceNorm) and m.is_identity()]
    if not norms or (sources is not None and not carries_audio(sources)):
        return 0
    clips = []
    if samples is not None:
        for i in range(min(len(samples), MAX_SCAN)):
            clips.extend(samples[i].get("audios", ()))
            if len(clips) >= MAX_CLIPS:
                break
    if not clips:
        log.warning("the audio encoder starts without feature statistics and the stage's data "
                    "gave no clips to fit them on (stream sources are not read ahead): its "
                    "features stay unnormalised")
        return 0
    # a clip of NaN samples (a broken float WAV) would make every statistic NaN
    features = [f for f in map(log_mel, clips[:MAX_CLIPS]) if torch.isfinite(f).all()]
    if len(features) < 2:
        log.warning("the audio encoder starts without feature statistics and fewer than 2 of "
                    "the stage's first clips are finite: its features stay unnormalised")
        return 0
    for norm in norms:
        norm.fit(features)
    log.info("audio feature statistics fitted on %d training clips", len(features))
    return len(features)
