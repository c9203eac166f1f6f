"""Parameter counts of a model from its config alone: no torch, no modules.

The one counting the estimator (`phi4 plan --estimate`) uses; `phi4 model-info` counts the
built modules on the meta device, and a test holds the two equal for every preset (total, per
module group, per reference-table row). Each formula follows the module that holds the
weights: the Phi-3-family decoder (phi4core.models.decoder), the LoRA factors
(phi4core.models.lora: A [r, in], B [out, r] per wrapped linear), SigLIP (vision.py), the
conformer (conformer.py, audio.py) and the two-layer projectors (tower_common.py).

    >>> parameter_counts(PRESETS["phi4_mini"]).total
    3836021760
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from phi4core.config import AudioConfig, LoraConfig, ModelConfig, VisionConfig


def siglip_tail_shapes(vc: VisionConfig) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the checkpoint's tower past the feature layer (never run)."""
    h, f = vc.hidden_size, vc.intermediate_size
    out: dict[str, tuple[int, ...]] = {}

    def mlp(prefix: str) -> None:
        out.update({f"{prefix}.fc1.weight": (f, h), f"{prefix}.fc1.bias": (f,),
                    f"{prefix}.fc2.weight": (h, f), f"{prefix}.fc2.bias": (h,)})

    for i in range(vc.used_layers, vc.num_layers):
        p = f"encoder.layers.{i}"
        for ln in ("layer_norm1", "layer_norm2"):
            out.update({f"{p}.{ln}.weight": (h,), f"{p}.{ln}.bias": (h,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.update({f"{p}.self_attn.{proj}.weight": (h, h), f"{p}.self_attn.{proj}.bias": (h,)})
        mlp(f"{p}.mlp")
    out.update({"post_layernorm.weight": (h,), "post_layernorm.bias": (h,),
                "head.probe": (1, 1, h),
                "head.attention.in_proj_weight": (3 * h, h),
                "head.attention.in_proj_bias": (3 * h,),
                "head.attention.out_proj.weight": (h, h), "head.attention.out_proj.bias": (h,),
                "head.layernorm.weight": (h,), "head.layernorm.bias": (h,)})
    mlp("head.mlp")
    return out


def decoder_linears(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one decoder layer, by its HF name."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    return {"qkv_proj": (m.hidden_size, q + 2 * kv), "o_proj": (q, m.hidden_size),
            "gate_up_proj": (m.hidden_size, 2 * m.ffn_hidden_size),
            "down_proj": (m.ffn_hidden_size, m.hidden_size)}


def decoder_layer(m: ModelConfig) -> int:
    """One layer: its four linears (no biases) and two RMSNorm weights."""
    return sum(i * o for i, o in decoder_linears(m).values()) + 2 * m.hidden_size


def lora_adapter(m: ModelConfig, lora: LoraConfig) -> int:
    """A [r, in] and B [out, r] on each target linear of every layer."""
    linears = decoder_linears(m)
    return m.num_layers * sum(lora.rank * (linears[t][0] + linears[t][1]) for t in lora.targets)


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def projector(in_size: int, out_hidden: int) -> int:
    """fc1 in -> out_hidden, fc2 out_hidden -> out_hidden, both with biases."""
    return _linear(in_size, out_hidden) + _linear(out_hidden, out_hidden)


def vision_layer(vc: VisionConfig) -> int:
    """A SigLIP layer: two LayerNorms, qkv and output projections, fc1/fc2, all with biases."""
    h, f = vc.hidden_size, vc.intermediate_size
    return 4 * h + _linear(h, 3 * h) + _linear(h, h) + _linear(h, f) + _linear(f, h)


def vision_rows(vc: VisionConfig, out_hidden: int) -> dict[str, int]:
    side = vc.image_size // vc.patch_size
    h = vc.hidden_size
    embeddings = 3 * vc.patch_size**2 * h + h + side * side * h
    tail = sum(math.prod(shape) for shape in siglip_tail_shapes(vc).values())
    return {"encoder_used": embeddings + vc.used_layers * vision_layer(vc),
            "encoder_unused_tail": tail, "separators": 2 * h,
            "projector": projector(h, out_hidden)}


def conformer_block(ac: AudioConfig) -> int:
    d, f, k = ac.attention_dim, ac.ffn_dim, ac.conv_kernel
    feed_forward = 2 * d + _linear(d, 2 * f) + _linear(f, d)
    attention = 4 * _linear(d, d)
    conv = (2 * d + _linear(d, 2 * d) + 2 * d  # LayerNorm, GLU 1x1 conv and its two biases
            + d * k + d + _linear(d, d)         # depthwise and pointwise convs
            + _linear(d, d))                    # the last 1x1 conv
    return 2 * feed_forward + attention + conv + 2 * 2 * d


def audio_rows(ac: AudioConfig, out_hidden: int) -> dict[str, int]:
    c = ac.conv_channels
    factors = int(math.log2(ac.time_reduction))
    freq = ac.num_mel_bins
    for _ in range(factors):
        freq = math.ceil(freq / 2)
    conv = (9 * c + c) + (factors - 1) * (9 * c + c + _linear(c, c)) + _linear(c * freq,
                                                                               ac.attention_dim)
    return {"conv_subsampling": conv,
            "relative_bias": 2 * ac.relative_attention_max_distance * ac.num_heads,
            "conformer_blocks": ac.num_blocks * conformer_block(ac),
            "projector_speech": projector(ac.attention_dim, out_hidden),
            "projector_vision_speech": projector(ac.attention_dim, out_hidden)}


@dataclass
class ParameterCounts:
    """As `phi4 model-info` reports them: rows of the reference table (which may hold tensors
    that are carried, never trained: SigLIP's unused tail), parameters per module group, and
    the backbone's parts."""

    rows: dict[str, int]
    groups: dict[str, int]
    parts: dict[str, int]
    per_layer: int
    extra: dict[str, int] = field(default_factory=dict)  # carried, not parameters

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def parameter_counts(m: ModelConfig) -> ParameterCounts:
    h = m.hidden_size
    embedding = m.vocab_size * h
    parts = {"embedding": embedding, "decoder_layers": m.num_layers * decoder_layer(m),
             "final_norm": h, "output_layer": 0 if m.tie_embeddings else embedding}
    backbone = sum(parts.values())
    rows = {"backbone": backbone}
    groups = {"backbone": backbone}
    extra: dict[str, int] = {}
    if m.vision is not None:
        v = vision_rows(m.vision, h)
        rows.update({f"vision.{k}": n for k, n in v.items()})
        groups["vision.encoder"] = v["encoder_used"]
        groups["vision.projector"] = v["separators"] + v["projector"]
        extra["vision.encoder_unused_tail"] = v["encoder_unused_tail"]
    if m.audio is not None:
        a = audio_rows(m.audio, h)
        rows.update({f"audio.{k}": n for k, n in a.items()})
        groups["audio.encoder"] = a["conv_subsampling"] + a["relative_bias"] + a["conformer_blocks"]
        groups["audio.projector"] = a["projector_speech"] + a["projector_vision_speech"]
    for name, lora in (("lora.vision", m.lora_vision), ("lora.speech", m.lora_speech)):
        if lora is not None:
            rows[name] = groups[name] = lora_adapter(m, lora)
    return ParameterCounts(rows, groups, parts, decoder_layer(m), extra)
