"""The one table between Hugging Face tensor names and phi4core's, read both ways.

One ``Row`` per tensor kind: the phi4core name pattern, the Hugging Face name(s) it comes from,
the transform between the two layouts (and its inverse, for export) and how the tensor is split
over tensor parallelism. Import walks the model's tensors, finds each one's row, reads and
transforms the Hugging Face tensors and takes this rank's shard; export gathers the shards and
runs the inverse. Pipeline parallelism needs nothing here: a rank holds the layers of its stages
(``{L}`` is the global layer number on the Hugging Face side, the chunk-local one in phi4core's
name) and the towers live on the first stage.

Hugging Face names are those of ``transformers``' ``Phi4MultimodalForCausalLM`` (a
``Phi3ForCausalLM`` folder is its decoder part). A row whose ``where`` is ``adapter`` is a LoRA
factor: it lives in the adapter's PEFT folder (``vision-lora/``) under its PEFT key less the
``base_model.model.`` prefix. The original remote-code layout (``phi4mm``) differs only in
names: ``PHI4MM_RENAMES`` rewrites them (see ``to_phi4mm`` / ``from_phi4mm``).

Placeholders: ``{L}`` decoder layer, ``{i}`` a tower's layer or block, ``{a}`` a LoRA adapter
(vision, speech), ``{rest}`` any name tail carried unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from phi4core.module_groups import LORA_ADAPTERS

TP = Literal["replicated", "column", "row", "gate_up"]

# {a}: any LoRA adapter of the one table (text, vision, speech).
_FIELD_RE = {"L": r"\d+", "i": r"\d+", "a": "|".join(LORA_ADAPTERS), "rest": r".+"}


def _pattern(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELD_RE[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


@dataclass(frozen=True)
class Row:
    phi4: str  # phi4core parameter/buffer name pattern
    hf: tuple[str, ...]  # the Hugging Face tensor(s) it is made of
    transform: str = "copy"  # a key of TRANSFORMS
    tp: TP = "replicated"
    where: Literal["model", "adapter"] = "model"
    # Import only: other spellings accepted when hf[0] is absent (split q/k/v or gate/up,
    # concatenated on dim 0 before the transform).
    alternatives: tuple[str, ...] = ()
    # Import only: read this tensor when the model ties it (lm_head -> embeddings).
    tied_to: str | None = None

    @cached_property
    def regex(self) -> re.Pattern:
        return _pattern(self.phi4)

    def hf_names(self, values: dict[str, str]) -> list[str]:
        return [n.format(**values) for n in self.hf]


# ---------------------------------------------------------------------------------------------
# Transforms: Hugging Face tensors -> phi4core tensor, and back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """What a transform needs to know about the model (from the ModelConfig)."""

    heads: int  # attention heads of the module the row is in
    groups: int  # query groups (= heads for multi-head attention)


def _qkv_to_grouped(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    """[q (all heads); k; v] -> megatron's per-query-group blocks [q_g; k_g; v_g]."""
    rest = w.shape[1:]
    total = w.shape[0]
    d = total // (s.heads + 2 * s.groups)
    rep = s.heads // s.groups
    q = w[: s.heads * d].reshape(s.groups, rep * d, *rest)
    k = w[s.heads * d: (s.heads + s.groups) * d].reshape(s.groups, d, *rest)
    v = w[(s.heads + s.groups) * d:].reshape(s.groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(total, *rest)


def _grouped_to_qkv(w: torch.Tensor, s: Shapes) -> torch.Tensor:
    rest = w.shape[1:]
    total = w.shape[0]
    d = total // (s.heads + 2 * s.groups)
    rep = s.heads // s.groups
    blocks = w.reshape(s.groups, (rep + 2) * d, *rest)
    q = blocks[:, : rep * d].reshape(s.heads * d, *rest)
    k = blocks[:, rep * d: (rep + 1) * d].reshape(s.groups * d, *rest)
    v = blocks[:, (rep + 1) * d:].reshape(s.groups * d, *rest)
    return torch.cat([q, k, v], 0)


@dataclass(frozen=True)
class Transform:
    def to_phi4(self, tensors: list[torch.Tensor], s: Shapes) -> torch.Tensor:
        (t,) = tensors
        return t

    def to_hf(self, t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
        return [t]


class GroupedQKV(Transform):
    """The decoder's fused qkv (and its LoRA B): HF rows [q | k | v], megatron per group."""

    def to_phi4(self, tensors, s):
        (t,) = tensors
        return _qkv_to_grouped(t, s)

    def to_hf(self, t, s):
        return [_grouped_to_qkv(t, s)]


class SplitQKV(Transform):
    """SigLIP's separate q/k/v (weights or biases) <-> megatron's fused per-head qkv."""

    def to_phi4(self, tensors, s):
        return _qkv_to_grouped(torch.cat(tensors, 0), s)

    def to_hf(self, t, s):
        return list(torch.chunk(_grouped_to_qkv(t, s), 3, 0))


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(), "grouped_qkv": GroupedQKV(), "split_qkv": SplitQKV(),
}


# ---------------------------------------------------------------------------------------------
# Tensor-parallel split (import) and gather (export)
# ---------------------------------------------------------------------------------------------


def tp_shard(tp: TP, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if size == 1 or tp == "replicated":
        return full
    if tp == "column":
        return torch.chunk(full, size, 0)[rank]
    if tp == "row":
        return torch.chunk(full, size, 1)[rank]
    gate, up = torch.chunk(full, 2, 0)  # gate_up: each half split, this rank's [gate | up]
    return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], 0)


def tp_unshard(tp: TP, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1 or tp == "replicated":
        return parts[0]
    if tp == "column":
        return torch.cat(parts, 0)
    if tp == "row":
        return torch.cat(parts, 1)
    halves = [torch.chunk(p, 2, 0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_D = "decoder.layers.{L}."
_H = "model.layers.{L}."
_IMG = "model.embed_tokens_extend.image_embed."
_SIG = _IMG + "img_processor."
SIGLIP_PREFIX = _SIG  # the image encoder's SigLIP, as a SiglipVisionModel's `vision_model.`
_AUD = "model.embed_tokens_extend.audio_embed."
_V = "vision.encoder.layers.{i}."
_SL = _SIG + "encoder.layers.{i}."

# The decoder linears a LoRA wraps: (phi4core module, HF module, TP of the base, transform of
# the base weight and of the LoRA B). The A factor of a column base is replicated, of a row
# base split like the base's input; B of a column base is split like the base's rows.
LORA_LINEARS = (
    ("self_attention.linear_qkv", "self_attn.qkv_proj", "column", "grouped_qkv"),
    ("self_attention.linear_proj", "self_attn.o_proj", "row", "copy"),
    ("mlp.linear_fc1", "mlp.gate_up_proj", "gate_up", "copy"),
    ("mlp.linear_fc2", "mlp.down_proj", "row", "copy"),
)


def _decoder_rows() -> list[Row]:
    rows = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp="column"),
        Row("output_layer.weight", ("lm_head.weight",), tp="column",
            tied_to="model.embed_tokens.weight"),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Row(_D + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
        Row(_D + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",)),
        Row(_D + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
        Row(_D + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",)),
        Row(_D + "self_attention.linear_qkv.weight", (_H + "self_attn.qkv_proj.weight",),
            "grouped_qkv", "column",
            alternatives=tuple(_H + f"self_attn.{x}_proj.weight" for x in "qkv")),
        Row(_D + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), tp="row"),
        Row(_D + "mlp.linear_fc1.weight", (_H + "mlp.gate_up_proj.weight",), tp="gate_up",
            alternatives=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight")),
        Row(_D + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), tp="row"),
    ]
    for phi4, hf, base_tp, transform in LORA_LINEARS:
        column = base_tp in ("column", "gate_up")
        rows.append(Row(f"{_D}{phi4}.lora_{{a}}.A", (f"{_H}{hf}.lora_A.weight",),
                        tp="replicated" if column else "row", where="adapter"))
        rows.append(Row(f"{_D}{phi4}.lora_{{a}}.B", (f"{_H}{hf}.lora_B.weight",), transform,
                        tp=base_tp if column else "replicated", where="adapter"))
    return rows


def _linear(phi4: str, hf: str, tp: TP) -> list[Row]:
    """Weight and bias of a linear (a row-parallel bias is whole on every rank)."""
    return [Row(f"{phi4}.weight", (f"{hf}.weight",), tp=tp),
            Row(f"{phi4}.bias", (f"{hf}.bias",), tp="column" if tp == "column" else "replicated")]


def _vision_rows() -> list[Row]:
    rows = [
        Row("vision.embeddings.{rest}", (_SIG + "embeddings.{rest}",)),
        Row("vision.sub_GN", (_IMG + "sub_img_feature_extensor",)),
        Row("vision.glb_GN", (_IMG + "global_img_feature_extensor",)),
        # Past the feature layer: carried under the HF names, never run.
        Row("vision.unused_tail.{rest}", (_SIG + "{rest}",)),
        Row(_V + "input_layernorm.{rest}", (_SL + "layer_norm1.{rest}",)),
        Row(_V + "pre_mlp_layernorm.{rest}", (_SL + "layer_norm2.{rest}",)),
        Row(_V + "self_attention.linear_qkv.layer_norm_weight", (_SL + "layer_norm1.weight",)),
        Row(_V + "self_attention.linear_qkv.layer_norm_bias", (_SL + "layer_norm1.bias",)),
        Row(_V + "mlp.linear_fc1.layer_norm_weight", (_SL + "layer_norm2.weight",)),
        Row(_V + "mlp.linear_fc1.layer_norm_bias", (_SL + "layer_norm2.bias",)),
    ]
    for kind in ("weight", "bias"):
        rows.append(Row(_V + f"self_attention.linear_qkv.{kind}",
                        tuple(_SL + f"self_attn.{x}_proj.{kind}" for x in "qkv"),
                        "split_qkv", "column"))
    rows += _linear(_V + "self_attention.linear_proj", _SL + "self_attn.out_proj", "row")
    rows += _linear(_V + "mlp.linear_fc1", _SL + "mlp.fc1", "column")
    rows += _linear(_V + "mlp.linear_fc2", _SL + "mlp.fc2", "row")
    rows += _linear("vision.projector.linear_fc1", _IMG + "img_projection_up", "column")
    rows += _linear("vision.projector.linear_fc2", _IMG + "img_projection_down", "row")
    return rows


def _audio_rows() -> list[Row]:
    # The conformer keeps the checkpoint's names (normalisation buffers included).
    rows = [Row("audio.encoder.{rest}", (_AUD + "encoder.{rest}",))]
    for mode in ("speech", "vision_speech"):
        rows += _linear(f"audio.projector_{mode}.linear_fc1", f"{_AUD}up_proj_for_{mode}",
                        "column")
        rows += _linear(f"audio.projector_{mode}.linear_fc2", f"{_AUD}down_proj_for_{mode}",
                        "row")
    return rows


TABLE: tuple[Row, ...] = tuple(_decoder_rows() + _vision_rows() + _audio_rows())


def find_row(phi4_name: str) -> tuple[Row, dict[str, str]] | None:
    """The row of a phi4core tensor name and its placeholder values (None: no row)."""
    for row in TABLE:
        m = row.regex.match(phi4_name)
        if m:
            return row, m.groupdict()
    return None


def shapes_for(phi4_name: str, model_cfg) -> Shapes:
    """Attention geometry of the module a tensor belongs to."""
    if phi4_name.startswith("vision."):
        return Shapes(model_cfg.vision.num_heads, model_cfg.vision.num_heads)
    return Shapes(model_cfg.num_attention_heads, model_cfg.num_query_groups)


# ---------------------------------------------------------------------------------------------
# The original remote-code layout (model_type phi4mm): the same tensors under other names
# ---------------------------------------------------------------------------------------------

_LORA_MODULES = r"(self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)"
# (transformers name, phi4mm name) templates, tried in order both ways; each {field} stands
# for the same text on both sides (its pattern in _PHI4MM_FIELDS).
PHI4MM_RENAMES: tuple[tuple[str, str], ...] = (
    (_AUD + "encoder.encoders.{n}.feed_forward_{io}.gate_up_proj",
     _AUD + "encoder.encoders.{n}.feed_forward_{io}.net.0.linear"),
    (_AUD + "encoder.encoders.{n}.feed_forward_{io}.down_proj",
     _AUD + "encoder.encoders.{n}.feed_forward_{io}.net.2"),
    (_AUD + "encoder.encoders.{n}.self_attn.{qkv}_proj",
     _AUD + "encoder.encoders.{n}.self_attn.linear_{qkv}"),
    (_AUD + "encoder.encoders.{n}.self_attn.o_proj",
     _AUD + "encoder.encoders.{n}.self_attn.linear_out"),
    (_IMG + "img_projection_up",
     _IMG + "img_projection.0"),
    (_IMG + "img_projection_down",
     _IMG + "img_projection.2"),
    (_IMG + "global_img_feature_extensor",
     _IMG + "glb_GN"),
    (_IMG + "sub_img_feature_extensor",
     _IMG + "sub_GN"),
    (_AUD + "up_proj_for_speech",
     _AUD + "audio_projection.speech.0"),
    (_AUD + "down_proj_for_speech",
     _AUD + "audio_projection.speech.2"),
    (_AUD + "up_proj_for_vision_speech",
     _AUD + "audio_projection.vision.0"),
    (_AUD + "down_proj_for_vision_speech",
     _AUD + "audio_projection.vision.2"),
)
_PHI4MM_FIELDS = {"n": r"\d+", "io": "in|out", "qkv": "q|k|v"}


def _compile_rename(source: str, target: str) -> tuple[re.Pattern, str]:
    """A template pair as (regex matching ``source`` from the start, its replacement)."""
    fields = re.findall(r"\{(\w+)\}", source)
    pattern, repl = re.escape(source), target
    for i, field in enumerate(fields, 1):
        slot = "{" + field + "}"
        pattern = pattern.replace(re.escape(slot), f"({_PHI4MM_FIELDS[field]})", 1)
        repl = repl.replace(slot, f"\\g<{i}>")
    return re.compile("^" + pattern), repl


_RENAME_TO = tuple(_compile_rename(hf, mm) for hf, mm in PHI4MM_RENAMES)
_RENAME_FROM = tuple(_compile_rename(mm, hf) for hf, mm in PHI4MM_RENAMES)
_LORA_BASE = re.compile(rf"^(model\.layers\.\d+\.{_LORA_MODULES})\.weight$")
_LORA_BASE_MM = re.compile(rf"^(model\.layers\.\d+\.{_LORA_MODULES})\.base_layer\.weight$")
_LORA_FACTOR = re.compile(rf"^(model\.layers\.\d+\.{_LORA_MODULES})\.lora_(A|B)\.weight$")
_LORA_FACTOR_MM = re.compile(
    rf"^(model\.layers\.\d+\.{_LORA_MODULES})\.lora_(A|B)\.(vision|speech)\.weight$")


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def to_phi4mm(name: str, adapter: str | None = None, lora_base: bool = False) -> str:
    """A transformers name (an adapter's factor with ``adapter``) in the phi4mm layout; a LoRA
    target's base weight gains ``base_layer.`` when the model has adapters (``lora_base``)."""
    if adapter is not None:
        m = _LORA_FACTOR.match(name)
        if not m:
            raise ValueError(f"{name!r} is not a LoRA factor name")
        return f"{m.group(1)}.lora_{m.group(3)}.{adapter}.weight"
    if lora_base:
        m = _LORA_BASE.match(name)
        if m:
            return f"{m.group(1)}.base_layer.weight"
    return _rename(name, _RENAME_TO)


def from_phi4mm(name: str) -> tuple[str, str | None]:
    """(transformers name, adapter or None) of a phi4mm tensor name."""
    m = _LORA_FACTOR_MM.match(name)
    if m:
        return f"{m.group(1)}.lora_{m.group(3)}.weight", m.group(4)
    m = _LORA_BASE_MM.match(name)
    if m:
        return f"{m.group(1)}.weight", None
    return _rename(name, _RENAME_FROM), None
