"""What the image and speech towers share: megatron config defaults, the projector's config,
parameter counting, a tree of persistent buffers for checkpoint weights that never run, and
their distributed-checkpoint entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from phi4core.models.decoder import gpu_available, use_transformer_engine

__all__ = ["BufferTree", "ShardedCheckpointing", "base_config_kwargs", "count", "lecun_normal_",
           "decoder_settings", "place_like_megatron", "projector_config", "tp_group",
           "use_transformer_engine"]


class ShardedCheckpointing:
    """Put in front of ``nn.Module`` for a tower: its distributed-checkpoint entries come from
    each child as megatron's modules do (a tensor-parallel linear's weight sharded on its
    partition dim). A plain ``nn.Module`` would otherwise be saved whole as replicated, every
    TP rank's different shard under the full tensor's key (megatron's default for modules it
    does not know)."""

    sharded_state_dict = MegatronModule.sharded_state_dict


def tp_group():
    """The tensor-parallel group (None before megatron's parallel state is set up)."""
    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


def _tp() -> int:
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def base_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """TransformerConfig fields every tower uses: the initialised tensor parallelism (no
    pipeline or sequence parallelism inside a tower), no dropout, unfused ops that run on CPU."""
    dtype = overrides.get("params_dtype", torch.float32)
    return dict(
        tensor_model_parallel_size=_tp(),
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not gpu_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=gpu_available(),
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],
    )


def decoder_settings(config: TransformerConfig) -> dict[str, Any]:
    """What a tower built inside the multimodal model takes from the decoder's config: its
    parameter dtype, how (and whether) it initialises weights, and whether its layers may be
    Transformer Engine's (not on the meta device, where the model is only counted)."""
    on_meta = torch.empty(0).device.type == "meta"
    return dict(
        dtype=config.params_dtype,
        use_te=use_transformer_engine() and not on_meta,
        use_cpu_initialization=config.use_cpu_initialization,
        perform_initialization=config.perform_initialization,
        init_method_std=config.init_method_std,
    )


def projector_config(out_hidden: int, activation: Callable, **overrides: Any) -> TransformerConfig:
    """A 2-layer MLP projector (in -> out_hidden, activation, out_hidden -> out_hidden, with
    biases) as a megatron TransformerConfig; attention fields are placeholders it never uses."""
    kw = base_config_kwargs(**overrides)
    kw.update(num_layers=1, hidden_size=out_hidden, ffn_hidden_size=out_hidden,
              num_attention_heads=kw["tensor_model_parallel_size"], gated_linear_unit=False,
              activation_func=activation, add_bias_linear=True)
    kw.update({k: v for k, v in overrides.items() if k not in ("params_dtype",)})
    return TransformerConfig(**kw)


def place_like_megatron(module: nn.Module, config: TransformerConfig) -> None:
    """Without CPU initialisation megatron creates its weights on the current GPU: move the
    tower's plain torch parts there too (as build_model does for the decoder)."""
    if (not config.use_cpu_initialization and gpu_available()
            and torch.empty(0).device.type == "cpu"):
        module.cuda(torch.cuda.current_device())


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """LeCun normal in place, as transformers initialises SigLIP's weights: std 1/sqrt(fan_in)
    after truncation at 2 standard deviations (0.8796 is that truncation's std)."""
    std = (1.0 / weight[0].numel()) ** 0.5 / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


def count(module: nn.Module) -> int:
    """Parameters of a module on this rank."""
    return sum(p.numel() for p in module.parameters())


class BufferTree(nn.Module):
    """Persistent buffers at dotted names ({"a.b.weight": shape}), zero until loaded: weights
    a checkpoint carries and a model must round-trip but never runs."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            node: nn.Module = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            node.register_buffer(leaf, torch.zeros(shape, dtype=dtype), persistent=True)


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (TP=1) state dict into this rank's shards: a tensor-parallel parameter takes
    its contiguous slice along megatron's ``partition_dim``, everything else loads whole. Right
    for the towers, whose parallel linears are not gated (no interleaved [gate | up] rows);
    megatron's ``_extra_state`` entries may be absent. Unknown or missing names raise."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    params = dict(module.named_parameters())
    local: dict[str, torch.Tensor] = {}
    for name, full in state.items():
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            dim, size = p.partition_dim, p.shape[p.partition_dim]
            full = full.narrow(dim, rank * size, size)
        local[name] = full
    missing, unexpected = module.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the module: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
