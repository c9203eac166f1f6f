"""Phi-4-Mini as a megatron-core ``GPTModel``.

    model = build_model(preset("phi4_mini_tiny"), ParallelSettings(tp=2), Precision(params="bf16"))

GQA, SwiGLU (gated linear unit + SiLU), RMSNorm (eps from the config), no biases, tied
embeddings, partial rotary (``rotary_percent``) with LongRoPE. The layer spec is Transformer
Engine's when TE imports *and* a GPU is present, megatron's local (pure torch) spec otherwise.
FP8 needs both; asking for it without them raises ``FP8UnavailableError``.

Precision is the stage spec's own ``phi4core.config.Precision`` (no second settings type);
where none is given the model is built in fp32. Parallel state must be initialised first
(``phi4core.parallel.init_parallel``). Importing this module changes nothing: the warning
filters and the CPU shims are set up by the entry points (``phi4core.runtime.init``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from phi4core import dtypes
from phi4core.config import ModelConfig, Precision
from phi4core.models import cpu_fast as cpu_fast_paths
from phi4core.models.attention import use_sdpa_core_attention
from phi4core.models.rope import LongRopeRotaryEmbedding, attach_attention_factor
from phi4core.module_groups import GROUP_NAMES, group_of
from phi4core.parallel import ParallelSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Precision and FP8
# ---------------------------------------------------------------------------------------------


class FP8UnavailableError(RuntimeError):
    """FP8 was asked for where it cannot run (no GPU, or Transformer Engine not importable)."""


def _precision(precision: Precision | None) -> Precision:
    """The given settings, or fp32 without FP8 when none are given."""
    return precision if precision is not None else Precision(params="fp32")


def gpu_available() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def te_importable() -> bool:
    """Transformer Engine's torch bindings import. Only tried with a GPU: on a CPU machine a
    TE install cannot load its CUDA libraries and fails with more than ImportError, so there
    it is treated as absent without trying."""
    if not gpu_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # TE raises more than ImportError when CUDA libraries are missing
        log.warning("Transformer Engine present but not importable: %s", exc)
        return False
    return True


def use_transformer_engine() -> bool:
    return gpu_available() and te_importable()


def check_fp8(precision: Precision | None) -> None:
    """Raise FP8UnavailableError when FP8 is requested but cannot run here."""
    p = _precision(precision)
    if p.fp8 == "off":
        return
    missing = []
    if not gpu_available():
        missing.append("no CUDA GPU is available")
    elif not te_importable():
        missing.append("Transformer Engine (the 'gpu' extra) is not importable")
    if missing:
        raise FP8UnavailableError(
            f"FP8 training (fp8={p.fp8!r}, recipe={p.fp8_recipe!r}) needs a CUDA GPU and "
            f"Transformer Engine, but {' and '.join(missing)}. Set precision.fp8 to off to "
            f"train in {p.params}."
        )


def fp8_recipe(precision: Precision):
    """The Transformer Engine recipe for these settings (raises FP8UnavailableError without
    TE/GPU, ValueError when fp8 is off)."""
    p = _precision(precision)
    if p.fp8 == "off":
        raise ValueError("fp8_recipe() called with precision.fp8 off")
    check_fp8(p)
    from transformer_engine.common import recipe as te_recipe

    fmt = te_recipe.Format.HYBRID if p.fp8 == "hybrid" else te_recipe.Format.E4M3
    if p.fp8_recipe == "delayed":
        return te_recipe.DelayedScaling(
            fp8_format=fmt,
            amax_history_len=p.amax_history,
            amax_compute_algo=p.amax_compute,
        )
    if p.fp8_recipe == "tensorwise":
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.MXFP8BlockScaling(fp8_format=fmt)


def fp8_autocast(precision: Precision | None, group=None):
    """A context manager running TE modules in FP8 (a null context when fp8 is off).

    megatron's TransformerBlock already enters FP8 per layer when the TransformerConfig has
    fp8 set (``transformer_config`` does that); this is for code outside the block.
    """
    p = _precision(precision)
    if p.fp8 == "off":
        return contextlib.nullcontext()
    recipe = fp8_recipe(p)
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):  # TE >= 2.8
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


# ---------------------------------------------------------------------------------------------
# Config and spec
# ---------------------------------------------------------------------------------------------


def transformer_config(
    model_cfg: ModelConfig,
    parallel: ParallelSettings | Any = None,
    precision: Precision | None = None,
    *,
    use_cpu_initialization: bool | None = None,
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
    **overrides: Any,
) -> TransformerConfig:
    """Megatron TransformerConfig for the Phi-3-family decoder (``overrides`` win: e.g.
    recompute_granularity='full', gradient_accumulation_fusion=True on GPU)."""
    par = ParallelSettings.from_any(parallel)
    prec = _precision(precision)
    check_fp8(prec)
    te = use_transformer_engine()
    if not te:
        if par.sequence_parallel and par.tp > 1:
            raise ValueError(
                "sequence_parallel needs the Transformer Engine layer spec (GPU + TE): megatron's "
                "local spec uses torch norms, which do not support it"
            )
        if par.cp > 1:
            raise ValueError(
                "context parallelism (cp > 1) needs Transformer Engine attention (GPU + TE)"
            )
    if use_cpu_initialization is None:
        use_cpu_initialization = not gpu_available()
    dtype = dtypes.to_dtype(prec.params)
    kwargs: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        sequence_parallel=bool(par.sequence_parallel and par.tp > 1),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        bias_activation_fusion=gpu_available(),
        masked_softmax_fusion=False,
        bias_dropout_fusion=gpu_available(),
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # CPU/gloo: the batched isend/irecv path needs CUDA streams.
        batch_p2p_comm=gpu_available(),
        cuda_graph_scope=[],  # the default "full" only warns that it is deprecated
    )
    if par.recompute == "selective":  # core attention (the s x s scores) only
        kwargs.update(recompute_granularity="selective")
    elif par.recompute == "full":  # every layer from its input, one layer per checkpoint
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    if prec.fp8 != "off":
        kwargs.update(
            fp8=prec.fp8,
            fp8_recipe=prec.fp8_recipe,
            fp8_amax_history_len=prec.amax_history,
            fp8_amax_compute_algo=prec.amax_compute,
        )
    kwargs.update(overrides)
    cfg = TransformerConfig(**kwargs)
    if model_cfg.rope_scaling is not None:
        attach_attention_factor(cfg, model_cfg.rope_scaling.attention_factor)
    return cfg


def layer_spec(use_te: bool | None = None, sdpa: bool = True):
    """TE layer spec with a GPU and TE, megatron's local spec (RMSNorm) otherwise; in the
    local spec the core attention is torch SDPA for the plain causal case (``sdpa=False``
    keeps megatron's unfused DotProductAttention)."""
    if use_te is None:
        use_te = use_transformer_engine()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return use_sdpa_core_attention(spec) if sdpa else spec


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Phi4Decoder(GPTModel):
    """megatron GPTModel with LongRoPE in place of plain RoPE; keeps its ModelConfig."""

    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        transformer_layer_spec,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: int | None = None,
        lora_seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        rs = model_cfg.rope_scaling
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=rs.max_position_embeddings if rs else 4096,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_percent=model_cfg.rotary_percent,
            rotary_base=model_cfg.rotary_base,
            vp_stage=vp_stage,
            **kwargs,
        )
        self.model_cfg = model_cfg
        if rs is not None:
            self.rotary_pos_emb = LongRopeRotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=model_cfg.rotary_percent,
                longrope=rs,
                rotary_base=model_cfg.rotary_base,
                rotary_interleaved=config.rotary_interleaved,
                cp_group=self.pg_collection.cp,
            )
        # The fine-tuning adapter (lora.text), if the config has one; language mode runs it.
        # Subclasses add their own adapters on the same router.
        from phi4core.models.lora import TEXT_ADAPTER, add_lora

        self.lora_router = add_lora(self, {TEXT_ADAPTER: model_cfg.lora_text}, seed=lora_seed)


def build_model(
    model_cfg: ModelConfig,
    parallel: ParallelSettings | Any = None,
    precision: Precision | None = None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    parallel_output: bool = True,
    use_te: bool | None = None,
    cpu_fast: bool | None = None,
    config_overrides: dict | None = None,
    model_class: type[Phi4Decoder] | None = None,
    model_kwargs: dict | None = None,
    **config_kwargs: Any,
) -> Phi4Decoder:
    """Build this rank's piece of the decoder (or of ``model_class``, a Phi4Decoder subclass
    given ``model_kwargs`` too: the multimodal model).

    ``pre_process``/``post_process`` default to "first/last pipeline stage" (taking
    ``vp_stage`` into account with virtual pipelining). The parallel state must already be
    initialised with the same tp/pp/cp/vpp (``phi4core.parallel.init_parallel``). On a CPU the
    weights are initialised in full and split (``use_cpu_initialization``), so every TP/PP
    layout starts from the same weights for the same seed.

    On a CPU without Transformer Engine the modules that qualify get their CPU fast paths
    (``phi4core.models.cpu_fast``: the same math, less overhead); ``cpu_fast=False`` keeps
    megatron's modules throughout, ``True`` raises where the fast paths cannot apply.
    """
    par = ParallelSettings.from_any(parallel)
    prec = _precision(precision)
    _check_parallel_state(par)
    if par.vpp is not None and vp_stage is None:
        raise ValueError("virtual pipelining: pass vp_stage, or use build_model_chunks()")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if use_te is None:
        use_te = use_transformer_engine()
    elif use_te and not use_transformer_engine():
        raise RuntimeError("use_te=True but Transformer Engine or a GPU is missing")
    cfg = transformer_config(model_cfg, par, prec, **{**(config_overrides or {}), **config_kwargs})
    model = (model_class or Phi4Decoder)(
        config=cfg,
        model_cfg=model_cfg,
        transformer_layer_spec=layer_spec(use_te),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
        **(model_kwargs or {}),
    )
    if not cfg.use_cpu_initialization and gpu_available() and _default_device_is_cpu():
        model.cuda(torch.cuda.current_device())
    if cpu_fast is None:
        cpu_fast = cpu_fast_paths.applies(use_te)
    elif cpu_fast and not cpu_fast_paths.applies(use_te):
        raise RuntimeError("cpu_fast=True needs a CPU-only torch and the local layer spec")
    if cpu_fast:
        cpu_fast_paths.apply(model)
    return model


def build_model_chunks(
    model_cfg: ModelConfig,
    parallel: ParallelSettings | Any = None,
    precision: Precision | None = None,
    **kwargs: Any,
) -> list[Phi4Decoder]:
    """One model chunk per virtual pipeline stage (a list of one without vpp): the shape
    megatron's schedules and DDP helpers expect."""
    par = ParallelSettings.from_any(parallel)
    if par.vpp is None:
        return [build_model(model_cfg, par, precision, **kwargs)]
    return [
        build_model(model_cfg, par, precision, vp_stage=i, **kwargs) for i in range(par.vpp)
    ]


def _default_device_is_cpu() -> bool:
    return torch.empty(0).device.type == "cpu"


def _check_parallel_state(par: ParallelSettings) -> None:
    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is not initialised: call phi4core.parallel.init_parallel() "
            "(or init_single_process()) before building the model"
        )
    have = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )
    want = (par.tp, par.pp, par.cp)
    if have != want:
        raise RuntimeError(
            f"parallel settings tp/pp/cp={want} differ from the initialised state {have}"
        )


def build_meta_model(
    model_cfg: ModelConfig,
    parallel: ParallelSettings | Any = None,
    precision: Precision | None = None,
    **kwargs: Any,
) -> Phi4Decoder:
    """The same modules with every parameter on the meta device: no memory, no init time.
    For counting parameters and inspecting shapes."""
    with torch.device("meta"):
        return build_model(
            model_cfg,
            parallel,
            precision,
            use_te=False,
            use_cpu_initialization=True,
            perform_initialization=False,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------
# Module groups (freezing)
# ---------------------------------------------------------------------------------------------

# The groups and their parameter-name rules live in phi4core.module_groups (one table for the
# schema, the model, freezing and model-info): the decoder's own parameters are "backbone", the
# multimodal model adds its towers and LoRA adapters under the names that table gives.


def module_group(param_name: str) -> str:
    """The module group ('backbone', 'vision.encoder', 'lora.vision', ...) of a parameter name
    as ``model.named_parameters()`` spells it (DDP's ``module.`` prefixes are ignored)."""
    return group_of(param_name)


def param_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """{group: [parameter names]} for every parameter of ``model``."""
    out: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        out.setdefault(module_group(name), []).append(name)
    return out


def set_trainable(model: torch.nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """requires_grad = (group in trainable) for every parameter; returns trainable counts per
    group. Unknown group names raise ValueError."""
    trainable = set(trainable)
    known = set(model_groups_known(model))
    unknown = trainable - known - set(GROUP_NAMES)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; known: {sorted(known)}")
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = module_group(name)
        p.requires_grad_(g in trainable)
        if g in trainable:
            counts[g] = counts.get(g, 0) + p.numel()
    return counts


def model_groups_known(model: torch.nn.Module) -> list[str]:
    return sorted({module_group(n) for n, _ in model.named_parameters()})
