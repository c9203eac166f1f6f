"""Mixture of LoRAs on the decoder's linears, tensor-parallel aware, selected per batch.

    router = add_lora(model, {"vision": cfg.lora_vision, "speech": cfg.lora_speech})
    router.select(InputMode.VISION)     # every wrapped linear adds the vision adapter
    logits = model(input_ids, None, None)

Each target linear (fused ``qkv``, attention output, ``gate_up`` = fc1, ``down`` = fc2 of every
layer) keeps its class and parameters (names, shards, checkpoint keys unchanged) and gains one
``lora_<adapter>`` module per adapter holding this rank's shard of the factors A [r, in] and
B [out, r]; the output becomes ``base(x) + B(A(dropout(x))) * alpha / r``.

Tensor parallelism follows the base linear:

* column-parallel base (qkv, fc1): A is replicated, B is sharded on the output dim like the
  base weight, so its rows follow the base's local row layout (megatron's per-query-group
  [q | k | v] blocks of the fused qkv; [gate | up] of this rank's shard of fc1). The rank-r
  activation A x is gathered over the sequence (sequence parallelism; backward
  reduce-scatters) or copied into the TP region (backward all-reduces) before B.
* row-parallel base (o, fc2): A is sharded on the input dim, B is replicated; the partial
  A x is reduced over TP the way the base reduces its output (all-reduce, or reduce-scatter
  over the sequence with sequence parallelism) before B.

Replicated factors carry megatron's ``sequence_parallel`` attribute under sequence parallelism,
so ``finalize_model_grads`` sums their gradients over TP, as it does for norm weights.
Transformer Engine's linears are wrapped the same way; TE's fused LayerNorm+linear (qkv and
fc1 in the TE spec) takes the un-normalised input, so the adapter normalises it first with the
module's own norm weight.

Language mode (no adapter) runs the base forward untouched: bit-identical to the backbone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from phi4core.config import LoraConfig
from phi4core.models.chunks import as_chunks, unwrap
from phi4core.module_groups import LORA_ADAPTERS


class InputMode(IntEnum):
    """Phi-4-Multimodal's ``input_mode``: one per batch."""

    LANGUAGE = 0
    VISION = 1
    SPEECH = 2
    VISION_SPEECH = 3


# The routing table (phi4_multimodal.md): the adapter each mode runs; None is the pure backbone.
# Language mode runs the fine-tuning adapter `text` where the model has one (LoraRouter).
ADAPTER_FOR_MODE: dict[InputMode, str | None] = {
    InputMode.LANGUAGE: None,
    InputMode.VISION: "vision",
    InputMode.SPEECH: "speech",
    InputMode.VISION_SPEECH: "vision",
}


def to_input_mode(value) -> InputMode:
    """An InputMode from an int, a name ('vision') or an InputMode; ValueError otherwise."""
    if isinstance(value, str):
        try:
            return InputMode[value.upper()]
        except KeyError:
            pass
    else:
        try:
            return InputMode(int(value))
        except (TypeError, ValueError):
            pass
    known = ", ".join(f"{m.name} {m.value}" for m in InputMode)
    raise ValueError(f"input_mode {value!r} is not one of: {known}")


@dataclass(frozen=True)
class Target:
    """A decoder linear a LoRA can wrap."""

    name: str  # as LoraConfig.targets and the HF checkpoint spell it
    hf_module: str  # the module inside an HF layer (model.layers.N.<hf_module>)
    path: tuple[str, str]  # attributes inside a megatron TransformerLayer
    parallel: Literal["column", "row"]
    layout: Literal["qkv", "gate_up", "plain"]  # row layout of the output (column bases)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("qkv_proj", "self_attn.qkv_proj", ("self_attention", "linear_qkv"), "column",
               "qkv"),
        Target("o_proj", "self_attn.o_proj", ("self_attention", "linear_proj"), "row", "plain"),
        Target("gate_up_proj", "mlp.gate_up_proj", ("mlp", "linear_fc1"), "column", "gate_up"),
        Target("down_proj", "mlp.down_proj", ("mlp", "linear_fc2"), "row", "plain"),
    )
}


def adapter_module_name(adapter: str) -> str:
    """`lora_vision` for 'vision': the submodule (and ModelConfig field) of an adapter."""
    if adapter not in LORA_ADAPTERS:
        raise ValueError(f"unknown LoRA adapter {adapter!r}; known: {', '.join(LORA_ADAPTERS)}")
    return LORA_ADAPTERS[adapter].module


TEXT_ADAPTER = "text"


class LoraRouter:
    """Which adapter the wrapped linears add now (None: none). One per model, shared by all
    its linears and pipeline chunks; set per batch from ``input_mode``."""

    def __init__(self) -> None:
        self.adapter: str | None = None
        self.adapters: set[str] = set()  # those some wrapped linear holds

    def select(self, mode) -> str | None:
        mode = to_input_mode(mode)
        self.adapter = ADAPTER_FOR_MODE[mode]
        if mode == InputMode.LANGUAGE and TEXT_ADAPTER in self.adapters:
            self.adapter = TEXT_ADAPTER
        return self.adapter


class LoraFactors(nn.Module):
    """One adapter's factors in one linear: this rank's shards of A [r, in] and B [out, r]."""

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int,
                 parallel: str, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.rank = cfg.rank
        self.scale = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.parallel = parallel
        self.A = nn.Parameter(torch.zeros(cfg.rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank, dtype=dtype, device=device))

    def tp_axis(self, factor: str) -> int | None:
        """The dim a factor is sharded on over TP (None: replicated)."""
        if self.parallel == "column":
            return 0 if factor == "B" else None
        return 1 if factor == "A" else None

    def extra_repr(self) -> str:
        return (f"r={self.rank}, scale={self.scale}, dropout={self.dropout}, "
                f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}")


# ---------------------------------------------------------------------------------------------
# The wrapped linear
# ---------------------------------------------------------------------------------------------


class LoraLinearMixin:
    """Put in front of a linear's class (local or TE; see ``lora_class``): base forward, plus
    the active adapter's low-rank term."""

    _lora_router: LoraRouter
    _lora_target: Target
    _lora_adapters: tuple[str, ...]
    _lora_merged: set[str]

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        adapter = self._lora_router.adapter
        if adapter is None or adapter in self._lora_merged:
            return out, bias
        if adapter not in self._lora_adapters:
            raise RuntimeError(
                f"the {adapter} LoRA is selected but {self._lora_target.name} of this model has "
                f"none (adapters here: {', '.join(self._lora_adapters) or 'none'})")
        factors = getattr(self, adapter_module_name(adapter))
        return out + lora_delta(self, factors, x).to(out.dtype), bias

    def lora_factors(self) -> dict[str, LoraFactors]:
        return {a: getattr(self, adapter_module_name(a)) for a in self._lora_adapters}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base's entries, with each factor sharded as it is split over TP (the base
        declares only its own weight and bias; anything else it would call replicated)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for adapter, factors in self.lora_factors().items():
            sub_prefix = f"{prefix}{adapter_module_name(adapter)}."
            for factor in ("A", "B"):
                axis = factors.tp_axis(factor)
                sub = make_sharded_tensors_for_checkpoint(
                    {factor: getattr(factors, factor)}, sub_prefix,
                    {factor: axis} if axis is not None else {}, sharded_offsets)
                key = f"{sub_prefix}{factor}"
                if self._lora_target.layout == "gate_up" and factor == "B":
                    # [gate | up] of this rank's shard, like the base fc1 weight.
                    sub[key] = apply_swiglu_sharded_factory(sub[key], sharded_offsets, singleton)
                sd.update(sub)
        return sd


_LORA_CLASSES: dict[type, type] = {}


def lora_class(base: type) -> type:
    """``Lora<Base>``: the base class with LoraLinearMixin in front (one per base class)."""
    if issubclass(base, LoraLinearMixin):
        return base
    if base not in _LORA_CLASSES:
        _LORA_CLASSES[base] = type(f"Lora{base.__name__}", (LoraLinearMixin, base), {})
    return _LORA_CLASSES[base]


def _tp_group(linear):
    from megatron.core import parallel_state as ps

    group = getattr(linear, "tp_group", None) or getattr(linear, "_tp_group", None)
    return group if group is not None else ps.get_tensor_model_parallel_group()


def _tp_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_initialized() else 1


def _fused_norm(linear, x: torch.Tensor) -> torch.Tensor:
    """The normalisation a TE LayerNorm+linear applies to its input, done here (the base does
    not hand its normalised input out)."""
    cfg = linear.config
    weight = linear.layer_norm_weight
    if cfg.layernorm_zero_centered_gamma:
        weight = weight + 1
    xf = x.float()
    if cfg.normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
        y = y * weight.float()
    else:
        bias = getattr(linear, "layer_norm_bias", None)
        y = F.layer_norm(xf, (xf.shape[-1],), weight.float(),
                         bias.float() if bias is not None else None, cfg.layernorm_epsilon)
    return y.to(x.dtype)


def _dropout(x: torch.Tensor, p: float, training: bool, per_rank: bool) -> torch.Tensor:
    """Dropout on the adapter input. Where that input differs between TP ranks (a TP shard, a
    sequence-parallel slice) the masks come from megatron's model-parallel RNG, which differs
    per rank; where it is replicated, from the default one, which TP ranks share."""
    if p == 0.0 or not training:
        return x
    if per_rank:
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


def lora_delta(linear, factors: LoraFactors, x: torch.Tensor) -> torch.Tensor:
    """B(A(dropout(x))) * scale in the layout of the base linear's output on this rank."""
    from megatron.core.tensor_parallel import mappings

    group = _tp_group(linear)
    tp = _tp_size(group)
    sp = bool(getattr(linear, "sequence_parallel", False)) and tp > 1
    A, B = factors.A, factors.B
    if factors.parallel == "column":
        if hasattr(linear, "layer_norm_weight"):
            x = _fused_norm(linear, x)
        x = _dropout(x, factors.dropout, linear.training, per_rank=sp)
        h = F.linear(x.to(A.dtype), A) * factors.scale
        if sp:
            h = mappings.gather_from_sequence_parallel_region(h, group=group)
        else:
            h = mappings.copy_to_tensor_model_parallel_region(h, group=group)
        return F.linear(h, B)
    x = _dropout(x, factors.dropout, linear.training, per_rank=tp > 1)
    h = F.linear(x.to(A.dtype), A) * factors.scale
    if sp:
        h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=group)
    else:
        h = mappings.reduce_from_tensor_model_parallel_region(h, group=group)
    return F.linear(h, B)


# ---------------------------------------------------------------------------------------------
# Adding, initialising, merging
# ---------------------------------------------------------------------------------------------


def lora_linears(model_or_chunks):
    """(global layer number, Target, linear) for every wrapped linear of the chunks."""
    for chunk in as_chunks(model_or_chunks):
        m = unwrap(chunk)
        for layer in m.decoder.layers:
            for target in TARGETS.values():
                linear = getattr(getattr(layer, target.path[0]), target.path[1])
                if isinstance(linear, LoraLinearMixin):
                    yield layer.layer_number - 1, target, linear


def _set_tp_attributes(factors: LoraFactors, sequence_parallel: bool) -> None:
    from megatron.core.tensor_parallel.layers import (
        set_defaults_if_not_set_tensor_model_parallel_attributes,
        set_tensor_model_parallel_attributes,
    )

    for name in ("A", "B"):
        p = getattr(factors, name)
        axis = factors.tp_axis(name)
        if axis is not None:
            set_tensor_model_parallel_attributes(p, True, axis, 1)
        else:
            set_defaults_if_not_set_tensor_model_parallel_attributes(p)
            # Replicated over TP but fed sequence slices: finalize_model_grads sums over TP.
            p.sequence_parallel = sequence_parallel


def add_lora(model_or_chunks, adapters: dict[str, LoraConfig | None],
             router: LoraRouter | None = None, seed: int = 1234) -> LoraRouter:
    """Wrap the target linears of every layer of the chunks with the given adapters
    ({'vision': LoraConfig, 'speech': LoraConfig}; None entries are skipped) and return the
    router that selects among them. Factors are initialised as PEFT does (A uniform in
    +-1/sqrt(in), B zero) from a generator seeded by (seed, layer, target, adapter), the full
    tensor drawn and this rank's shard kept: every TP/PP layout starts from the same adapters.
    Nothing is drawn on the meta device."""
    router = router or LoraRouter()
    adapters = {a: c for a, c in adapters.items() if c is not None}
    if not adapters:
        return router
    for a, cfg in adapters.items():
        adapter_module_name(a)  # known adapter
        unknown = sorted(set(cfg.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"LoRA {a}: unknown targets {unknown}; known: {', '.join(TARGETS)}")
    for chunk in as_chunks(model_or_chunks):
        m = unwrap(chunk)
        for layer in m.decoder.layers:
            for target in TARGETS.values():
                mine = {a: cfg for a, cfg in adapters.items() if target.name in cfg.targets}
                if mine:
                    parent = getattr(layer, target.path[0])
                    wrap_linear(getattr(parent, target.path[1]), target, mine, router, seed,
                                layer.layer_number - 1)
    router.select(InputMode.LANGUAGE)  # a text model runs its `text` adapter from the start
    return router


def wrap_linear(linear: nn.Module, target: Target, adapters: dict[str, LoraConfig],
                router: LoraRouter, seed: int = 1234, layer: int = 0) -> nn.Module:
    """Give one linear (megatron's or TE's, column- or row-parallel as ``target`` says) the
    adapters, in place; ``layer`` (global, 0-based) and ``seed`` pick the initial factors."""
    from megatron.core import parallel_state as ps

    if getattr(linear, "gather_output", False):
        raise ValueError(f"{target.name}: a LoRA cannot wrap a column-parallel linear that "
                         "gathers its output")
    if not isinstance(linear, LoraLinearMixin):
        linear.__class__ = lora_class(type(linear))
        linear._lora_router = router
        linear._lora_target = target
        linear._lora_adapters = ()
        linear._lora_merged = set()
    out_local, in_local = linear.weight.shape
    sp = bool(getattr(linear, "sequence_parallel", False))
    for a, cfg in adapters.items():
        if a in linear._lora_adapters:
            raise ValueError(f"{target.name} of layer {layer} already has a {a} LoRA")
        factors = LoraFactors(cfg, in_local, out_local, target.parallel, linear.weight.dtype,
                              linear.weight.device)
        _set_tp_attributes(factors, sp)
        linear.add_module(adapter_module_name(a), factors)
        linear._lora_adapters += (a,)
        router.adapters.add(a)
        if linear.weight.device.type != "meta":
            _init_factors(factors, seed, layer, target, a,
                          ps.get_tensor_model_parallel_rank(),
                          ps.get_tensor_model_parallel_world_size())
    return linear


def _init_factors(factors: LoraFactors, seed: int, layer: int, target: Target, adapter: str,
                  tp_rank: int, tp_size: int) -> None:
    in_full = factors.A.shape[1] * (tp_size if factors.tp_axis("A") == 1 else 1)
    key = zlib.crc32(f"{seed}/{layer}/{target.name}/{adapter}".encode())
    gen = torch.Generator().manual_seed(key)
    bound = 1.0 / in_full**0.5  # kaiming_uniform(a=sqrt(5)), PEFT's default for A
    full = (torch.rand(factors.rank, in_full, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    if factors.tp_axis("A") == 1 and tp_size > 1:
        full = torch.chunk(full, tp_size, dim=1)[tp_rank]
    with torch.no_grad():
        factors.A.copy_(full)
        factors.B.zero_()


def set_adapter(model_or_chunks, mode) -> str | None:
    """Select the adapter of ``mode`` on the chunks' router; returns the adapter (or None)."""
    routers = {id(linear._lora_router): linear._lora_router
               for _, _, linear in lora_linears(model_or_chunks)}
    chosen = None
    for router in routers.values():
        chosen = router.select(mode)
    return chosen if routers else ADAPTER_FOR_MODE[to_input_mode(mode)]


@torch.no_grad()
def merge_adapter(model_or_chunks, adapter: str) -> int:
    """Fold an adapter into the base weights (W += scale * B @ A, shard by shard) and drop its
    factors; from then on the model runs it in every mode, including language mode (the
    export of one modality as a plain decoder). Returns the number of linears merged."""
    name = adapter_module_name(adapter)
    merged = 0
    for _, _, linear in lora_linears(model_or_chunks):
        if adapter not in linear._lora_adapters:
            continue
        factors = getattr(linear, name)
        w = linear.weight
        delta = (factors.B.float() @ factors.A.float()) * factors.scale
        w.copy_((w.float() + delta).to(w.dtype))
        delattr(linear, name)
        linear._lora_adapters = tuple(a for a in linear._lora_adapters if a != adapter)
        linear._lora_merged.add(adapter)
        merged += 1
    if not merged:
        raise ValueError(f"the model has no {adapter} LoRA to merge")
    return merged


def lora_parameter_count(model_or_chunks, adapter: str) -> int:
    """Parameters of one adapter on this rank."""
    return sum(f.A.numel() + f.B.numel()
               for _, _, linear in lora_linears(model_or_chunks)
               for a, f in linear.lora_factors().items() if a == adapter)
