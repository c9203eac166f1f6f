"""Run a plan on this machine: stages as child processes, up to `jobs` side by side.

One thread, one loop: start what is ready, poll children, wait for locks, redraw. Keeping it
single-threaded makes signal handling and `preexec_fn` safe and the order of events simple.

Each child runs in its own process group (so SIGINT/SIGTERM to the run stop whole stage
trees, torchrun's workers included) and dies with the run (PR_SET_PDEATHSIG: SIGTERM, so a
trainer still checkpoints). Its stage lock is held by a keeper process for exactly as long as
the child lives (lockkeeper): a child that outlives a killed run keeps its stage locked until
it exits, so no second run starts the stage meanwhile, and what the child leaves running in
the background never holds the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from phi4core.exitcodes import PREEMPTED

from .. import launch
from ..metrics import last_record, progress_text
from ..plan import UP_TO_DATE, Plan, assess
from ..progress import Display
from ..store import StageLock, write_json
from . import lockkeeper
from .attempts import Outcome, consumed, record_exit

_POLL_SECONDS = 0.05
OK_STATES = ("succeeded", "up to date")


def _die_with_parent():
    """A preexec_fn: the child gets SIGTERM when the run that started it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


@dataclass
class _Child:
    proc: subprocess.Popen
    lock: StageLock
    log: IO[bytes]
    keeper: subprocess.Popen | None = None  # holds the lock while proc lives
    signalled_at: float | None = None


class LocalExecutor:
    def __init__(self, plan: Plan, jobs: int = 1, keep_going: bool = False,
                 display: Display | None = None, grace_seconds: float = 30.0):
        self.plan = plan
        self.jobs = max(1, jobs)
        self.keep_going = keep_going
        self.grace = grace_seconds
        self.display = display or Display(plan.to_run(), live=False)
        self.outcomes: dict[str, Outcome] = {}
        self.stop_signal: int | None = None  # SIGINT/SIGTERM received
        self.failed_first: str | None = None
        self._preexec = _die_with_parent()

    # ------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Outcome]:
        pending = self.plan.to_run()
        waiting: dict[str, StageLock] = {}
        running: dict[str, _Child] = {}
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while pending or waiting or running:
                if self.stop_signal is not None:
                    pending.clear()
                    waiting.clear()
                    self._stop_children(running)
                elif self.failed_first is None or self.keep_going:
                    self._start_ready(pending, waiting, running)
                elif pending or waiting:
                    # A failure without --keep-going: descendants are blocked, the rest wait
                    # for another run (the running stages finish).
                    for name in pending + list(waiting):
                        blocker = self._blocker(name)
                        if blocker is not None:
                            self._block(name, blocker)
                        else:
                            self.outcomes[name] = Outcome(
                                "not run", f"stopped after {self.failed_first} failed "
                                "(--keep-going runs independent stages)")
                    pending.clear()
                    waiting.clear()
                self._poll(running)
                self.display.refresh()
                time.sleep(_POLL_SECONDS)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.display.close()
        return self.outcomes

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: no more grace
            self.grace = 0.0
        self.stop_signal = signum

    def _start_ready(self, pending: list[str], waiting: dict[str, StageLock],
                     running: dict[str, _Child]) -> None:
        for name in list(pending):
            blocker = self._blocker(name)
            if blocker is not None:
                pending.remove(name)
                self._block(name, blocker)
            elif self._upstream_done(name):
                pending.remove(name)
                waiting[name] = self.plan.stages[name].attempt.lock()
        # Waiting for a lock held by another run does not take a job slot.
        for name in list(waiting):
            if len(running) >= self.jobs:
                break
            lock = waiting[name]
            if lock.try_acquire():
                del waiting[name]
                self._launch(name, lock, running)
            elif self.display.rows.get(name) and self.display.rows[name].state != "waiting":
                status = self.plan.stages[name].attempt.status() or {}
                self.display.event(name, "waiting", f"locked by phi4 pid {status.get('pid')} "
                                   f"(stage pid {status.get('child_pid')}) on "
                                   f"{status.get('host')}")

    def _upstream(self, name: str) -> set[str]:
        return {e.upstream for e in self.plan.graph.inputs_of(name)
                if e.upstream in self.plan.stages}

    def _upstream_done(self, name: str) -> bool:
        return all(self._ok(u) for u in self._upstream(name))

    def _ok(self, name: str) -> bool:
        if name in self.outcomes:
            return self.outcomes[name].state in OK_STATES
        return self.plan.stages[name].verdict == UP_TO_DATE

    def _blocker(self, name: str) -> str | None:
        """The stage whose failure keeps `name` from running, if any."""
        for up in sorted(self._upstream(name)):
            outcome = self.outcomes.get(up)
            if outcome is None or outcome.state in OK_STATES or outcome.state == "not run":
                continue
            return outcome.blocked_by or up
        return None

    # ------------------------------------------------------------------------------------
    # one stage
    # ------------------------------------------------------------------------------------

    def _launch(self, name: str, lock: StageLock, running: dict[str, _Child]) -> None:
        sp = self.plan.stages[name]
        assess(self.plan, sp, upstream_pending=False)  # the store may have moved on
        if sp.verdict == UP_TO_DATE:
            lock.release()
            detail = ("its inputs came out identical" if sp.published
                      else "done by another run")
            self._finish_event(name, Outcome("up to date", detail))
            return
        attempt = sp.attempt
        argv = sp.command
        record = attempt.begin(sp.fields, executor="local", command=argv, reasons=sp.reasons,
                               inputs=consumed(self.plan.store, sp.inputs), job_id=None,
                               child_pid=None)
        write_json(attempt.spec, launch.spec_document(sp.loaded, attempt, sp.inputs))
        log = open(attempt.log_file, "ab")
        log.write(f"=== phi4 attempt {record['attempt']} of {name} ({attempt.fingerprint}) at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
        log.flush()
        kept = lockkeeper.available()  # else the child inherits the lock
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **sp.env},
                                    process_group=0, pass_fds=() if kept else (lock.fd,),
                                    preexec_fn=self._preexec)
        except OSError as err:
            log.close()
            attempt.update_status(state="failed", ended=time.time(),
                                  error=f"cannot start {argv[0]}: {err.strerror}")
            lock.release()
            self._failed(name, Outcome("failed", f"cannot start {argv[0]}: {err.strerror}"))
            return
        keeper = lockkeeper.start(proc, lock.fd, log) if kept else None
        attempt.update_status(child_pid=proc.pid, job_id=str(proc.pid))
        running[name] = _Child(proc, lock, log, keeper)
        self.display.event(name, "running", "; ".join(sp.reasons))

    def _poll(self, running: dict[str, _Child]) -> None:
        for name, child in list(running.items()):
            code = child.proc.poll()
            if code is None:
                record = last_record(self.plan.stages[name].attempt.metrics)
                if record:
                    train = self.plan.stages[name].loaded.recipe.train
                    self.display.progress(name, progress_text(
                        record, train.total_steps if train else None))
                continue
            del running[name]
            lockkeeper.stop(child.keeper)
            child.log.close()
            try:
                self._collect(name, code, child)
            finally:
                child.lock.release()

    def _collect(self, name: str, code: int, child: _Child) -> None:
        sp = self.plan.stages[name]
        outcome = record_exit(sp.attempt, sp.loaded.recipe.outputs, code,
                              cancelled=code != 0 and child.signalled_at is not None)
        if outcome.state in ("failed", "preempted"):
            self._failed(name, outcome)
        else:
            self._finish_event(name, outcome)

    def _failed(self, name: str, outcome: Outcome) -> None:
        self.failed_first = self.failed_first or name
        self._finish_event(name, outcome)

    def _block(self, name: str, blocker: str) -> None:
        attempt = self.plan.stages[name].attempt
        why = f"upstream {blocker} {self.outcomes[blocker].state}"
        if (attempt.status() or {}).get("state") != "succeeded":
            # Recorded so that `phi4 status` can say why this stage never ran; a published
            # result is never hidden behind such a record.
            attempt.update_status(state="blocked", blocked_by=blocker, ended=time.time(),
                                  error=why)
            self.plan.store.set_latest(name, attempt.fingerprint)
        self._finish_event(name, Outcome("blocked", why, blocked_by=blocker))

    def _finish_event(self, name: str, outcome: Outcome) -> None:
        self.outcomes[name] = outcome
        self.display.event(name, outcome.state, outcome.detail)

    def _stop_children(self, running: dict[str, _Child]) -> None:
        now = time.monotonic()
        for child in running.values():
            if child.signalled_at is None:
                child.signalled_at = now
                _signal_group(child.proc.pid, signal.SIGTERM)
            elif now - child.signalled_at >= self.grace:
                _signal_group(child.proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def exit_status(outcomes: dict[str, Outcome], stop_signal: int | None) -> int:
    """128+signal when stopped by one; 1 when a stage failed; PREEMPTED when the only trouble
    is a preemption (an outer scheduler may requeue the run); 1 for anything else not done."""
    if stop_signal is not None:
        return 128 + stop_signal
    states = {o.state for o in outcomes.values()}
    if "failed" in states:
        return 1
    if "preempted" in states:
        return PREEMPTED
    return 1 if states & {"blocked", "not run", "cancelled"} else 0
