"""Model checkpoints with megatron ``dist_checkpointing`` (torch_dist format, reshardable).

A checkpoint folder::

    <dir>/                    the dist checkpoint (metadata.json, common.pt, __*.distcp)
    <dir>/phi4_model.json     {"format": "phi4core.decoder/1", "model_config": {...}, ...}

so it loads without knowing the preset (``read_checkpoint_config``), at any TP/PP layout.
Everything is written into a temporary sibling folder and renamed into place, so a reader
never sees half a checkpoint.

Saving spawns a helper process that re-imports ``__main__``: scripts calling this need an
``if __name__ == "__main__":`` guard.

Converters: ``hf_to_phi4(hf_dir, out_dir)`` and ``phi4_to_hf(ckpt_dir, out_dir)``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from phi4core.config import ModelConfig
from phi4core.data.files import replace_dir

META_FILE = "phi4_model.json"
FORMAT = "phi4core.decoder/1"


def _dist():
    import torch.distributed as dist

    return dist


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    dist = _dist()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast_str(s: str | None) -> str:
    dist = _dist()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert s is not None
        return s
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _chunks(model_or_chunks) -> list:
    if isinstance(model_or_chunks, (list, tuple)):
        return list(model_or_chunks)
    return [model_or_chunks]


def _unwrap(m):
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return m


def sharded_model_state_dict(model_or_chunks) -> dict:
    """{'model': ...} (one chunk) or {'model0': ..., 'model1': ...} (virtual pipeline chunks),
    as Megatron-LM lays them out. Sharded keys are global, so any layout loads any other."""
    chunks = _chunks(model_or_chunks)
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(
    model_or_chunks,
    ckpt_dir: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save (collective: every rank calls it). Atomic: a temp sibling folder is renamed over
    ``ckpt_dir`` (an existing checkpoint there is replaced)."""
    from megatron.core import dist_checkpointing

    chunks = _chunks(model_or_chunks)
    if model_cfg is None:
        model_cfg = _unwrap(chunks[0]).model_cfg
    out = Path(ckpt_dir).absolute()
    tmp_name = None
    if _rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_name = f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp = out.parent / _broadcast_str(tmp_name)
    if _rank() == 0:
        tmp.mkdir()
    _barrier()
    try:
        dist_checkpointing.save(sharded_model_state_dict(chunks), str(tmp))
        if _rank() == 0:
            params_dtype = next(_unwrap(chunks[0]).parameters()).dtype
            meta = {
                "format": FORMAT,
                "model_config": model_cfg.model_dump(mode="json"),
                "params_dtype": str(params_dtype).replace("torch.", ""),
                "saved_layout": _layout(),
                **(extra or {}),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            replace_dir(tmp, out)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return out


def _layout() -> dict:
    try:
        from megatron.core import parallel_state as ps

        return {
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        }
    except Exception:
        return {}


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict:
    f = Path(ckpt_dir) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a phi4core checkpoint (no {META_FILE})")
    return json.loads(f.read_text())


def read_checkpoint_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded beside a checkpoint."""
    return ModelConfig.model_validate(read_checkpoint_meta(ckpt_dir)["model_config"])


def load_checkpoint(model_or_chunks, ckpt_dir: str | os.PathLike, strict: bool = True) -> None:
    """Load into this rank's model chunk(s) (collective), resharding from whatever layout the
    checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    chunks = _chunks(model_or_chunks)
    read_checkpoint_meta(ckpt_dir)  # clear error for a non-checkpoint folder
    state = dist_checkpointing.load(sharded_model_state_dict(chunks), str(ckpt_dir))
    if len(chunks) == 1:
        _unwrap(chunks[0]).load_state_dict(state["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            _unwrap(c).load_state_dict(state[f"model{i}"], strict=strict)


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------


def hf_to_phi4(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    params_dtype: str = "fp32",
    parallel=None,
) -> Path:
    """HF Phi3ForCausalLM folder -> phi4core dist checkpoint (+ phi4_model.json).

    Runs in one process (creating a TP=PP=1 state when none exists) or collectively under
    torchrun with ``parallel``; each rank loads only its shard either way."""
    from phi4core.interop.hf import (
        HFCheckpoint,
        load_hf_weights,
        model_config_from_hf,
        read_hf_config,
    )
    from phi4core.models.decoder import PrecisionSettings, build_model_chunks
    from phi4core.parallel import current_settings, init_parallel, init_single_process

    mc = model_config_from_hf(read_hf_config(hf_dir))
    par = init_parallel(parallel) if parallel is not None else init_single_process()
    par = current_settings() or par
    chunks = build_model_chunks(mc, par, PrecisionSettings(params=params_dtype),
                                perform_initialization=False)
    load_hf_weights(chunks, hf_dir, mc)
    hf_dtype = str(HFCheckpoint(hf_dir).dtype()).replace("torch.", "")
    return save_checkpoint(chunks, out_dir, mc,
                           extra={"source": {"hf_dir": str(hf_dir), "hf_dtype": hf_dtype}})


def phi4_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    parallel=None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """phi4core checkpoint -> HF Phi3ForCausalLM folder. ``dtype`` defaults to the dtype of the
    HF folder the checkpoint came from (bit-exact round trip), else the parameters' dtype."""
    from phi4core.interop.hf import save_hf
    from phi4core.models.decoder import PrecisionSettings, build_model_chunks
    from phi4core.parallel import current_settings, init_parallel, init_single_process

    meta = read_checkpoint_meta(ckpt_dir)
    mc = ModelConfig.model_validate(meta["model_config"])
    par = init_parallel(parallel) if parallel is not None else init_single_process()
    par = current_settings() or par
    params = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        meta.get("params_dtype"), "fp32")
    chunks = build_model_chunks(mc, par, PrecisionSettings(params=params),
                                perform_initialization=False)
    load_checkpoint(chunks, ckpt_dir)
    if dtype is None:
        dtype = (meta.get("source") or {}).get("hf_dtype") or meta.get("params_dtype") or "float32"
    return save_hf(chunks, out_dir, mc, dtype=dtype, max_shard_bytes=max_shard_bytes)
