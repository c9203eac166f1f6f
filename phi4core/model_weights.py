"""A model's weights and config as a megatron ``dist_checkpointing`` folder (torch_dist format,
reshardable): a stage's published `model` artifact, a `{path}` input, a conversion's output.

No optimizer state and no training progress: those are the trainer's resume checkpoints
(`phi4core.train.resume_checkpoints`), which hold these same model keys plus their own.

    <dir>/                    the dist checkpoint (metadata.json, common.pt, __*.distcp)
    <dir>/phi4_model.json     {"format": "phi4core.decoder/1", "model_config": {...},
                               "params_dtype": "bfloat16", "saved_layout": {...},
                               "groups": ["backbone", ...], ...}

so it loads without knowing the preset (`read_model_config`), at any TP/PP layout. A folder may
hold only some module groups of its model (`groups`; phi4core.module_groups): a multimodal
stage's `vision` artifact is the vision encoder, separators, projector and LoRA_V, nothing of
the backbone. Loading takes the groups asked for (`groups=`), or all of the model's, and says
which ones a folder lacks. Everything is
written into a temporary sibling folder and renamed into place, so a reader never sees half a
checkpoint. Saving refuses weights that are not finite (`NonFiniteWeights`): a NaN or inf model
is never written as a result.

Saving spawns a helper process that re-imports ``__main__``: scripts calling this need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from phi4core import dtypes, parallel
from phi4core.config import ModelConfig
from phi4core.files import json_text, replace_dir, temp_dir_beside
from phi4core.models.chunks import as_chunks, unwrap
from phi4core.module_groups import group_of, groups_of

META_FILE = "phi4_model.json"
FORMAT = "phi4core.decoder/1"


class NonFiniteWeights(RuntimeError):
    """Some parameter holds NaN or inf: such a model is never saved as a result."""


class MissingGroups(ValueError):
    """A weights folder lacks module groups a load asked for."""


def sharded_model_state_dict(model_or_chunks, groups=None) -> dict:
    """{'model': ...} (one chunk) or {'model0': ..., 'model1': ...} (virtual pipeline chunks),
    as Megatron-LM lays them out. Sharded keys are global, so any layout loads any other.
    ``groups``: only the entries of these module groups (None: all)."""
    chunks = as_chunks(model_or_chunks)

    def entries(chunk) -> dict:
        sd = unwrap(chunk).sharded_state_dict()
        if groups is None:
            return sd
        return {k: v for k, v in sd.items() if group_of(k) in groups}

    if len(chunks) == 1:
        return {"model": entries(chunks[0])}
    return {f"model{i}": entries(c) for i, c in enumerate(chunks)}


def model_group_names(model_or_chunks) -> list[str]:
    """The module groups of the chunks' model, in table order (from its config)."""
    return groups_of(unwrap(as_chunks(model_or_chunks)[0]).model_cfg)


def load_model_state(model_or_chunks, loaded: dict, strict: bool = True,
                     groups=None) -> None:
    """Put the model entries of a loaded dist checkpoint (the keys of
    `sharded_model_state_dict`) into the chunks; with ``groups``, the entries of those groups,
    every one of them (the other groups keep their values)."""
    chunks = as_chunks(model_or_chunks)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, c in zip(keys, chunks):
        module = unwrap(c)
        if groups is None:
            module.load_state_dict(loaded[key], strict=strict)
            continue
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing
                   if group_of(k) in groups and not k.endswith("._extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"loading groups {sorted(groups)}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


def non_finite_parameters(model_or_chunks, groups=None) -> list[str]:
    """Names of the parameters (of ``groups``; None: all) holding NaN or inf, over every rank
    (collective)."""
    bad = [name for chunk in as_chunks(model_or_chunks)
           for name, p in unwrap(chunk).named_parameters()
           if (groups is None or group_of(name) in groups)
           and not bool(torch.isfinite(p.detach()).all())]
    if parallel.world_size() == 1:
        return bad
    import torch.distributed as dist

    per_rank: list = [None] * parallel.world_size()
    dist.all_gather_object(per_rank, bad)
    return sorted({n for names in per_rank for n in names})


def check_finite(model_or_chunks, groups=None) -> None:
    """Raise NonFiniteWeights naming the parameters (of ``groups``; None: all) that hold NaN
    or inf (collective)."""
    bad = non_finite_parameters(model_or_chunks, groups)
    if bad:
        raise NonFiniteWeights(
            f"{len(bad)} parameter(s) hold NaN or inf values (e.g. {', '.join(bad[:3])}): "
            "the model is not written")


def model_meta(model_or_chunks, model_cfg: ModelConfig, groups=None) -> dict:
    """What `phi4_model.json` records for these chunks (also written into resume checkpoints,
    so a training checkpoint loads and converts like a weights folder); ``groups``: the module
    groups the folder holds (None: all of the model's)."""
    params_dtype = next(unwrap(as_chunks(model_or_chunks)[0]).parameters()).dtype
    return {
        "format": FORMAT,
        "model_config": model_cfg.model_dump(mode="json"),
        "params_dtype": dtypes.long_name(params_dtype),
        "saved_layout": _layout(),
        "groups": list(groups) if groups is not None else groups_of(model_cfg),
    }


def write_model_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json_text(meta, indent=2))


def save_model_weights(
    model_or_chunks,
    out_dir: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    extra: dict[str, Any] | None = None,
    add_files: Callable[[Path], None] | None = None,
    groups=None,
) -> Path:
    """Save (collective: every rank calls it). Atomic: a temp sibling folder is renamed over
    ``out_dir`` (an existing folder there is replaced); ``add_files(folder)`` puts more files
    into it first (rank 0). ``groups``: only these module groups (None: the whole model).
    Non-finite weights raise NonFiniteWeights before anything is written."""
    from megatron.core import dist_checkpointing

    chunks = as_chunks(model_or_chunks)
    if model_cfg is None:
        model_cfg = unwrap(chunks[0]).model_cfg
    if groups is not None:
        groups = [g for g in groups_of(model_cfg) if g in set(groups)]
    check_finite(chunks, groups)
    out = Path(out_dir).absolute()
    tmp = str(temp_dir_beside(out)) if parallel.rank() == 0 else None
    tmp = Path(parallel.broadcast_object(tmp))
    parallel.barrier()
    try:
        dist_checkpointing.save(sharded_model_state_dict(chunks, groups), str(tmp))
        if parallel.rank() == 0:
            write_model_meta(tmp, {**model_meta(chunks, model_cfg, groups), **(extra or {})})
            if add_files is not None:
                add_files(tmp)
            replace_dir(tmp, out)
    except BaseException:
        if parallel.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    parallel.barrier()
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


def read_model_meta(folder: str | os.PathLike) -> dict:
    f = Path(folder) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not a phi4 checkpoint (no {META_FILE})")
    return json.loads(f.read_text())


def read_model_config(folder: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded beside a checkpoint."""
    return ModelConfig.model_validate(read_model_meta(folder)["model_config"])


def folder_groups(folder: str | os.PathLike) -> list[str]:
    """The module groups a weights folder holds (recorded; before that record: every group of
    its model config)."""
    meta = read_model_meta(folder)
    if "groups" in meta:
        return list(meta["groups"])
    return groups_of(ModelConfig.model_validate(meta["model_config"]))


def load_model_weights(model_or_chunks, folder: str | os.PathLike, strict: bool = True,
                       require_meta: bool = True, groups=None) -> None:
    """Load into this rank's model chunk(s) (collective), resharding from whatever layout the
    checkpoint was saved at. ``groups``: only these module groups, the others keep their
    values (None: the whole model). A folder lacking a group asked for raises MissingGroups.
    A resume checkpoint's model entries load the same way (one written before they recorded
    `phi4_model.json` needs ``require_meta=False``)."""
    from megatron.core import dist_checkpointing

    chunks = as_chunks(model_or_chunks)
    if require_meta:
        want = list(groups) if groups is not None else model_group_names(chunks)
        have = folder_groups(folder)
        lacking = [g for g in want if g not in have]
        if lacking:
            raise MissingGroups(f"{folder} holds the module groups {', '.join(have)}, not "
                                f"{', '.join(lacking)}")
    loaded = dist_checkpointing.load(sharded_model_state_dict(chunks, groups), str(folder))
    load_model_state(chunks, loaded, strict=strict, groups=groups)
