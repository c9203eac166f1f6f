"""The trainer's resume checkpoints: model + optimizer + RNG + progress, rotated, with fallback.

Not the published model (that is `phi4core.model_weights`, weights and config only); these are
what a stopped stage resumes from.

    <stage_dir>/checkpoints/tmp.step_N/   written by every rank (megatron dist checkpoint)
    <stage_dir>/checkpoints/step_N/       renamed by rank 0 after a barrier
    <stage_dir>/checkpoints/step_N/phi4_model.json   the model config and dtype, as a weights
                                          folder has it: a step_N converts and loads as one
    <stage_dir>/checkpoints/step_N/meta.json   written last: the completeness mark, with every
                                          file's size and sha256 so a garbled one is noticed
Resume takes the newest complete, intact checkpoint; a broken newer one is skipped with a
warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from phi4core import parallel
from phi4core.files import json_text, sha256_file

log = logging.getLogger("phi4core.train")

META = "meta.json"


def _file_table(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size,
                                               "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def _rng_entry(state: dict | None):
    """RNG state as one object per (pp, tp) rank, written once per data-parallel replica.

    A plain dict would go into common.pt, which megatron expects to be equal on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _data_entry(state):
    """The data loaders' position (phi4core.train.mixture), one object per data-parallel rank:
    the ranks of a model-parallel group read the same data, so one of them writes it."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "data_state", state, (ps.get_data_parallel_world_size(),),
        (ps.get_data_parallel_rank(),),
        replica_id=(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_context_parallel_rank()),
    )


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _sharded_state(chunks: list, optimizer, is_loading: bool) -> dict:
    from phi4core.model_weights import sharded_model_state_dict

    state = sharded_model_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading)
    return state


def save(root: Path, step: int, chunks: list, optimizer, progress: dict, keep_last: int,
         model_meta: dict, data_state=None) -> Path:
    """Collective. `progress`: step, consumed_samples, losses... (plain JSON-able values);
    `model_meta`: what `phi4core.model_weights.model_meta` gives for the chunks; `data_state`:
    this rank's loader position when the data is read by streams (phi4core.train.mixture)."""
    from megatron.core import dist_checkpointing

    from phi4core.model_weights import write_model_meta
    from phi4core.train.signals import shielded_helpers

    root = Path(root)
    tmp, final = root / f"tmp.step_{step}", root / f"step_{step}"
    if parallel.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    state = _sharded_state(chunks, optimizer, is_loading=False)
    state["progress"] = dict(progress)
    state["rng"] = _rng_entry(rng_state())
    if data_state is not None:
        state["data_state"] = _data_entry(data_state)
    with shielded_helpers():  # a Ctrl-C or scancel reaching its writers must not break it
        dist_checkpointing.save(state, str(tmp))
    if parallel.rank() == 0:
        write_model_meta(tmp, model_meta)
    parallel.barrier()
    if parallel.rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        meta = {"step": step, "progress": progress, "files": _file_table(final)}
        part = final / f".{META}.part"
        part.write_text(json_text(meta, indent=1))
        os.rename(part, final / META)
        _prune(root, keep_last)
    parallel.barrier()
    return final


def _steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(root).glob("step_*"):
        try:
            out.append((int(p.name.split("_", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out, reverse=True)


def _prune(root: Path, keep_last: int) -> None:
    complete = [p for _, p in _steps(root) if (p / META).is_file()]
    for p in complete[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob("tmp.step_*"):
        shutil.rmtree(p, ignore_errors=True)


def problem(folder: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when it is complete and intact."""
    meta_file = folder / META
    if not meta_file.is_file():
        return "no meta.json (incomplete)"
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return "meta.json unreadable"
    for name, want in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != want["bytes"] or sha256_file(f) != want["sha256"]:
            return f"{name} corrupt (size or sha256 differs)"
    return None


def newest_intact(root: Path) -> Path | None:
    """Rank 0 picks (warning about each broken newer one); every rank gets the same answer."""
    choice = None
    if parallel.rank() == 0:
        for _, folder in _steps(root):
            why = problem(folder)
            if why is None:
                choice = str(folder)
                break
            log.warning("checkpoint %s skipped: %s; falling back to an older one", folder, why)
    choice = parallel.broadcast_object(choice)
    return Path(choice) if choice else None


def load(folder: Path, chunks: list, optimizer, with_data_state: bool = False) -> dict:
    """Collective: restore model, optimizer and RNG; returns the saved progress dict (with
    this rank's loader position under "data_state" when `with_data_state`)."""
    from megatron.core import dist_checkpointing

    state = _sharded_state(chunks, optimizer, is_loading=True)
    state["progress"] = None
    state["rng"] = _rng_entry(None)
    if with_data_state:
        state["data_state"] = _data_entry(None)
    loaded = dist_checkpointing.load(state, str(folder))
    from phi4core.model_weights import load_model_state

    load_model_state(chunks, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    progress = dict(loaded["progress"])
    if with_data_state:
        progress["data_state"] = loaded["data_state"]
    return progress
