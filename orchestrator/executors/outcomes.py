"""What became of each stage in a run: recorded when an attempt ends (whoever ran it: the local
executor after its child exits, or a job's `phi4 stage-hook end`), summed up in one line, and
turned into `phi4 run`'s exit status. Publishing and verification live in the store; this
decides which state an exit code means."""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..exitcodes import FAILURE, OK, PREEMPTED
from ..records import DONE, State
from ..store import StageDir


@dataclass
class Outcome:
    state: State  # succeeded | up to date | failed | cancelled | preempted | blocked | not run
    detail: str = ""
    exit_code: int | None = None
    blocked_by: str | None = None  # the failed stage at the root of a block

    @property
    def done(self) -> bool:
        """Downstream stages may start."""
        return self.state in DONE


def record_exit(folder: StageDir, outputs: list[str], code: int, *, cancelled: bool = False,
                preempted_note: str = "checkpointed; rerun to resume") -> Outcome:
    """Publish on exit 0; otherwise record why not. Returns what to report."""
    if code == 0:
        status = folder.status()
        # It read what it was given: a stage that changed (or saw republished) an input
        # publishes nothing, so nothing is ever up to date on a tampered input.
        changed = folder.input_problem(status.inputs) if status is not None else None
        if changed is not None:
            problem = f"exited 0 but its inputs changed while it ran: {changed[1]}; " \
                      "nothing published"
        else:
            problem = folder.publish(outputs)
        if problem is None:
            folder.end(State.SUCCEEDED, exit_code=0)
            return Outcome(State.SUCCEEDED, exit_code=0)
        folder.end(State.FAILED, exit_code=0, error=problem)
        return Outcome(State.FAILED, problem, 0)
    if cancelled:
        folder.end(State.CANCELLED, exit_code=code)
        return Outcome(State.CANCELLED, describe(code), code)
    if code == PREEMPTED:
        folder.end(State.PREEMPTED, exit_code=code, error=preempted_note)
        return Outcome(State.PREEMPTED, preempted_note, code)
    said = last_line(folder.log_file)
    error = f"{describe(code)}{f': {said}' if said else ''}"
    folder.end(State.FAILED, exit_code=code, error=error)
    return Outcome(State.FAILED, f"{error}; log: {folder.log_file}", code)


# Lines the stage did not write: phi4's and Slurm's bookkeeping around it in the same log.
_NOT_THE_STAGES = ("=== phi4", "srun: ", "slurmstepd: ")


def last_line(log: Path, limit: int = 160) -> str:
    """The stage's last words (usually the error), for the failure line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((ln for ln in reversed(lines) if ln and not ln.startswith(_NOT_THE_STAGES)), "")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def summary(outcomes: dict[str, Outcome]) -> str:
    """One line: how many stages ended in each state, in the order they first ended so."""
    counts = Counter(o.state for o in outcomes.values())
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "nothing ran"


def exit_status(outcomes: dict[str, Outcome], stop_signal: int | None = None) -> int:
    """128+signal when stopped by one; 1 when a stage failed; PREEMPTED when the only trouble
    is a preemption (an outer scheduler may requeue the run); 1 for anything else not done."""
    if stop_signal is not None:
        return 128 + stop_signal
    states = {o.state for o in outcomes.values()}
    if State.FAILED in states:
        return FAILURE
    if State.PREEMPTED in states:
        return PREEMPTED
    return FAILURE if states - DONE else OK  # blocked, not run, cancelled
