"""Phi-4-Multimodal's speech tower: input normalisation, x8 conv subsampling, the conformer
blocks with a relative position bias, and the two projectors.

    tower = AudioTower(model_cfg.audio, model_cfg.hidden_size)     # parallel state set up
    embeds = tower(audio_input_features, audio_embed_sizes, audio_attention_mask,
                   input_mode=InputMode.SPEECH)                     # [tokens, hidden]

Clips longer than ``chunk_frames`` (500) frames after subsampling run as independent chunks
of 500 (the last one padded); padded frames, of a shorter clip in a batch or of the last
chunk, are masked with -inf as keys. (The original model masks a last chunk's padding only in
a batch with a padding mask; for a single clip it, like ``transformers``, lets that chunk
attend to its zero padding. Here it is always masked, so a single clip of more than 500
frames whose length is not a multiple of 500 differs from them in its last chunk.)

The projector is the speech one in SPEECH mode and the vision+speech one when an image is in
the input (VISION_SPEECH); both are megatron MLPs (column- then row-parallel). The one a call
does not pick is ``unused_parameters(input_mode)``: the multimodal model gives it a zero
gradient in training.
``num_audio_tokens`` and the log-Mel features live in the torch-only ``audio_features``
module and are re-exported here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from torch import nn

from phi4core.config import AudioConfig
from phi4core.models.audio_features import extract_features, log_mel, num_audio_tokens
from phi4core.models.conformer import (
    ConformerBlock,
    ConvSubsampling,
    RelativeAttentionBias,
    subsampled_length,
)
from phi4core.models.lora import InputMode, to_input_mode
from phi4core.models.tower_common import (
    ShardedCheckpointing,
    count,
    decoder_settings,
    place_like_megatron,
    projector_config,
    tp_group,
)

__all__ = ["AudioEncoder", "AudioTower", "build_tower", "extract_features", "log_mel",
           "num_audio_tokens", "projection_mode"]

ProjectionMode = Literal["speech", "vision_speech"]
# The routing table's audio projector per input_mode (modes without one take no audio).
PROJECTION_FOR_MODE: dict[InputMode, ProjectionMode] = {
    InputMode.SPEECH: "speech",
    InputMode.VISION_SPEECH: "vision_speech",
}


def projection_mode(input_mode) -> ProjectionMode:
    """The audio projector an ``input_mode`` (int, name or InputMode) selects."""
    mode = to_input_mode(input_mode)
    if mode not in PROJECTION_FOR_MODE:
        raise ValueError(f"audio inputs in input_mode {mode.name} ({mode.value}): audio goes "
                         f"through the SPEECH (2) or VISION_SPEECH (3) mode")
    return PROJECTION_FOR_MODE[mode]


class MeanVarianceNorm(nn.Module):
    """(x - global_mean) * global_invstd with the checkpoint's 80-value buffers."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.register_buffer("global_mean", torch.zeros(bins))
        self.register_buffer("global_invstd", torch.ones(bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.global_mean) * self.global_invstd

    def is_identity(self) -> bool:
        """Still at its initial values (mean 0, inverse std 1): no statistics loaded."""
        return bool((self.global_mean == 0).all() and (self.global_invstd == 1).all())

    @torch.no_grad()
    def fit(self, features: list[torch.Tensor]) -> None:
        """Per-bin mean and inverse std over all frames of `features` ([frames, bins] each),
        as the released encoder's statistics were computed over its training corpus."""
        frames = torch.cat([f.reshape(-1, f.shape[-1]).double() for f in features])
        if frames.shape[0] < 2 or not torch.isfinite(frames).all():
            raise ValueError(f"cannot fit feature statistics on {frames.shape[0]} frames "
                             "(need 2 or more, all finite)")
        self.global_mean.copy_(frames.mean(0))
        self.global_invstd.copy_(1.0 / frames.std(0).clamp_min(1e-5))


def _chunk(x: torch.Tensor, valid: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, t, d] and [b, t] -> [b * n, size, d] and [b * n, size]: independent chunks, the last
    padded (its padding marked invalid)."""
    b, t, d = x.shape
    pad = -t % size
    x = F.pad(x, (0, 0, 0, pad))
    valid = F.pad(valid, (0, pad), value=False)
    return x.reshape(-1, size, d), valid.reshape(-1, size)


class AudioEncoder(nn.Module):
    """Log-Mel features [b, frames, 80] -> conformer states [b, ceil(frames / 8), dim]."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        self.ac = ac
        self.encoder_embedding = MeanVarianceNorm(ac.num_mel_bins)
        self.embed = ConvSubsampling(ac)
        self.relative_attention_bias_layer = RelativeAttentionBias(ac)
        self.encoders = nn.ModuleList(ConformerBlock(ac) for _ in range(ac.num_blocks))
        # Biases start at zero, as transformers initialises them: torch's random biases in the
        # convolutional subsampling outweigh a fresh encoder's input, whose states then hardly
        # change over a clip (docs/media_learning_investigation.md).
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None:
                    m.bias.zero_()

    def attention_bias(self, valid: torch.Tensor) -> torch.Tensor:
        """[b, heads, t, t]: the relative bias plus -inf on padded keys. A chunk with no real
        frame (only in a batch with a longer clip) attends to all of its padding instead:
        its outputs are dropped, and an all -inf row would make NaNs."""
        bias = self.relative_attention_bias_layer(valid.shape[1])
        keys = valid | ~valid.any(dim=1, keepdim=True)
        mask = torch.zeros(keys.shape, dtype=bias.dtype, device=bias.device)
        mask = mask.masked_fill(~keys, float("-inf"))
        return bias + mask[:, None, None, :]

    def forward(self, features: torch.Tensor, frames: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [b, t, bins], frames [b] real frames per clip (None: all t) ->
        (states [b, t', dim], real states per clip [b])."""
        b, t, _ = features.shape
        if frames is None:
            frames = torch.full((b,), t, dtype=torch.long, device=features.device)
        x = self.embed(self.encoder_embedding(features))
        t_sub = x.shape[1]
        lengths = subsampled_length(frames.to(x.device), self.ac.time_reduction)
        valid = torch.arange(t_sub, device=x.device)[None, :] < lengths[:, None]
        chunked = t_sub > self.ac.chunk_frames
        if chunked:
            x, valid = _chunk(x, valid, self.ac.chunk_frames)
        bias = self.attention_bias(valid)
        for block in self.encoders:
            x = block(x, bias)
        if chunked:
            x = x.reshape(b, -1, x.shape[-1])[:, :t_sub]
        return x, lengths


class AudioTower(ShardedCheckpointing, nn.Module):
    """Features -> projected speech embeddings, clip after clip, `audio_embed_sizes` each."""

    def __init__(self, ac: AudioConfig, out_hidden: int, *, dtype: torch.dtype = torch.float32,
                 **config_overrides) -> None:
        super().__init__()
        self.ac = ac
        self.encoder = AudioEncoder(ac).to(dtype)
        pcfg = projector_config(out_hidden, F.gelu, params_dtype=dtype, **config_overrides)
        sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        self.projector_speech = MLP(pcfg, sub, input_size=ac.attention_dim,
                                    ffn_hidden_size=out_hidden, tp_group=tp_group())
        self.projector_vision_speech = MLP(pcfg, sub, input_size=ac.attention_dim,
                                    ffn_hidden_size=out_hidden, tp_group=tp_group())
        place_like_megatron(self, pcfg)

    def parameter_counts(self) -> dict[str, int]:
        """The reference table's rows for this tower (full sizes at TP=1)."""
        enc = self.encoder
        return {
            "conv_subsampling": count(enc.embed),
            "relative_bias": count(enc.relative_attention_bias_layer),
            "conformer_blocks": count(enc.encoders),
            "projector_speech": count(self.projector_speech),
            "projector_vision_speech": count(self.projector_vision_speech),
        }

    def projector_for(self, mode: ProjectionMode) -> MLP:
        return self.projector_speech if mode == "speech" else self.projector_vision_speech

    def unused_parameters(self, input_mode) -> list[nn.Parameter]:
        """The projector a call in ``input_mode`` leaves out (the other one)."""
        mode = to_input_mode(input_mode)
        if mode not in PROJECTION_FOR_MODE:
            return []
        other = "vision_speech" if PROJECTION_FOR_MODE[mode] == "speech" else "speech"
        return list(self.projector_for(other).parameters())

    def forward(self, audio_input_features: torch.Tensor,
                audio_embed_sizes: torch.Tensor | None = None,
                audio_attention_mask: torch.Tensor | None = None,
                mode: ProjectionMode | None = None, *, input_mode=None) -> torch.Tensor:
        """[b, t, bins] features (the feature extractor's names) -> [sum of sizes, hidden].
        The projector: ``mode`` ("speech" | "vision_speech"), or the one ``input_mode``
        routes to (the multimodal model's tower contract); speech when neither is given."""
        if input_mode is not None:
            picked = projection_mode(input_mode)
            if mode is not None and mode != picked:
                raise ValueError(f"mode {mode!r} contradicts input_mode "
                                 f"{to_input_mode(input_mode).name} (projector {picked!r})")
            mode = picked
        mode = mode or "speech"
        if mode not in ("speech", "vision_speech"):
            raise ValueError(f"audio projection mode must be 'speech' or 'vision_speech', "
                             f"got {mode!r}")
        frames = None if audio_attention_mask is None else audio_attention_mask.sum(dim=1)
        dtype = self.encoder.embed.out.weight.dtype
        states, lengths = self.encoder(audio_input_features.to(dtype), frames)
        sizes = lengths if audio_embed_sizes is None else audio_embed_sizes
        states = torch.cat([states[i, : int(sizes[i])] for i in range(states.shape[0])])
        out, bias = self.projector_for(mode)(states)
        return out + bias if bias is not None else out


def build_tower(model_cfg, config) -> AudioTower:
    """The multimodal model's speech tower (phi4core.models.multimodal's builder contract):
    ``model_cfg.audio`` projected to the decoder's width, in the decoder config's dtype and
    initialisation."""
    settings = decoder_settings(config)
    settings.pop("use_te")  # the conformer is plain torch modules; its projectors megatron's
    return AudioTower(model_cfg.audio, model_cfg.hidden_size, **settings)
