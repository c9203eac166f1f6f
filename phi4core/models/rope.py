"""LongRoPE (Phi-3 / Phi-4) as a megatron-core rotary embedding.

Phi-3's LongRoPE rescales each rotary frequency by a per-pair factor: ``short_factor`` while the
sequence fits the original pre-training context, ``long_factor`` once it is longer (exactly as
transformers' Phi3 longrope: long when ``seq_len > original_max_position_embeddings``), and
multiplies cos/sin by an attention factor ``sqrt(1 + ln(max/original) / ln(original))``.

The frequencies plug into megatron as a ``RotaryEmbedding`` subclass (it returns angles, as
megatron's does). megatron multiplies cos/sin by a "concentration factor" it reads from the
config (the YaRN hook, ``_yarn_get_concentration_factor_from_config``, present from
megatron-core 0.16 on); ``attach_attention_factor`` sets that hook so the attention factor
lands exactly where transformers puts it: on the rotated part of q and k only.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor

from phi4core.config import LongRopeConfig


def rotary_dim(kv_channels: int, rotary_percent: float) -> int:
    return int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels


def longrope_inv_freq(
    factors: list[float], dim: int, base: float, device: torch.device | str = "cpu"
) -> Tensor:
    """1 / (factor_i * base^(2i/dim)), in float32, computed in the same order as transformers."""
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base**exponents)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """megatron ``RotaryEmbedding`` with LongRoPE's length-dependent frequencies."""

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        longrope: LongRopeConfig,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        use_cpu_initialization: bool = True,
        cp_group=None,
    ) -> None:
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=rotary_percent,
            rotary_interleaved=rotary_interleaved,
            rotary_base=rotary_base,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        dim = rotary_dim(kv_channels, rotary_percent)
        if len(longrope.short_factor) != dim // 2 or len(longrope.long_factor) != dim // 2:
            raise ValueError(
                f"LongRoPE factors need {dim // 2} entries each (rotary dim {dim}); got "
                f"{len(longrope.short_factor)} short, {len(longrope.long_factor)} long"
            )
        self.original_max_position_embeddings = longrope.original_max_position_embeddings
        self.attention_factor = longrope.attention_factor
        self.short_inv_freq = longrope_inv_freq(longrope.short_factor, dim, rotary_base)
        self.long_inv_freq = longrope_inv_freq(longrope.long_factor, dim, rotary_base)
        # megatron reads .inv_freq (device placement, dtype); keep the short set there.
        self.inv_freq = self.short_inv_freq

    def uses_long_factors(self, seq_len: int) -> bool:
        return seq_len > self.original_max_position_embeddings

    def inv_freq_for(self, seq_len: int) -> Tensor:
        name = "long_inv_freq" if self.uses_long_factors(seq_len) else "short_inv_freq"
        chosen = getattr(self, name)
        if chosen.device != self.inv_freq.device:  # megatron moves inv_freq to the device
            chosen = chosen.to(self.inv_freq.device)
            setattr(self, name, chosen)
        return chosen

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> Tensor:
        inv_freq = self.inv_freq_for(max_seq_len + offset)
        seq = torch.arange(max_seq_len, device=inv_freq.device, dtype=inv_freq.dtype) + offset
        return torch.outer(seq, inv_freq)

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        # Flash-decode path: megatron applies these without the concentration factor.
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cos(freqs) * self.attention_factor, torch.sin(freqs) * self.attention_factor


def attach_attention_factor(config, attention_factor: float) -> None:
    """Make megatron's attention multiply cos/sin of q and k by ``attention_factor``.

    megatron's ``_yarn_get_concentration_factor(s, m, d)`` is ``(0.1 m ln s + 1) /
    (0.1 d ln s + 1)``; with s = e and d = 0 it is ``0.1 m + 1``, so m = 10 (a - 1).
    """
    if attention_factor == 1.0:
        return
    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = 10.0 * (attention_factor - 1.0)
    config.yarn_mscale_all_dim = 0.0
    config.apply_rope_fusion = False  # TE's fused RoPE ignores the factor


def concentration_factor(config) -> float:
    """The factor megatron's attention will apply (1.0 when none is attached)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    return float(_yarn_get_concentration_factor_from_config(config))
