"""Hugging Face folders <-> phi4core models: ``Phi3ForCausalLM`` (the decoder) and
``Phi4MultimodalForCausalLM`` (decoder, towers and LoRA adapters; see ``hf_multimodal``).

Every tensor goes through the one table of ``hf_mapping`` (name, layout transform, TP split),
read one way to import and inverted to export.

Reading: ``config.json`` (LongRoPE spelled ``rope_scaling: {type: longrope}`` as transformers 4.x
and the released Phi-4-mini do, or ``rope_parameters: {rope_type: longrope}`` as 5.x writes),
and single-file or sharded (``model.safetensors.index.json``) safetensors with fused
``qkv_proj``/``gate_up_proj`` (split ``q/k/v_proj``, ``gate/up_proj`` are accepted too). Each
rank takes its own TP shard of the layers of its PP stage.

Writing: a ``config.json`` in the released Phi-4-mini layout (loads in transformers 4.x and
5.x), or the multimodal one with every field set, plus safetensors (sharded with an index
above ``max_shard_bytes``) and the adapters' PEFT folders.

Any mismatch raises ``ConversionError`` naming the field or tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from phi4core import dtypes
from phi4core.config import LongRopeConfig, ModelConfig, Precision
from phi4core.files import atomic_dir, follow_umask, json_text
from phi4core.interop.hf_mapping import (
    TABLE,
    TRANSFORMS,
    Row,
    find_row,
    shapes_for,
    tp_shard,
    tp_unshard,
)
from phi4core.models.chunks import as_chunks, unwrap
from phi4core.module_groups import group_of as module_group

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder's files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
# A tokenizer folder's files, as transformers writes them (whichever are present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")


class ConversionError(ValueError):
    """A Hugging Face folder or config that does not fit the phi4core decoder (or back)."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise ConversionError(f"no config.json in {path}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{f}: not valid JSON ({exc})") from exc


def _req(cfg: dict, key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConversionError(f"HF config is missing the field {key!r}")
    return cfg[key]


def _first_id(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else default
    return int(v)


MULTIMODAL_TYPES = ("phi4_multimodal", "phi4mm")


def model_config_from_hf(cfg: dict, name: str | None = None,
                         folder: str | os.PathLike | None = None) -> ModelConfig:
    """ModelConfig from a ``config.json`` dict: a Phi-3 decoder (4.x or 5.x spelling), or
    Phi-4-Multimodal (transformers' ``phi4_multimodal``, whose LoRA adapters are read from
    the PEFT folders beside it in ``folder``, or the original ``phi4mm``)."""
    model_type = cfg.get("model_type")
    if model_type in MULTIMODAL_TYPES:
        from phi4core.interop.hf_multimodal import multimodal_config_from_hf

        return multimodal_config_from_hf(cfg, name, folder)
    archs = cfg.get("architectures") or []
    if model_type != "phi3":
        raise ConversionError(
            f"config field 'model_type' is {model_type!r}: expected a Phi-3-family decoder "
            f"('phi3', Phi3ForCausalLM, as Phi-4-mini ships) or Phi-4-Multimodal "
            f"('phi4_multimodal', Phi4MultimodalForCausalLM; or the original 'phi4mm')"
        )
    if archs and not any(a in ("Phi3ForCausalLM", "Phi3Model") for a in archs):
        raise ConversionError(f"config field 'architectures' is {archs}: expected Phi3ForCausalLM")
    return ModelConfig(**decoder_fields_from_hf(cfg, name))


def decoder_fields_from_hf(cfg: dict, name: str | None = None) -> dict:
    """The ModelConfig fields of the decoder of a Phi-3 or Phi-4-Multimodal config."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config field 'hidden_act' is {act!r}: "
                              "the decoder uses SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias", "lm_head_bias"):
        if cfg.get(flag):
            raise ConversionError(f"config field {flag!r} is true: the decoder has no biases")

    hidden = int(_req(cfg, "hidden_size"))
    heads = int(_req(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    max_pos = int(cfg.get("max_position_embeddings") or 4096)

    # RoPE: 4.x `rope_scaling` or 5.x `rope_parameters`; theta/partial factor may sit inside.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConversionError(f"config field 'rope_scaling' must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("su", "yarn"):  # transformers maps Phi-3's legacy names to longrope
        rope_type = "longrope"
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    partial = float(cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)))
    # transformers gives the top-level original_max_position_embeddings priority (Phi3).
    original = cfg.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings"
    )
    scaling = None
    if rope_type == "longrope":
        original = int(original or max_pos)
        short = rope.get("short_factor")
        long_ = rope.get("long_factor")
        if short is None or long_ is None:
            raise ConversionError("rope_scaling (longrope) needs 'short_factor' and 'long_factor'")
        scaling = LongRopeConfig(
            short_factor=[float(x) for x in short],
            long_factor=[float(x) for x in long_],
            original_max_position_embeddings=original,
            max_position_embeddings=max_pos,
        )
        factor = rope.get("factor")
        if factor is not None and not math.isclose(float(factor), max_pos / original):
            if rope.get("attention_factor") is None:
                raise ConversionError(
                    f"rope_scaling 'factor' {factor} differs from max/original "
                    f"({max_pos}/{original}); that attention factor is not supported"
                )
        af = rope.get("attention_factor")
        if af is not None and not math.isclose(float(af), scaling.attention_factor, rel_tol=1e-9):
            raise ConversionError(
                f"rope_scaling 'attention_factor' {af} differs from the LongRoPE default "
                f"{scaling.attention_factor} (sqrt(1 + ln(max/original)/ln(original)))"
            )
    elif rope_type not in ("default", None):
        raise ConversionError(
            f"rope type {rope_type!r} is not supported (expected 'longrope' or none)"
        )
    sw = cfg.get("sliding_window")
    if sw is not None and int(sw) < max_pos:
        raise ConversionError(
            f"config field 'sliding_window' is {sw} (< max_position_embeddings {max_pos}): "
            "sliding-window attention is not supported"
        )
    if name is None:
        src = cfg.get("_name_or_path") or ""
        name = Path(src).name if src else "hf_phi3"
    fields = dict(
        name=name or "hf_phi3",
        vocab_size=int(_req(cfg, "vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(_req(cfg, "intermediate_size")),
        num_layers=int(_req(cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        rotary_percent=partial,
        rotary_base=theta,
        rope_scaling=scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(cfg.get("bos_token_id"), 1),
        eos_token_id=_first_id(cfg.get("eos_token_id"), 32000),
        pad_token_id=_first_id(cfg.get("pad_token_id"), 32000),
    )
    try:
        ModelConfig(**fields)
    except ValueError as exc:  # pydantic validation (e.g. factor list lengths)
        raise ConversionError(f"HF config does not make a valid ModelConfig: {exc}") from exc
    return fields


def hf_config_from_model_config(mc: ModelConfig, dtype: torch.dtype | str = "float32") -> dict:
    """A ``config.json`` dict in the released Phi-4-mini layout: top-level rope_theta,
    partial_rotary_factor, original_max_position_embeddings, and a three-key
    ``rope_scaling: {type: longrope, short_factor, long_factor}`` (what 4.x validates; 5.x
    reads the same into ``rope_parameters``)."""
    if mc.vision is not None or mc.audio is not None:
        raise ConversionError(
            f"model {mc.name!r} has multimodal towers: export the decoder with a text-only config"
        )
    dtype_name = dtypes.long_name(dtype)
    rs = mc.rope_scaling
    max_pos = rs.max_position_embeddings if rs else 4096
    cfg: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups,
        "hidden_act": "silu",
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rotary_base,
        "partial_rotary_factor": mc.rotary_percent,
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": rs.original_max_position_embeddings if rs else max_pos,
        "rope_scaling": (
            {"type": "longrope", "short_factor": list(rs.short_factor),
             "long_factor": list(rs.long_factor)}
            if rs
            else None
        ),
        "tie_word_embeddings": mc.tie_embeddings,
        "bos_token_id": mc.bos_token_id,
        "eos_token_id": mc.eos_token_id,
        "pad_token_id": mc.pad_token_id,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "sliding_window": None,
        "use_cache": True,
        "torch_dtype": dtype_name,
    }
    if mc.kv_channels * mc.num_attention_heads != mc.hidden_size:
        cfg["head_dim"] = mc.kv_channels
    return cfg


# ---------------------------------------------------------------------------------------------
# Safetensors reading
# ---------------------------------------------------------------------------------------------


class HFCheckpoint:
    """Lazy access to the tensors of an HF folder (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike, single_file: str = SAFE_SINGLE):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / SAFE_INDEX
        single = self.path / single_file
        if single_file == SAFE_SINGLE and index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            if not weight_map:
                raise ConversionError(f"{index}: empty weight_map")
        elif single.is_file():
            weight_map = None
        else:
            raise ConversionError(
                f"no {single_file} or {SAFE_INDEX} in {self.path} (only safetensors are read)"
            )
        self._handles: dict[str, Any] = {}
        self._safe_open = safe_open
        if weight_map is None:
            h = self._open(single_file)
            weight_map = {k: single_file for k in h.keys()}
        self.weight_map: dict[str, str] = weight_map

    def _open(self, fname: str):
        if fname not in self._handles:
            f = self.path / fname
            if not f.is_file():
                raise ConversionError(f"shard {fname} listed in the index is missing "
                                      f"from {self.path}")
            self._handles[fname] = self._safe_open(str(f), framework="pt", device="cpu")
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} is missing from the HF checkpoint {self.path}")
        return self._open(self.weight_map[name]).get_tensor(name)

    def dtype(self) -> torch.dtype:
        first = next(iter(self.weight_map))
        return self.get(first).dtype


# ---------------------------------------------------------------------------------------------
# Moving tensors through the table (phi4core.interop.hf_mapping)
# ---------------------------------------------------------------------------------------------


def qkv_hf_to_megatron(w: torch.Tensor, mc: ModelConfig) -> torch.Tensor:
    """[q(all heads); k; v] -> megatron's per-query-group [q_g; k_g; v_g] blocks."""
    return TRANSFORMS["grouped_qkv"].to_phi4([w], shapes_for("decoder", mc))


def qkv_megatron_to_hf(w: torch.Tensor, mc: ModelConfig) -> torch.Tensor:
    (out,) = TRANSFORMS["grouped_qkv"].to_hf(w, shapes_for("decoder", mc))
    return out


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def gather_tp(tp: str, t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every TP rank's shard (collective over the TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    size = ps.get_tensor_model_parallel_world_size()
    if size == 1 or tp == "replicated":
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return tp_unshard(tp, parts)


def model_tensors(chunks):
    """(phi4core name, tensor, row, placeholder values with the global layer number) for every
    parameter and persistent buffer of the chunks (megatron's ``_extra_state`` left out).
    A tensor without a row is a ConversionError."""
    for chunk in chunks:
        m = unwrap(chunk)
        layer_no = {i: layer.layer_number - 1 for i, layer in enumerate(m.decoder.layers)}
        for name, t in m.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor) or name.endswith("_extra_state"):
                continue
            found = find_row(name)
            if found is None:
                raise ConversionError(f"no Hugging Face counterpart for the model tensor {name!r}")
            row, values = found
            if "L" in values:
                values = {**values, "L": str(layer_no[int(values["L"])])}
            yield name, t, row, values


def _adapter_of(row: Row, values: dict) -> str | None:
    return values.get("a") if row.where == "adapter" else None


def load_hf_weights(model_or_chunks, hf_dir: str | os.PathLike,
                    model_cfg: ModelConfig | None = None) -> int:
    """Copy an HF folder into this rank's model chunk(s), each tensor its TP shard of the
    layers the rank holds. A Phi3ForCausalLM folder fills the backbone only (a multimodal
    model's towers and adapters come from elsewhere); a multimodal folder (transformers' with
    its PEFT adapter folders, or the original phi4mm) fills every tensor. Shapes are checked
    against the config and the model. Returns the number of tensors loaded."""
    from phi4core.interop.hf_multimodal import open_hf_source

    chunks = as_chunks(model_or_chunks)
    source = open_hf_source(hf_dir)
    if model_cfg is None:
        model_cfg = source.model_config
    keep = (lambda name: module_group(name) == "backbone") if source.backbone_only else None
    loaded = load_from_source(chunks, source, model_cfg, keep)
    whole = all(unwrap(c).pre_process and unwrap(c).post_process for c in chunks)
    if whole and not source.backbone_only:  # nothing of the folder may be left behind
        check_all_used(source, model_cfg)
    return loaded


def load_from_source(chunks, source, model_cfg: ModelConfig, keep=None) -> int:
    """Copy the tensors of ``source`` (an HFSource) into this rank's chunks, each its TP shard
    through the table; ``keep(name)``: only the model tensors it accepts (None: all)."""
    hf_dir = source.path
    rank, size = _tp()
    loaded = 0
    with torch.no_grad():
        for name, p, row, values in model_tensors(chunks):
            if keep is not None and not keep(name):
                continue
            full = _read_row(source, row, values, name, model_cfg)
            copy_shard(p, row, full, rank, size,
                       f"{hf_dir}: {', '.join(row.hf_names(values))} gives {name!r}")
            loaded += 1
    return loaded


def copy_shard(p: torch.Tensor, row: Row, full: torch.Tensor, rank: int, size: int,
               what: str) -> None:
    """This TP rank's shard of ``full`` into ``p`` (``what`` names the source in the error
    when the shapes differ)."""
    shard = tp_shard(row.tp, full, rank, size)
    if tuple(shard.shape) != tuple(p.shape):
        raise ConversionError(f"{what} a shard of shape {tuple(shard.shape)}, the model's is "
                              f"{tuple(p.shape)}")
    p.copy_(shard.to(p.dtype))


def check_all_used(source, model_cfg: ModelConfig) -> None:
    """Every tensor of ``source`` was read (a tied lm_head excepted), else ConversionError."""
    unused = sorted(f"{n} ({a} LoRA)" if a else n for n, a in source.unused()
                    if not (n == "lm_head.weight" and model_cfg.tie_embeddings))
    if unused:
        raise ConversionError(
            f"{source.path}: {len(unused)} tensor(s) have no place in the model: "
            f"{', '.join(unused[:5])}{'...' if len(unused) > 5 else ''}")


def _read_row(source, row: Row, values: dict, name: str, mc: ModelConfig) -> torch.Tensor:
    adapter = _adapter_of(row, values)
    names = row.hf_names(values)
    if row.tied_to is not None and (mc.tie_embeddings or not source.has(names[0])):
        if not mc.tie_embeddings:
            raise ConversionError(f"tensor {names[0]!r} is missing and tie_word_embeddings "
                                  "is false")
        names = [row.tied_to]
    if not all(source.has(n, adapter) for n in names) and row.alternatives:
        alt = [n.format(**values) for n in row.alternatives]
        if all(source.has(n, adapter) for n in alt):
            names = [torch.cat([source.get(n, adapter) for n in alt], 0)]
    tensors = [n if isinstance(n, torch.Tensor) else source.get(n, adapter) for n in names]
    return TRANSFORMS[row.transform].to_phi4(tensors, shapes_for(name, mc))


def state_from_hf(module: torch.nn.Module, phi4_prefix: str, hf_tensor, model_cfg: ModelConfig
                  ) -> dict[str, torch.Tensor]:
    """A module's whole (TP=1) state dict from Hugging Face tensors, through the table:
    ``phi4_prefix`` is the module's place in the model (``vision.``), ``hf_tensor(name)``
    returns an HF tensor by its full name (a tower on its own, for instance)."""
    out = {}
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor) or name.endswith("_extra_state"):
            continue
        found = find_row(phi4_prefix + name)
        if found is None:
            raise ConversionError(f"no Hugging Face counterpart for {phi4_prefix + name!r}")
        row, values = found
        tensors = [hf_tensor(n) for n in row.hf_names(values)]
        out[name] = TRANSFORMS[row.transform].to_phi4(tensors, shapes_for(phi4_prefix + name,
                                                                          model_cfg))
    return out


def hf_state_dict(model_or_chunks, model_cfg: ModelConfig,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """This rank's model tensors (no LoRA factors) as whole (TP-gathered) HF tensors.
    Collective over the TP group."""
    return hf_state_dicts(model_or_chunks, model_cfg, dtype)["model"]


def hf_state_dicts(model_or_chunks, model_cfg: ModelConfig, dtype: torch.dtype | None = None,
                   backbone_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's tensors as whole (TP-gathered) HF tensors: {"model": {name: tensor}, and
    per LoRA adapter, "vision"/"speech": {name without the PEFT prefix: tensor}}; with
    ``backbone_only`` the decoder's only (a Phi3ForCausalLM export). Collective over the TP
    group."""
    chunks = as_chunks(model_or_chunks)
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}}
    with torch.no_grad():
        for name, p, row, values in model_tensors(chunks):
            if backbone_only and module_group(name) != "backbone":
                continue
            full = gather_tp(row.tp, p.detach())
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            names = row.hf_names(values)
            if row.tied_to is not None and model_cfg.tie_embeddings:
                continue
            where = _adapter_of(row, values) or "model"
            parts = TRANSFORMS[row.transform].to_hf(full, shapes_for(name, model_cfg))
            for n, t in zip(names, parts):
                out.setdefault(where, {})[n] = t.contiguous().cpu()
    return out


def _gather_to_rank0(local: dict) -> dict | None:
    """Union of every PP stage's tensors on global rank 0 (TP rank 0, DP rank 0 send); a dict
    of dicts (``hf_state_dict``) is merged one level down."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from phi4core import parallel

    if parallel.world_size() == 1:
        return local
    send = local if (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
                     and ps.get_context_parallel_rank() == 0) else {}
    gathered: list[Any] | None = [None] * parallel.world_size() if parallel.rank() == 0 else None
    dist.gather_object(send, gathered, dst=0)
    if parallel.rank() != 0:
        return None
    merged: dict = {}
    for part in gathered:
        for k, v in (part or {}).items():
            if isinstance(v, dict):
                merged.setdefault(k, {}).update(v)
            else:
                merged[k] = v
    return merged


def copy_tokenizer(src: str | os.PathLike | None, dst: Path) -> list[str]:
    """Copy the tokenizer files found in folder `src` into `dst`; returns their names."""
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def write_hf_folder(
    tensors: dict[str, torch.Tensor],
    hf_config: dict,
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | os.PathLike | None = None,
    adapters: dict[str, tuple[dict[str, torch.Tensor], dict]] | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes), the
    tokenizer files of `tokenizer_dir` and each of `adapters` ({folder name: (tensors by PEFT
    key, adapter_config)}) as a PEFT folder, into a temporary sibling folder and rename it into
    place."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        names = sorted(tensors, key=_hf_sort_key)
        shards: list[list[str]] = [[]]
        size = 0
        for n in names:
            nb = tensors[n].numel() * tensors[n].element_size()
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(n)
            size += nb
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file({n: tensors[n] for n in shards[0]}, str(tmp / SAFE_SINGLE), metadata=meta)
        else:
            weight_map = {}
            total = len(shards)
            for i, group in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{total:05d}.safetensors"
                save_file({n: tensors[n] for n in group}, str(tmp / fname), metadata=meta)
                weight_map.update({n: fname for n in group})
            total_size = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / SAFE_INDEX).write_text(
                json_text({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                          indent=2)
            )
        (tmp / "config.json").write_text(json_text(hf_config, indent=2))
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json_text({**gen, "_from_model_config": True},
                                                              indent=2))
        copy_tokenizer(tokenizer_dir, tmp)
        for folder, (adapter_tensors, adapter_cfg) in (adapters or {}).items():
            (tmp / folder).mkdir()
            save_file(adapter_tensors, str(tmp / folder / ADAPTER_WEIGHTS), metadata=meta)
            follow_umask(tmp / folder / ADAPTER_WEIGHTS)
            (tmp / folder / ADAPTER_CONFIG).write_text(json_text(adapter_cfg, indent=2))
        for written in tmp.glob("*.safetensors"):
            follow_umask(written)  # safetensors writes its files 0600
    return out


def _hf_sort_key(name: str):
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def save_hf(
    model_or_chunks,
    out_dir: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path | None:
    """Write the model (and the tokenizer files of `tokenizer_dir`, if given) as a
    Phi3ForCausalLM folder, or with towers as a Phi4MultimodalForCausalLM folder with each
    LoRA adapter the model still has (not merged) as a PEFT folder (``vision-lora/``,
    ``speech-lora/``). Collective: every rank calls it; global rank 0 writes. ``dtype``
    defaults to the parameters' dtype."""
    from phi4core import parallel
    from phi4core.interop import hf_multimodal

    chunks = as_chunks(model_or_chunks)
    if model_cfg is None:
        model_cfg = unwrap(chunks[0]).model_cfg
    dtype = dtypes.to_dtype(dtype if dtype is not None
                            else next(unwrap(chunks[0]).parameters()).dtype)
    multimodal = hf_multimodal.is_multimodal(model_cfg)
    if multimodal:
        hf_cfg = hf_multimodal.hf_config_from_model_config(model_cfg, dtype)
        lora_cfgs = hf_multimodal.adapter_configs(chunks)
    else:
        text = model_cfg.model_copy(update={"lora_vision": None, "lora_speech": None})
        hf_cfg = hf_config_from_model_config(text, dtype)
        lora_cfgs = {}
        if hf_multimodal.adapter_configs(chunks):
            log.warning("%s gets the decoder only: its LoRA adapters are not part of a "
                        "Phi3ForCausalLM folder (save them with lora_adapters.save_adapter, or "
                        "merge them first)", out_dir)
    local = hf_state_dicts(chunks, model_cfg, dtype, backbone_only=not multimodal)
    merged = _gather_to_rank0(local)
    result = None
    if merged is not None:
        tensors = merged.pop("model")
        if not multimodal:
            _check_complete(tensors, model_cfg)
        adapters = {f"{a}-lora": ({PEFT_PREFIX + k: v for k, v in t.items()}, lora_cfgs[a])
                    for a, t in merged.items()}
        result = write_hf_folder(tensors, hf_cfg, out_dir, max_shard_bytes, tokenizer_dir,
                                 adapters)
    parallel.barrier()
    return result if result is not None else Path(out_dir)


def expected_hf_names(mc: ModelConfig) -> list[str]:
    """The tensors of a Phi3ForCausalLM folder of this config."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not mc.tie_embeddings:
        names.append("lm_head.weight")
    for row in TABLE:
        if row.phi4.startswith("decoder.layers.{L}.") and row.where == "model" \
                and "layer_norm_weight" not in row.phi4:
            names += [n.format(L=L) for L in range(mc.num_layers) for n in row.hf]
    return names


def _check_complete(tensors: dict, mc: ModelConfig) -> None:
    missing = [n for n in expected_hf_names(mc) if n not in tensors]
    if missing:
        raise ConversionError(f"export is missing tensors: "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}")


# ---------------------------------------------------------------------------------------------
# A ready-to-call model from an HF folder
# ---------------------------------------------------------------------------------------------


class HFLoadedModel(torch.nn.Module):
    """``forward(input_ids [b, s]) -> float32 logits [b, s, vocab]`` (gathered over TP)."""

    def __init__(self, model, model_cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.model_cfg = model_cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.model(input_ids.to(device), None, None)
        return logits.float()


class HFLoadedMultimodalModel(HFLoadedModel):
    """``forward(input_ids, input_mode, <the processors' outputs>) -> float32 logits``; the
    placeholders in ``input_ids`` already expanded, as the processor returns them."""

    def forward(self, input_ids: torch.Tensor, input_mode=0, image_pixel_values=None,
                image_sizes=None, image_attention_mask=None, audio_input_features=None,
                audio_embed_sizes=None) -> torch.Tensor:
        device = next(self.model.parameters()).device

        def on(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        logits = self.model(on(input_ids), None, None, input_mode=input_mode,
                            image_pixel_values=on(image_pixel_values),
                            image_sizes=on(image_sizes),
                            image_attention_mask=on(image_attention_mask),
                            audio_input_features=on(audio_input_features),
                            audio_embed_sizes=on(audio_embed_sizes))
        return logits.float()


def build_model_for(mc: ModelConfig, parallel, precision, **kwargs):
    """The decoder, or for a config with towers the multimodal model (one chunk per virtual
    pipeline stage)."""
    from phi4core.interop.hf_multimodal import is_multimodal

    if is_multimodal(mc) or mc.lora_vision is not None or mc.lora_speech is not None:
        from phi4core.models.multimodal import build_multimodal_chunks

        return build_multimodal_chunks(mc, parallel, precision, **kwargs)
    from phi4core.models.decoder import build_model_chunks

    return build_model_chunks(mc, parallel, precision, **kwargs)


def load_hf_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    parallel=None,
) -> HFLoadedModel:
    """Build the model of an HF folder and load its weights: for a Phi-3 folder the decoder
    (``forward(input_ids)``), for a Phi-4-Multimodal one (either layout) the multimodal model
    with its towers and adapters (``HFLoadedMultimodalModel``).

    Initialises single-process distributed + parallel state when none exists (with
    ``parallel`` given, that layout instead; PP must be 1 to produce logits in one forward).
    """
    from phi4core.interop.hf_multimodal import is_multimodal
    from phi4core.parallel import ParallelSettings, ensure_parallel

    mc = model_config_from_hf(read_hf_config(path), folder=path)
    par = ensure_parallel(parallel)
    if par.pp != 1:
        raise ValueError("load_hf_model gives logits in one forward: it needs pp=1")
    prec = Precision(params=dtypes.short_name(dtype))
    (model,) = build_model_for(mc, ParallelSettings(tp=par.tp, cp=par.cp), prec,
                               parallel_output=False, perform_initialization=False)
    load_hf_weights(model, path, mc)
    model.eval()
    wrapper = HFLoadedMultimodalModel if is_multimodal(mc) else HFLoadedModel
    return wrapper(model, mc)
