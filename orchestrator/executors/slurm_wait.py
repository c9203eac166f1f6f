"""`phi4 run --wait` on Slurm: follow submitted jobs to their end, whoever submitted them
(`--executor slurm`, or NeMo-Run's SlurmExecutor, here or through a login node).

A job that can never start (its afterok upstream failed) is not left queued: it is cancelled
(if Slurm, told `--kill-on-invalid-dep=yes`, has not removed it already) and its stage recorded
`blocked` by the stage at the root of the failure.
"""

from __future__ import annotations

import time

from ..exitcodes import PREEMPTED
from ..records import StageStatus, State
from ..status import StatusRow
from ..store import StageDir, Store
from ..words import count
from . import slurm_cli, slurm_status
from .base import Executor, ExecutorError, Submission
from .outcomes import Outcome
from .ssh import Login


class FollowsSlurmJobs(Executor):
    """`wait` for an executor whose submissions are Slurm jobs (reached over `login`)."""

    login: Login | None = None

    @classmethod
    def sync(cls, store: Store) -> None:
        """Records stay as they are while Slurm does not answer: `submit` then refuses to
        submit the stages whose job it cannot see."""
        try:
            slurm_status.reconcile_store(store)
        except slurm_cli.SlurmUnavailable:
            pass
        except slurm_cli.SlurmError as err:
            raise ExecutorError(str(err)) from None

    @classmethod
    def status(cls, store: Store, rows: list[StatusRow]) -> list[StatusRow]:
        return slurm_status.annotate(store, rows)

    def wait(self, submitted: list[Submission]) -> dict[str, Outcome]:
        """Follow the jobs (requeues included) until each has ended or can never start."""
        job_of = {s.name: s.job_id for s in submitted if s.job_id}
        folders = {n: self.plan.stages[n].stage_dir for n in job_of}
        outcomes: dict[str, Outcome] = {}
        shown: dict[str, str] = {}
        outage: str | None = None
        while True:
            left = [n for n in job_of if n not in outcomes]
            if not left:
                return outcomes
            try:
                jobs = slurm_cli.query([job_of[n] for n in left], via=self.login)
            except slurm_cli.SlurmUnavailable as err:
                if outage is None:  # once per outage: the jobs run on without us
                    self.note(f"Slurm is not answering ({err}); still following "
                              f"{count(len(left), 'job')}, Ctrl-C stops following (not the jobs)")
                outage = str(err)
                time.sleep(self.options.poll)
                continue
            if outage is not None:
                self.note("Slurm answers again")
                outage = None
            slurm_status.reconcile([folders[n] for n in left], jobs)
            for name in left:
                job = jobs[job_of[name]]
                status = folders[name].status()
                if not job.active:
                    outcomes[name] = _outcome(folders[name], status, job)
                    self._event(name, job.job_id, outcomes[name].state, outcomes[name].detail)
                    continue
                root = self._failed_upstream(name, outcomes)
                if job.state == "PENDING" and (root or job.never_runs):
                    outcomes[name] = self._never_runs(name, job, root)
                    continue
                requeued = status is not None and status.state == State.PREEMPTED
                state = State.REQUEUED if requeued and job.state == "PENDING" \
                    else job.state.lower()
                if shown.get(name) != state:
                    shown[name] = state
                    self._event(name, job.job_id, state)
            time.sleep(self.options.poll)

    def _never_runs(self, name: str, job: slurm_cli.Job, root: str | None) -> Outcome:
        """Cancel a job whose dependency can never be met (Slurm may not have removed it yet:
        it looks at dependencies periodically) and record its stage blocked."""
        why = f"upstream {root} failed" if root else "an upstream job failed"
        try:
            slurm_cli.cancel([job.job_id], self.login)
            left = f"job {job.job_id} cancelled"
        except slurm_cli.SlurmError as err:  # it stays queued: say so, and how to remove it
            left = f"job {job.job_id} left pending ({err}): phi4 cancel removes it"
        folder = self.plan.stages[name].stage_dir
        folder.end(State.BLOCKED, blocked_by=root, error=f"never ran: {why} ({left})")
        self._event(name, job.job_id, State.BLOCKED, f"never ran: {why} ({left})")
        return Outcome(State.BLOCKED, f"never ran: {why}", blocked_by=root)

    def _event(self, name: str, job_id: str, state: str, detail: str = "") -> None:
        self.say(f"{state:<10} {name}: job {job_id}" + (f": {detail}" if detail else ""))

    def _failed_upstream(self, name: str, outcomes: dict[str, Outcome]) -> str | None:
        """The stage at the root of a failure that keeps `name` from ever starting."""
        for edge in self.plan.graph.inputs_of(name):
            o = outcomes.get(edge.upstream)
            if o is not None and not o.done:
                return o.blocked_by or edge.upstream
        return None


def _outcome(folder: StageDir, status: StageStatus | None, job: slurm_cli.Job) -> Outcome:
    """What a job that Slurm says has ended did, by the record its hooks (or reconcile) left."""
    if status is None:
        return Outcome(State.FAILED, f"job ended ({job.state}) and the stage has no record")
    state, code = status.state, status.exit_code
    if state == State.SUCCEEDED:
        return Outcome(State.SUCCEEDED, exit_code=0)
    detail = status.error or f"Slurm says {job.state}"
    if state == State.PREEMPTED:
        return Outcome(State.PREEMPTED, detail, code if code is not None else PREEMPTED)
    if state == State.BLOCKED:
        return Outcome(State.BLOCKED, detail, code, blocked_by=status.blocked_by)
    if state in (State.FAILED, State.CANCELLED):
        logged = state == State.FAILED and "log:" not in detail
        return Outcome(state, f"{detail}; log: {folder.log_file}" if logged else detail, code)
    return Outcome(State.FAILED, f"job ended ({job.state}) but the stage recorded {state}", code)
