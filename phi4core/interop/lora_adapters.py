"""One LoRA adapter on its own, as a PEFT folder (the layout of Phi-4-multimodal-instruct's
``vision-lora/`` and ``speech-lora/``):

    <dir>/adapter_config.json          {"peft_type": "LORA", "r": 256, "lora_alpha": 512, ...}
    <dir>/adapter_model.safetensors    base_model.model.model.layers.N.<module>.lora_{A,B}.weight

Tensors are whole (gathered over TP and PP) in the Hugging Face row layout: the fused qkv B as
[q | k | v], gate_up B as [gate | up]. So a folder saved at one TP/PP layout loads at any other,
and PEFT loads it onto the HF model. Saving is collective (global rank 0 writes, atomically);
loading reads this rank's layers and shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from phi4core import dtypes, parallel
from phi4core.files import atomic_dir, follow_umask, json_text
from phi4core.interop.hf import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ConversionError,
    _gather_to_rank0,
    _tp,
    copy_shard,
    gather_tp,
)
from phi4core.interop.hf_mapping import TRANSFORMS, Row, find_row, shapes_for
from phi4core.models.chunks import as_chunks, unwrap
from phi4core.models.lora import Target, lora_linears


def peft_key(layer: int, target: Target, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{target.hf_module}.lora_{factor}.weight"


def factor_row(target: Target, adapter: str, factor: str) -> Row:
    """The mapping table's row of one factor (its TP split and row-layout transform)."""
    row, _ = find_row(f"decoder.layers.0.{'.'.join(target.path)}.lora_{adapter}.{factor}")
    return row


def adapter_state_dict(model_or_chunks, adapter: str,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """This rank's layers' factors of ``adapter``, whole over TP, in the HF layout and PEFT
    naming. Collective over the TP group."""
    out: dict[str, torch.Tensor] = {}
    chunks = as_chunks(model_or_chunks)
    mc = unwrap(chunks[0]).model_cfg
    with torch.no_grad():
        for layer, target, linear in lora_linears(chunks):
            factors = linear.lora_factors().get(adapter)
            if factors is None:
                continue
            for factor in ("A", "B"):
                row = factor_row(target, adapter, factor)
                full = gather_tp(row.tp, getattr(factors, factor).detach())
                (full,) = TRANSFORMS[row.transform].to_hf(full, shapes_for("decoder", mc))
                out[peft_key(layer, target, factor)] = (
                    full.to(dtype) if dtype is not None else full).contiguous().cpu()
    return out


def adapter_config(model_or_chunks, adapter: str) -> dict:
    ranks, scales, dropouts, targets = set(), set(), set(), []
    for _, target, linear in lora_linears(model_or_chunks):
        f = linear.lora_factors().get(adapter)
        if f is not None:
            ranks.add(f.rank)
            scales.add(f.scale)
            dropouts.add(f.dropout)
            if target.name not in targets:
                targets.append(target.name)
    if not ranks:
        raise ValueError(f"the model has no {adapter} LoRA")
    (r,), (scale,), (dropout,) = ranks, scales, dropouts
    alpha = round(scale * r, 6)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "base_model_name_or_path": None,
    }


def save_adapter(model_or_chunks, adapter: str, out_dir: str | os.PathLike,
                 dtype: torch.dtype | str | None = None,
                 config_update: dict | None = None) -> Path:
    """Write one adapter as a PEFT folder (collective: every rank calls, global rank 0
    writes into a temporary sibling renamed into place); ``config_update``: fields of
    adapter_config.json to set (the base model's name, target patterns)."""
    from safetensors.torch import save_file

    chunks = as_chunks(model_or_chunks)
    config = {**adapter_config(chunks, adapter), **(config_update or {})}
    tensors = adapter_state_dict(chunks, adapter,
                                 dtypes.to_dtype(dtype) if dtype is not None else None)
    merged = _gather_to_rank0(tensors)
    out = Path(out_dir)
    if merged is not None:
        with atomic_dir(out) as tmp:
            save_file(merged, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            follow_umask(tmp / ADAPTER_WEIGHTS)
            (tmp / ADAPTER_CONFIG).write_text(json_text(config, indent=2))
    parallel.barrier()
    return out


def read_adapter_config(folder: str | os.PathLike) -> dict:
    f = Path(folder) / ADAPTER_CONFIG
    if not f.is_file():
        raise ConversionError(f"no {ADAPTER_CONFIG} in {folder} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{f}: not valid JSON ({exc})") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{f}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ConversionError(f"{f}: field {key!r} is missing or not a number")
    return cfg


def load_adapter(model_or_chunks, adapter: str, folder: str | os.PathLike) -> int:
    """Copy a PEFT adapter folder into the model's ``adapter`` factors, each rank its layers'
    shards. Rank, alpha and shapes must match the model's adapter. Returns tensors loaded."""
    from safetensors import safe_open

    cfg = read_adapter_config(folder)
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConversionError(f"no {ADAPTER_WEIGHTS} in {folder}")
    chunks = as_chunks(model_or_chunks)
    mc = unwrap(chunks[0]).model_cfg
    rank, size = _tp()
    loaded = 0
    with safe_open(str(weights), framework="pt", device="cpu") as f, torch.no_grad():
        names = set(f.keys())
        for layer, target, linear in lora_linears(chunks):
            factors = linear.lora_factors().get(adapter)
            if factors is None:
                continue
            if factors.rank != cfg["r"] or abs(factors.scale * factors.rank
                                               - cfg["lora_alpha"]) > 1e-6:
                raise ConversionError(
                    f"{folder}: adapter r={cfg['r']} alpha={cfg['lora_alpha']:g} but the model's "
                    f"{adapter} LoRA has r={factors.rank} alpha={factors.scale * factors.rank:g}")
            for factor in ("A", "B"):
                key = peft_key(layer, target, factor)
                if key not in names:
                    raise ConversionError(f"{weights}: tensor {key!r} is missing")
                row = factor_row(target, adapter, factor)
                full = TRANSFORMS[row.transform].to_phi4([f.get_tensor(key)],
                                                         shapes_for("decoder", mc))
                copy_shard(getattr(factors, factor), row, full, rank, size,
                           f"{weights}: {key} gives")
                loaded += 1
    return loaded

