"""Phi-4-Multimodal: the decoder with its Mixture of LoRAs and pluggable modality towers.

    model = build_multimodal_model(preset("phi4_multimodal_tiny"), towers={"vision": build})
    out = model(input_ids, None, None, input_mode=InputMode.VISION,
                image_pixel_values=..., image_sizes=..., image_attention_mask=...)

``MultimodalModel`` is a ``Phi4Decoder`` (so the backbone keeps its parameter names, checkpoint
keys and HF mapping) with

* the LoRA adapters of its config (``lora_vision``, ``lora_speech``) in every layer
  (phi4core.models.lora), selected per batch by ``input_mode``;
* on the first pipeline stage, the towers: ``self.vision`` and ``self.audio``, modules built by
  the given builders. A tower's contract:

      tower(input_mode=InputMode, **inputs) -> Tensor [n_tokens, hidden_size]

  ``inputs`` are the processor outputs named in ``TOWER_INPUTS`` (those given); the rows are
  the embeddings of every image (clip) of the batch in order: batch row first, then position.
  Its ``encoder`` child (and ``embeddings``, for vision) is the group ``<tower>.encoder``,
  every other parameter ``<tower>.projector`` (phi4core.module_groups). Optional:
  ``unused_parameters(input_mode)``, the parameters a call in that mode leaves out (the audio
  projector the mode does not pick), and ``parameter_counts()``, {row name: count} for
  ``phi4 model-info`` (the reference table's rows, including checkpoint tensors it keeps
  untrained).

Assembly: every placeholder id (``image_token_id`` 200010, ``audio_token_id`` 200011) in
``input_ids`` takes the next row of its tower's output; the ids must already be expanded to
each input's token count (``phi4core.data.placeholders.expand_placeholders``, as the HF
processors do). Under sequence
parallelism each rank writes the rows of its own sequence slice.

Training: a batch that leaves out trainable modules (a tower without inputs, an adapter the mode
does not select) gives them an exact zero gradient through a zero-weighted pass (the output is
returned unchanged), so every data-parallel rank reduces a gradient for every trainable
parameter.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from phi4core.config import ModelConfig
from phi4core.models.decoder import Phi4Decoder, build_meta_model, build_model
from phi4core.models.lora import (
    ADAPTER_FOR_MODE,
    TEXT_ADAPTER,
    InputMode,
    LoraRouter,
    add_lora,
    lora_linears,
    to_input_mode,
)
from phi4core.module_groups import LORA_ADAPTERS, TOWERS

# The processor outputs each tower takes (the argument names of the transformers processors).
TOWER_INPUTS: dict[str, tuple[str, ...]] = {
    "vision": ("image_pixel_values", "image_sizes", "image_attention_mask"),
    "audio": ("audio_input_features", "audio_embed_sizes", "audio_attention_mask"),
}
# The ModelConfig field giving each tower's placeholder id.
PLACEHOLDER_FIELD: dict[str, str] = {"vision": "image_token_id", "audio": "audio_token_id"}
# Where each tower's default builder lives, `build_tower(model_cfg, transformer_config)`; a
# tower whose module does not exist yet is not built (model-info lists it as not built).
DEFAULT_TOWER_BUILDERS: dict[str, str] = {
    "vision": "phi4core.models.vision:build_tower",
    "audio": "phi4core.models.audio:build_tower",
}

TowerBuilder = Callable[[ModelConfig, Any], nn.Module]


def default_tower_builders(model_cfg: ModelConfig) -> dict[str, TowerBuilder]:
    """The builders of the towers this config has whose modules exist."""
    builders: dict[str, TowerBuilder] = {}
    for tower, where in DEFAULT_TOWER_BUILDERS.items():
        if getattr(model_cfg, tower) is None:
            continue
        module_name, attr = where.split(":")
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise AttributeError(f"{module_name} has no {attr}(model_cfg, transformer_config): "
                                 f"the {tower} tower builder phi4core.models.multimodal calls")
        builders[tower] = getattr(module, attr)
    return builders


def write_at_placeholders(embeddings: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                          seq_start: int = 0) -> torch.Tensor:
    """``embeddings`` [s_local, b, h] (this rank's sequence slice from ``seq_start``) with the
    placeholder positions of ``mask`` [b, s] (the whole sequence) replaced by their rows of
    ``rows`` [n, h], ordered by batch row, then position. Out of place, differentiable."""
    b, s = mask.shape
    s_local = embeddings.shape[0]
    index = (mask.reshape(-1).long().cumsum(0) - 1).reshape(b, s)
    local_mask = mask[:, seq_start:seq_start + s_local].t()  # [s_local, b], as embeddings
    if not bool(local_mask.any()):
        return embeddings
    local_rows = rows[index[:, seq_start:seq_start + s_local].t()[local_mask]]
    return embeddings.masked_scatter(local_mask.unsqueeze(-1),
                                     local_rows.to(embeddings.dtype))


class _ZeroGradsFor(torch.autograd.Function):
    """Identity on ``x``; gives each of ``params`` a zero gradient (0 * sum(params), without
    computing the sum or touching x's values)."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        zeros = [torch.zeros((), dtype=dt, device=dev).expand(shape)
                 for shape, dt, dev in ctx.shapes]
        return (grad, *zeros)


def attach_zero_grads(x: torch.Tensor, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``x`` unchanged, its backward also giving each trainable one of ``params`` a zero
    gradient; the output needs a gradient even where x does not (a text batch through a
    frozen backbone: only the idle adapters and towers train)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return x
    return _ZeroGradsFor.apply(x, *params)


class MultimodalModel(Phi4Decoder):
    """The decoder with LoRA adapters and, on the first pipeline stage, the towers."""

    def __init__(self, config, model_cfg: ModelConfig, transformer_layer_spec,
                 pre_process: bool = True, post_process: bool = True,
                 parallel_output: bool = True, vp_stage: int | None = None, *,
                 tower_builders: dict[str, TowerBuilder] | None = None,
                 lora_seed: int = 1234, **kwargs: Any) -> None:
        super().__init__(config, model_cfg, transformer_layer_spec, pre_process=pre_process,
                         post_process=post_process, parallel_output=parallel_output,
                         vp_stage=vp_stage, lora_seed=lora_seed, **kwargs)
        adapters = {a: getattr(model_cfg, g.module) for a, g in LORA_ADAPTERS.items()
                    if a != TEXT_ADAPTER}  # the decoder added that one
        add_lora(self, adapters, router=self.lora_router, seed=lora_seed)
        builders = dict(tower_builders or {})
        unknown = sorted(set(builders) - set(TOWERS))
        if unknown:
            raise ValueError(f"unknown towers {unknown}; known: {', '.join(TOWERS)}")
        for tower in TOWERS:
            module = None
            if pre_process and tower in builders:
                if getattr(model_cfg, tower) is None:
                    raise ValueError(f"model {model_cfg.name!r} has no `{tower}` section for "
                                     f"its {tower} tower")
                module = builders[tower](model_cfg, config)
            setattr(self, tower, module)

    # -- towers ---------------------------------------------------------------------------

    def towers(self) -> dict[str, nn.Module]:
        return {t: getattr(self, t) for t in TOWERS if getattr(self, t) is not None}

    def _embed(self, input_ids, position_ids, mode: InputMode,
               tower_inputs: dict[str, dict[str, Any]]) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)
        sp = self.config.sequence_parallel
        seq_start = ps.get_tensor_model_parallel_rank() * embeddings.shape[0] if sp else 0
        for tower in TOWERS:
            token_id = getattr(self.model_cfg, PLACEHOLDER_FIELD[tower])
            mask = (input_ids == token_id) if token_id is not None else None
            n = int(mask.sum()) if mask is not None else 0
            inputs = tower_inputs[tower]
            if not inputs:
                if n:
                    raise ValueError(f"{n} {tower} placeholder(s) (id {token_id}) in input_ids "
                                     f"but no {TOWER_INPUTS[tower][0]}")
                continue
            module = getattr(self, tower)
            if module is None:
                raise ValueError(f"{TOWER_INPUTS[tower][0]} given but this model has no "
                                 f"{tower} tower")
            if self.config.context_parallel_size > 1:
                raise ValueError("multimodal inputs with context parallelism (cp > 1) are not "
                                 "supported: each CP rank holds pieces of the sequence")
            rows = module(input_mode=mode, **inputs)
            if rows.dim() != 2 or rows.shape != (n, self.config.hidden_size):
                raise ValueError(
                    f"the {tower} tower returned embeddings of shape {tuple(rows.shape)} for "
                    f"{n} placeholder(s) (id {token_id}) in input_ids; expected "
                    f"({n}, {self.config.hidden_size}): expand each placeholder to its "
                    f"input's token count (expand_placeholders)")
            embeddings = write_at_placeholders(embeddings, mask, rows, seq_start)
        return embeddings

    def _idle_trainable(self, mode: InputMode,
                        tower_inputs: dict[str, dict[str, Any]]) -> list[torch.Tensor]:
        """Trainable parameters this batch leaves out."""
        active = ADAPTER_FOR_MODE[mode]
        idle = [p for _, _, linear in lora_linears(self)
                for adapter, f in linear.lora_factors().items() if adapter != active
                for p in (f.A, f.B)]
        for tower, module in self.towers().items():
            if not tower_inputs[tower]:
                idle += list(module.parameters())
            elif hasattr(module, "unused_parameters"):
                idle += list(module.unused_parameters(mode))
        return [p for p in idle if p.requires_grad]

    # -- forward --------------------------------------------------------------------------

    def forward(self, input_ids, position_ids=None, attention_mask=None, decoder_input=None,
                labels=None, *, input_mode: InputMode | int = InputMode.LANGUAGE,
                image_pixel_values=None, image_sizes=None, image_attention_mask=None,
                audio_input_features=None, audio_embed_sizes=None, audio_attention_mask=None,
                **kwargs):
        mode = to_input_mode(input_mode)
        given = dict(image_pixel_values=image_pixel_values, image_sizes=image_sizes,
                     image_attention_mask=image_attention_mask,
                     audio_input_features=audio_input_features,
                     audio_embed_sizes=audio_embed_sizes,
                     audio_attention_mask=audio_attention_mask)
        tower_inputs = {}
        for tower, names in TOWER_INPUTS.items():
            tower_inputs[tower] = {k: given[k] for k in names if given[k] is not None}
            if tower_inputs[tower] and names[0] not in tower_inputs[tower]:
                raise ValueError(f"{', '.join(tower_inputs[tower])} given without {names[0]}")
        self.lora_router.select(mode)
        if self.pre_process and decoder_input is None:
            decoder_input = self._embed(input_ids, position_ids, mode, tower_inputs)
        out = super().forward(input_ids, position_ids, attention_mask,
                              decoder_input=decoder_input, labels=labels, **kwargs)
        if self.training and torch.is_grad_enabled():
            out = attach_zero_grads(out, self._idle_trainable(mode, tower_inputs))
        if out.requires_grad:
            # Activation recomputation reruns layers in backward, after other micro-batches'
            # forwards may have switched the router: switch it back first.
            out.register_hook(_reselect(self.lora_router, mode))
        return out


def _reselect(router: LoraRouter, mode: InputMode):
    def hook(grad):
        router.select(mode)

    return hook


def build_multimodal_model(model_cfg: ModelConfig, parallel=None, precision=None, *,
                           towers: dict[str, TowerBuilder] | None = None, lora_seed: int = 1234,
                           **kwargs: Any) -> MultimodalModel:
    """This rank's piece of the multimodal model (see decoder.build_model for the rest);
    ``towers`` defaults to the builders of the towers that exist (default_tower_builders)."""
    if towers is None:
        towers = default_tower_builders(model_cfg)
    return build_model(model_cfg, parallel, precision, model_class=MultimodalModel,
                       model_kwargs={"tower_builders": towers, "lora_seed": lora_seed},
                       **kwargs)


def build_multimodal_chunks(model_cfg: ModelConfig, parallel=None, precision=None,
                            **kwargs: Any) -> list[MultimodalModel]:
    """One chunk per virtual pipeline stage, as decoder.build_model_chunks."""
    from phi4core.parallel import ParallelSettings

    par = ParallelSettings.from_any(parallel)
    if par.vpp is None:
        return [build_multimodal_model(model_cfg, par, precision, **kwargs)]
    return [build_multimodal_model(model_cfg, par, precision, vp_stage=i, **kwargs)
            for i in range(par.vpp)]


def build_meta_multimodal_model(model_cfg: ModelConfig, parallel=None, precision=None, *,
                                towers: dict[str, TowerBuilder] | None = None,
                                **kwargs: Any) -> MultimodalModel:
    """Every parameter on the meta device (counting, shapes)."""
    if towers is None:
        towers = default_tower_builders(model_cfg)
    return build_meta_model(model_cfg, parallel, precision, model_class=MultimodalModel,
                            model_kwargs={"tower_builders": towers}, **kwargs)
