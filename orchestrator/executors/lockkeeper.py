"""The stage lock while a local stage runs: held by phi4, never by the stage's descendants.

`phi4 run` starts a stage's process without the lock, then a keeper: a small process that holds
the lock (an inherited copy of the run's flock) until that process has ended, watching it
through a pidfd (`python -m orchestrator.executors.lockkeeper PIDFD`).

Invariants:
- A process the stage leaves behind (`sleep 1000 &`, a daemon) never has the lock, so a rerun
  does not wait for it.
- The lock is held until the stage's own process has exited, even when the run that started it
  was SIGKILLed: no second run starts the stage while it is still running (a trainer finishing
  its checkpoint). The keeper sits in the stage's process group, not the run's, so a signal to
  the run's group leaves it alone; it ignores the stop signals that reach the stage's group
  (SIGKILL, the second Ctrl-C, ends it with the stage).
- The pidfd is opened before the run could reap the stage, so it names that process and never
  a later one with the same pid.
- Where pidfds are missing (not Linux >= 5.3), the stage inherits the lock instead (its
  descendants do too): `available()` says which.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import subprocess
import sys
from typing import IO

# What may reach the stage's process group: the keeper outlives them all but SIGKILL.
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2)


@functools.cache
def available() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an older kernel
        return False
    return True


def _ignore_stop_signals() -> None:
    """preexec_fn: ignored dispositions survive exec, so there is no moment at start-up when
    a Ctrl-C reaching the stage's group would end the keeper."""
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def start(stage: subprocess.Popen, lock_fd: int, log: IO[bytes]) -> subprocess.Popen | None:
    """Start the keeper of `stage` (running, not yet reaped); None if it cannot be started,
    leaving the lock to the run alone."""
    try:
        pidfd = os.pidfd_open(stage.pid)
    except OSError:
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", __name__, str(pidfd)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(lock_fd, pidfd), process_group=stage.pid,
                                preexec_fn=_ignore_stop_signals)
    except OSError:  # e.g. the stage's group is already gone
        return None
    finally:
        os.close(pidfd)


def stop(keeper: subprocess.Popen | None) -> None:
    """After the stage has exited: the keeper ends by itself at once; reap it."""
    if keeper is None:
        return
    try:
        keeper.wait(timeout=10)
    except subprocess.TimeoutExpired:
        keeper.kill()
        keeper.wait()


def main(argv: list[str]) -> int:
    pidfd = int(argv[0])
    select.select([pidfd], [], [])  # readable once the process has exited
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
