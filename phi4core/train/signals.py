"""Stopping a stage cleanly: SIGUSR1 (Slurm's pre-timeout signal), SIGTERM (phi4 run on Ctrl-C,
scancel, preemption) or SIGINT (Ctrl-C at a terminal) asks for a checkpoint at the next step
boundary, then exit with the preempted code so that the executor resumes instead of failing.

Invariants:
- The handler only sets a flag; the trainer acts on it at step boundaries, all ranks together.
- These signals usually reach a whole process group or Slurm step, so megatron's checkpoint
  helpers get them too: the processes it starts to write a checkpoint (forked writers, a
  multiprocessing Manager serving the results queue, the resource tracker) must outlive them,
  or the checkpoint being written breaks. `shielded_helpers` makes every process started
  inside it immune: born with the stop signals blocked, they stay pending, never delivered.
- Helpers never outlive the trainer: forked ones and the Manager get SIGKILL when it dies
  (PR_SET_PDEATHSIG), and the resource tracker ends when they are all gone.
- Under torchrun a worker leads a session of its own: it dies with its launcher
  (`die_with_launcher`), so that a SIGKILLed launch (a second Ctrl-C, Slurm's kill at the end
  of the grace period) never leaves a worker writing into checkpoints/ while a rerun starts.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_LINUX = sys.platform.startswith("linux")


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


def _prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _killed_with_parent(parent: int | None = None, prctl=None) -> None:
    """In a child: SIGKILL when its parent dies (Linux); at once if it already has."""
    if not _LINUX:
        return
    pr_set_pdeathsig = 1
    (prctl or _prctl())(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_launcher() -> None:
    """Under torchrun: SIGKILL this worker when the agent that started it dies. The agent
    passes the stop signals on and waits (phi4core.elastic): it dies only when killed."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _killed_with_parent(parent=os.getppid())


_bound: list = []  # the Manager started here, once per process


def _bind_helpers_to_this_process() -> None:
    """Forked children die with this process; megatron's results-queue Manager, started here
    instead of by megatron (which would give it no way to know), too."""
    if _bound or not _LINUX:
        return
    prctl = _prctl()  # resolved here: a forked child of a threaded process must not dlopen
    os.register_at_fork(after_in_child=lambda: _killed_with_parent(prctl=prctl))
    _bound.append(None)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_results_queue", "absent") is None:  # megatron-core 0.16: started lazily
        import multiprocessing
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_killed_with_parent, initargs=(os.getpid(),))
        fsa._results_queue = manager.Queue()
        _bound.append(manager)  # its finalizer shuts it down when this process exits


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
        _bind_helpers_to_this_process()
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
