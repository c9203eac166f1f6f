"""Stopping a stage cleanly: SIGUSR1 (Slurm's pre-timeout signal), SIGTERM (phi4 run on Ctrl-C,
scancel, preemption) or SIGINT (Ctrl-C at a terminal) asks for a checkpoint at the next step
boundary, then exit with the preempted code so that the executor resumes instead of failing.

Invariants:
- The handler only sets a flag; the trainer acts on it at step boundaries, all ranks together.
- These signals usually reach a whole process group or Slurm step, so megatron's checkpoint
  helpers get them too: the processes it starts to write a checkpoint (forked writers, a
  multiprocessing Manager holding the results queue, the resource tracker) must outlive them,
  or the checkpoint the trainer is about to write breaks. `shielded_helpers` makes every
  process started inside it immune: born with the stop signals blocked, they stay pending and
  are never delivered. SIGKILL still ends them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    """Set by a signal handler; read at step boundaries (never act inside the handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Several may come (Ctrl-C at a terminal, then torchrun forwarding it): one is enough.
        if self.signum is None:
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


@contextmanager
def shielded_helpers() -> Iterator[None]:
    """Processes started inside this block (from this thread) ignore the stop signals for
    good: they inherit a signal mask that blocks them, through fork and exec alike. This
    process gets its own signals when the block ends (its handler sets the flag)."""
    stop = set(PREEMPT_SIGNALS)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        # multiprocessing's resource tracker unblocks SIGINT and SIGTERM in the calling thread
        # after starting (megatron's Manager would start it): start it here, shielded, then
        # block again.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
