"""Preemption: SIGUSR1 (Slurm's pre-timeout signal) or SIGTERM asks for a checkpoint at the next
step boundary, then exit with the preempted code so the executor requeues instead of failing."""

from __future__ import annotations

import signal
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Set by a signal handler; read at step boundaries (never act inside the handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled, so all ranks checkpoint together."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
