"""`python -m phi4core.elastic [torchrun options] -m phi4core train SPEC.json`: torchrun, with
the trainer's way of stopping.

torchrun (torch.distributed.run) starts every worker in a session of its own, so a signal to
the launch's process group reaches the agent alone; the agent then closes its workers (SIGTERM,
SIGKILL 30 s later) and exits 1, and SIGUSR1, Slurm's pre-timeout signal, kills it outright,
taking the step and the checkpoint being written with it. Here:

- The agent handles SIGUSR1, SIGTERM and SIGINT by passing them on to each worker's process
  group, and goes on watching: the workers checkpoint at their next step boundary and exit 75.
- When a worker exited 75 (phi4core.exitcodes.PREEMPTED: the checkpoint, a collective, is
  complete) and the others did too or were killed by a signal, the launch exits 75 as well, so
  that executors resume a multi-process stage as they do a single process.
- A signal that comes before any worker has started ends the launch as it would torchrun.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from phi4core.exitcodes import FAILURE, PREEMPTED

FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _children() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _forward(signum: int, frame) -> None:
    workers = _children()
    if not workers:  # nothing started yet: stop as torchrun would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for pid in workers:
        try:
            if os.getpgid(pid) == pid:  # a worker leads its own session: its helpers too
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    # torchrun installs its own handlers (raise, close the workers) for the signals named here
    # when it starts them: only for those we leave to it.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        # A worker exits 75 only after the collective checkpoint is complete; torchrun then
        # closes the others with SIGTERM, which may catch one as its interpreter shuts down.
        if PREEMPTED in codes and all(c == PREEMPTED or c < 0 for c in codes):
            print(f"phi4core.elastic: the workers checkpointed (exit {PREEMPTED}): preempted",
                  file=sys.stderr, flush=True)
            return PREEMPTED
        print(f"phi4core.elastic: {err}", file=sys.stderr, flush=True)
        return FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
