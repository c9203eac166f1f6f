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
from dataclasses import dataclass, replace
from typing import IO

from ..metrics import last_record, progress_text
from ..plan import UP_TO_DATE, Plan, assess
from ..progress import Display
from ..records import State
from ..store import StageLock, StoreError
from . import lockkeeper
from .base import Executor, ExecutorError, RunOptions, Say, Submission
from .outcomes import Outcome, record_exit

_POLL_SECONDS = 0.05


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


class LocalExecutor(Executor):
    """Runs the stages in this process's loop: `submit` starts nothing, `wait` runs them."""

    name = "local"

    def __init__(self, plan: Plan, options: RunOptions, say: Say = print, note: Say = print,
                 display: Display | None = None):
        super().__init__(plan, options, say, note)
        self.jobs = max(1, options.jobs)
        self.keep_going = options.keep_going
        self.grace = options.grace
        self.display = display
        self.outcomes: dict[str, Outcome] = {}
        self.failed_first: str | None = None
        self._preexec = _die_with_parent()

    @classmethod
    def check_options(cls, options: RunOptions) -> None:
        if options.cluster_file or options.wait:
            raise ExecutorError("--cluster and --wait go with --executor slurm or nemo_run")

    def check(self) -> None:
        super().check()
        for name in self.plan.to_run():
            nodes = self.plan.stages[name].loaded.recipe.resources.nodes
            if nodes > 1:
                raise ExecutorError(f"stage {name} needs {nodes} nodes; the local executor "
                                    "runs on this machine only (try --profile tiny)")

    def dry_run(self) -> str:
        from ..plan_text import plan_text

        return plan_text(self.plan, self.options.title)

    def submit(self) -> list[Submission]:
        return [Submission(name) for name in self.plan.to_run()]

    def wait(self, submitted: list[Submission]) -> dict[str, Outcome]:
        if self.display is None:
            self.display = Display([s.name for s in submitted], stream=sys.stdout)
        return self.run()

    # ------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Outcome]:
        """Start what is ready, poll what runs, until every stage of the plan has ended."""
        pending = self.plan.to_run()
        if self.display is None:
            self.display = Display(pending, live=False)
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
                                State.NOT_RUN, f"stopped after {self.failed_first} failed "
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
                waiting[name] = self.plan.stages[name].stage_dir.lock()
        # Waiting for a lock held by another run does not take a job slot.
        for name in list(waiting):
            if len(running) >= self.jobs:
                break
            lock = waiting[name]
            try:
                acquired = lock.try_acquire()
            except StoreError as err:  # damaged meanwhile: this stage fails, others go on
                del waiting[name]
                self._failed(name, Outcome(State.FAILED, str(err)))
                continue
            if acquired:
                del waiting[name]
                self._launch(name, lock, running)
            elif self.display.rows.get(name) and \
                    self.display.rows[name].state != State.WAITING:
                status = self.plan.stages[name].stage_dir.status()
                holder = (f"phi4 pid {status.pid} (stage pid {status.child_pid}) on "
                          f"{status.host}") if status else "another run"
                self.display.event(name, State.WAITING, f"locked by {holder}")

    def _upstream(self, name: str) -> set[str]:
        return {e.upstream for e in self.plan.graph.inputs_of(name)
                if e.upstream in self.plan.stages}

    def _upstream_done(self, name: str) -> bool:
        return all(self._ok(u) for u in self._upstream(name))

    def _ok(self, name: str) -> bool:
        if name in self.outcomes:
            return self.outcomes[name].done
        return self.plan.stages[name].verdict == UP_TO_DATE

    def _blocker(self, name: str) -> str | None:
        """The stage whose failure keeps `name` from running, if any."""
        for up in sorted(self._upstream(name)):
            outcome = self.outcomes.get(up)
            if outcome is None or outcome.done or outcome.state == State.NOT_RUN:
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
            self._finish_event(name, Outcome(State.UP_TO_DATE, detail))
            return
        folder = sp.stage_dir
        layout = sp.launcher().layout()
        argv = list(layout.argv)
        lineage = sp.lineage_records()
        try:
            # An input changed since it was published (a stage wrote into it) is not read:
            # blocked by that upstream, which the next run rebuilds.
            corrupt = folder.input_problem(lineage)
            if corrupt is not None:
                lock.release()
                folder.end(State.BLOCKED, blocked_by=corrupt[0], error=corrupt[1])
                self.plan.store.set_latest(name, folder.fingerprint)
                self._finish_event(name, Outcome(State.BLOCKED, corrupt[1],
                                                 blocked_by=corrupt[0]))
                return
            folder.prepare(self.spec_document(name), sp.fields)
            record = folder.begin(self.name, command=argv, reasons=sp.reasons, inputs=lineage)
        except StoreError as err:
            lock.release()
            self._failed(name, Outcome(State.FAILED, str(err)))
            return
        log = open(folder.log_file, "ab")
        log.write(f"=== phi4 attempt {record.attempt} of {name} ({folder.fingerprint}) at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
        log.flush()
        kept = lockkeeper.available()  # else the child inherits the lock
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **layout.env},
                                    process_group=0, pass_fds=() if kept else (lock.fd,),
                                    preexec_fn=self._preexec)
        except OSError as err:
            log.close()
            why = f"cannot start {argv[0]}: {err.strerror}"
            folder.end(State.FAILED, error=why)
            lock.release()
            self._failed(name, Outcome(State.FAILED, why))
            return
        keeper = lockkeeper.start(proc, lock.fd, log) if kept else None
        folder.record_job(str(proc.pid), child_pid=proc.pid)
        running[name] = _Child(proc, lock, log, keeper)
        self.display.event(name, State.RUNNING, "; ".join(sp.reasons))

    def _poll(self, running: dict[str, _Child]) -> None:
        for name, child in list(running.items()):
            code = child.proc.poll()
            if code is None:
                record = last_record(self.plan.stages[name].stage_dir.metrics)
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
            except (OSError, StoreError) as err:
                # Never abandon the other running stages: this one failed, the loop goes on.
                self._failed(name, Outcome(State.FAILED, f"cannot record its end: {err}"))
            finally:
                child.lock.release()

    def _collect(self, name: str, code: int, child: _Child) -> None:
        sp = self.plan.stages[name]
        outcome = record_exit(sp.stage_dir, sp.loaded.recipe.outputs, code,
                              cancelled=code != 0 and child.signalled_at is not None)
        if outcome.state in (State.FAILED, State.PREEMPTED):
            self._failed(name, outcome)
            return
        evaluation = sp.stage_dir.evaluation() if outcome.state == State.SUCCEEDED else None
        if evaluation is not None and evaluation.results:  # shown as the stage finishes
            detail = "; ".join(d for d in (outcome.detail, evaluation.summary()) if d)
            outcome = replace(outcome, detail=detail)
        self._finish_event(name, outcome)

    def _failed(self, name: str, outcome: Outcome) -> None:
        self.failed_first = self.failed_first or name
        self._finish_event(name, outcome)

    def _block(self, name: str, blocker: str) -> None:
        folder = self.plan.stages[name].stage_dir
        why = f"upstream {blocker} {self.outcomes[blocker].state}"
        status = folder.status()
        if status is None or status.state != State.SUCCEEDED:
            # Recorded so that `phi4 status` can say why this stage never ran; a published
            # result is never hidden behind such a record.
            folder.end(State.BLOCKED, blocked_by=blocker, error=why)
            self.plan.store.set_latest(name, folder.fingerprint)
        self._finish_event(name, Outcome(State.BLOCKED, why, blocked_by=blocker))

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
