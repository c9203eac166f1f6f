"""torch.distributed + megatron parallel state, for one process or under torchrun / srun.

``init_parallel(ParallelSettings(tp=2, pp=1))`` initialises the default process group (gloo on
CPU, nccl on GPU) from the launcher's environment (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or a
free local port when run as a single plain process), then megatron's model-parallel groups and
the RNG tracker. Calling it again with the same settings is a no-op; with different settings it
rebuilds the megatron groups over the same world (handy in tests and converters).

``ensure_parallel(settings)`` is what converters and loaders call: those settings when given,
else whatever state is in force, else TP=PP=CP=1 in this one process. ``rank``, ``barrier``,
``broadcast_object`` and ``rank0_first`` work with or without a process group (one process is
rank 0 of 1), so code using them runs the same under torchrun and as a plain script.

Importing this module is cheap; torch and megatron are imported on first use.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import asdict, dataclass, fields
from typing import Any

log = logging.getLogger(__name__)


def fields_from_any(cls: type, obj: Any) -> dict:
    """The values of dataclass `cls`'s fields found in a mapping or as attributes of `obj`."""
    names = [f.name for f in fields(cls)]
    if isinstance(obj, dict):
        return {k: obj[k] for k in names if k in obj}
    return {k: getattr(obj, k) for k in names if hasattr(obj, k)}


@dataclass
class ParallelSettings:
    """Model-parallel layout. Data parallel is what is left: world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full: the decoder's activation recomputation

    @classmethod
    def from_any(cls, obj: Any) -> ParallelSettings:
        """Accept a ParallelSettings, a mapping or any object with these attribute names
        (e.g. the recipe's Pydantic `parallel` block). Missing names take the defaults."""
        if obj is None or isinstance(obj, cls):
            return obj or cls()
        data = fields_from_any(cls, obj)
        if data.get("vpp") in (0, 1):
            data["vpp"] = None
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)


_STATE: dict[str, Any] = {"settings": None, "seed": None, "owns_pg": False}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size).

    Under torchrun/srun the usual environment variables are read; a plain single process gets
    world size 1 on a free local TCP port. Backend: nccl with a GPU, gloo otherwise.
    """
    import torch
    import torch.distributed as dist

    if not gpu_available():
        from phi4core.models import cpu_shims

        cpu_shims.apply()

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()

    if backend is None:
        backend = "nccl" if gpu_available() else "gloo"
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "WORLD_SIZE" not in env:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    else:
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    _STATE["owns_pg"] = True
    return dist.get_rank(), dist.get_world_size()


def seed_model_parallel(seed: int) -> None:
    """Megatron's model-parallel RNG seeding (CPU tracker without a GPU)."""
    from megatron.core import tensor_parallel

    if gpu_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        from phi4core.models import cpu_shims

        cpu_shims.cpu_model_parallel_seed(seed)
    _STATE["seed"] = seed


def init_parallel(
    settings: ParallelSettings | dict | Any | None = None,
    *,
    seed: int = 1234,
    backend: str | None = None,
    **overrides: Any,
) -> ParallelSettings:
    """Initialise torch.distributed and megatron's parallel state (idempotent).

    ``settings`` is a ParallelSettings, a dict, or anything with tp/pp/cp/vpp attributes;
    keyword overrides (tp=2, ...) win. Returns the settings in force.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    s = ParallelSettings.from_any(settings)
    if overrides:
        s = ParallelSettings(**{**s.as_dict(), **overrides})
    _, world = init_distributed(backend)
    if world % (s.tp * s.pp * s.cp):
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {s.tp}*{s.pp}*{s.cp}"
        )
    current = _STATE["settings"]
    if ps.model_parallel_is_initialized():
        if current is not None and _same_groups(current, s):
            if _STATE["seed"] != seed:
                seed_model_parallel(seed)
            _STATE["settings"] = s
            return s
        log.info("re-initialising megatron parallel state: %s -> %s", current, s)
        ps.destroy_model_parallel()
        dist.barrier()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=s.tp,
        pipeline_model_parallel_size=s.pp,
        virtual_pipeline_model_parallel_size=s.vpp,
        context_parallel_size=s.cp,
    )
    _STATE["settings"] = s
    seed_model_parallel(seed)
    return s


def _same_groups(a: ParallelSettings, b: ParallelSettings) -> bool:
    return (a.tp, a.pp, a.cp, a.vpp) == (b.tp, b.pp, b.cp, b.vpp)


def init_single_process(seed: int = 1234) -> ParallelSettings:
    """TP=PP=CP=1 in this one process, unless a parallel state already exists (then it is kept:
    the converters and loaders call this to make sure *some* state is there)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and _STATE["settings"] is not None:
        return _STATE["settings"]
    if ps.model_parallel_is_initialized():  # initialised by someone else: keep it
        return ParallelSettings(
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size(),
            vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        )
    return init_parallel(ParallelSettings(), seed=seed)


def current_settings() -> ParallelSettings | None:
    return _STATE["settings"]


def ensure_parallel(settings: ParallelSettings | Any | None = None,
                    seed: int = 1234) -> ParallelSettings:
    """A parallel state to build models in: `settings` (collective under torchrun), or with
    None the state already in force, else TP=PP=CP=1 in this one process."""
    if settings is not None:
        return init_parallel(settings, seed=seed)
    return init_single_process(seed)


# ---------------------------------------------------------------------------------------------
# Rank helpers: the same code runs under torchrun and as one plain process
# ---------------------------------------------------------------------------------------------


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """Global rank; 0 without a process group."""
    d = _group()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _group()
    return d.get_world_size() if d else 1


def barrier() -> None:
    if world_size() > 1:
        _group().barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks after a barrier: shared files built once, then
    read (or found ready) by everyone."""
    if world_size() == 1:
        return fn()
    if rank() == 0:
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def ranks() -> dict[str, int]:
    """This process's ranks in each megatron group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp_rank": ps.get_context_parallel_rank(),
        "cp": ps.get_context_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(),
        "dp": ps.get_data_parallel_world_size(),
    }


def destroy_parallel() -> None:
    """Tear down megatron's groups and, when this module created it, the process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and _STATE["owns_pg"]:
        dist.destroy_process_group()
        _STATE["owns_pg"] = False
    _STATE["settings"] = None
    _STATE["seed"] = None
