"""Freezing by module group, and checksums of weights: the frozen ones never move, and the
whole model's hash (bit-identity of runs)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

from phi4core.models.decoder import set_trainable
from phi4core.module_groups import group_of


class FrozenWeightsChanged(RuntimeError):
    """A frozen tensor's bytes differ after training from before."""


def apply_freezing(chunks: list, trainable: Iterable[str],
                   extra_frozen: Callable[[str], bool] | None = None) -> dict[str, int]:
    """requires_grad per module group; `extra_frozen(name)` freezes single parameters too
    (tests use it: the released presets have one group only). Must run before the DDP
    wrapper and the optimizer are built, which then skip frozen parameters entirely."""
    counts: dict[str, int] = {}
    for chunk in chunks:
        for group, n in set_trainable(chunk, trainable).items():
            counts[group] = counts.get(group, 0) + n
        if extra_frozen is not None:
            for name, p in chunk.named_parameters():
                if p.requires_grad and extra_frozen(name):
                    p.requires_grad_(False)
                    counts["backbone"] = counts.get("backbone", 0) - p.numel()
    return counts


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's exact bytes (what every weight checksum hashes)."""
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _all_ranks(local):
    """[local value of every rank] (collective); [local] in one process."""
    from phi4core import parallel

    if parallel.world_size() == 1:
        return [local]
    import torch.distributed as dist

    parts: list = [None] * parallel.world_size()
    dist.all_gather_object(parts, local)
    return parts


def weights_sha256(chunks: list) -> str:
    """Hash of every rank's parameters (bit-identity checks); collective under torchrun."""
    h = hashlib.sha256()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            h.update(name.encode())
            h.update(tensor_bytes(p))
    per_rank = _all_ranks(h.hexdigest())
    return per_rank[0] if len(per_rank) == 1 else hashlib.sha256(
        "".join(per_rank).encode()).hexdigest()


def frozen_checksums(chunks: list) -> dict:
    """{"tensors": {name[shard]: sha256}, "groups": {module group: sha256}, "combined": sha256}
    over every frozen tensor of every rank (collective). Shard keys carry the tp/pp rank; DP
    replicas agree and coincide. A group is listed when any of its tensors is frozen."""
    from megatron.core import parallel_state as ps

    shard = f"tp{ps.get_tensor_model_parallel_rank()}.pp{ps.get_pipeline_model_parallel_rank()}"
    local = {}
    for i, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                key = f"{name}[{shard}.vp{i}]" if len(chunks) > 1 else f"{name}[{shard}]"
                local[key] = hashlib.sha256(tensor_bytes(p)).hexdigest()
    merged = {k: v for part in _all_ranks(local) for k, v in part.items()}
    tensors = dict(sorted(merged.items()))

    def digest(items) -> str:
        return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in items).encode()).hexdigest()

    by_group: dict[str, list] = {}
    for k, v in tensors.items():
        by_group.setdefault(group_of(k.split("[", 1)[0]), []).append((k, v))
    return {"tensors": tensors,
            "groups": {g: digest(items) for g, items in sorted(by_group.items())},
            "combined": digest(tensors.items())}


def check_unchanged(before: dict, after: dict) -> None:
    if before["combined"] == after["combined"]:
        return
    changed = sorted(k for k in before["tensors"]
                     if before["tensors"][k] != after["tensors"].get(k))
    raise FrozenWeightsChanged(
        f"frozen weights changed during training ({len(changed)} tensor(s), e.g. "
        f"{', '.join(changed[:3])}): checksum {before['combined'][:12]} before, "
        f"{after['combined'][:12]} after")
