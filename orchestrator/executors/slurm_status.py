"""What the store says about Slurm stages, corrected by what Slurm says about their jobs.

A job's own hooks record its start and end; when they could not (a job cancelled before it
started, killed at its time limit, lost with its node), `reconcile` writes the ending Slurm
reports. Stages whose job is still queued are described from Slurm: pending (and why), or
"never ran: upstream X failed" when they wait on a dependency that can no longer be met.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..store import Attempt, Store
from . import slurm_cli

_LIVE = ("pending", "running", "preempted")  # records whose job may still be queued or running
_BAD = ("failed", "cancelled", "preempted", "blocked")


def slurm_job(attempt: Attempt, status: dict | None = None) -> str | None:
    status = status if status is not None else attempt.status() or {}
    if status.get("executor") == "slurm" and status.get("state") in _LIVE:
        return status.get("job_id")
    return None


def query_attempts(attempts: list[Attempt]) -> dict[str, slurm_cli.Job]:
    return slurm_cli.query([j for j in map(slurm_job, attempts) if j])


def reconcile(attempts: list[Attempt], jobs: dict[str, slurm_cli.Job]) -> None:
    """Record the end of jobs that ended without their end hook having said so."""
    for attempt in attempts:
        status = attempt.status() or {}
        job_id = slurm_job(attempt, status)
        job = jobs.get(job_id or "")
        if job is None or job.active or job.state == "UNKNOWN" or \
                status.get("state") not in ("pending", "running"):
            continue
        code = _exit_code(job.exit_code)
        if job.state == "CANCELLED":
            state, error = "cancelled", f"Slurm job {job_id} was cancelled"
        elif job.state == "PREEMPTED":
            state, error = "preempted", f"Slurm job {job_id} was preempted"
        else:
            state, error = "failed", (f"Slurm job {job_id} ended {job.state} (exit "
                                      f"{job.exit_code or '?'}) without phi4's end record; "
                                      f"log: {attempt.log_file}")
        attempt.update_status(state=state, error=error, exit_code=code,
                              ended=status.get("ended") or time.time())


def _exit_code(text: str) -> int | None:
    code, _, sig = text.partition(":")
    if not code.isdigit():
        return None
    return -int(sig) if sig.isdigit() and int(sig) else int(code)


def never_ran_because(store: Store, name: str, active: Callable[[str | None], bool],
                      _seen: frozenset[str] = frozenset()) -> str | None:
    """`upstream X failed` when `name`'s queued job waits on a stage that ended badly, directly
    or through upstream jobs that are themselves stuck behind it."""
    attempt = store.latest(name)
    status = (attempt.status() if attempt else None) or {}
    for upstream in sorted(status.get("depends_on") or {}):
        if upstream in _seen:
            continue
        up = store.latest(upstream)
        up_status = (up.status() if up else None) or {}
        state = up_status.get("state")
        if state in _BAD and not active(slurm_job(up, up_status)):
            root = up_status.get("blocked_by") if state == "blocked" else None
            return f"upstream {root or upstream} {'failed' if root else state}"
        if state == "pending":
            found = never_ran_because(store, upstream, active, _seen | {name})
            if found:
                return found
    return None


def describe(store: Store, attempt: Attempt, jobs: dict[str, slurm_cli.Job]
             ) -> tuple[str, str] | None:
    """(state, note) for a stage whose Slurm job is still queued or running; None otherwise."""
    status = attempt.status() or {}
    job = jobs.get(slurm_job(attempt, status) or "")
    if job is None or not job.active:
        return None
    if job.state != "PENDING":
        state = "running" if job.state in ("RUNNING", "CONFIGURING", "COMPLETING") \
            else job.state.lower()
        return state, f"Slurm job {job.job_id} {job.state.lower()}"

    def active(job_id: str | None) -> bool:
        known = jobs.get(job_id or "")
        return known is not None and known.active

    why = never_ran_because(store, attempt.name, active)
    if why or job.never_runs:
        return "blocked", (f"never ran: {why or 'an upstream job failed'} (job {job.job_id} "
                           f"pending: {job.reason or 'Dependency'}; rerun or phi4 cancel)")
    if status.get("state") == "preempted":
        return "requeued", (f"job {job.job_id} pending ({job.reason or 'queued'}); resumes "
                            "from checkpoints/")
    return "pending", f"job {job.job_id} pending ({job.reason or 'queued'})"


def cancel(store: Store, names: list[str], descendants: bool = True
           ) -> list[tuple[str, str]]:
    """Scancel the queued or running jobs of `names` (and of the stages submitted to wait on
    them); mark those stages cancelled. Returns (stage, job id) for each job cancelled."""
    targets = set(names)
    if descendants:
        grew = True
        while grew:
            grew = False
            for name in store.stage_names():
                latest = store.latest(name)
                deps = ((latest.status() if latest else None) or {}).get("depends_on") or {}
                if name not in targets and targets & set(deps):
                    targets.add(name)
                    grew = True
    attempts = [a for a in (store.latest(n) for n in sorted(targets)) if a is not None]
    jobs = query_attempts(attempts)
    chosen = [(a, slurm_job(a)) for a in attempts]
    chosen = [(a, j) for a, j in chosen if j and jobs.get(j) and jobs[j].active]
    slurm_cli.cancel([j for _, j in chosen])
    for attempt, job_id in chosen:
        attempt.update_status(state="cancelled", ended=time.time(),
                              error=f"cancelled by phi4 cancel (job {job_id})")
    return [(a.name, j) for a, j in chosen]


def annotate(store: Store, rows: list) -> list:
    """`phi4 status` rows, with Slurm's word on stages whose job may still be queued or
    running (their records brought up to date first). Rows of other stages are unchanged."""
    live = [r for r in rows if r.executor == "slurm" and r.state in _LIVE and r.job]
    if not live:
        return rows
    attempts = {r.path: store.attempt(r.stage, r.fingerprint) for r in live}
    try:
        jobs = query_attempts(list(attempts.values()))
    except slurm_cli.SlurmError as err:
        for r in live:
            r.note = f"{r.note + '; ' if r.note else ''}Slurm not reachable: {err}"
        return rows
    reconcile(list(attempts.values()), jobs)
    from ..status import row_for

    out = []
    for r in rows:
        attempt = attempts.get(r.path)
        if attempt is None:
            out.append(r)
            continue
        fresh = row_for(attempt) or r
        said = describe(store, attempt, jobs)
        if said is not None:
            fresh.state, fresh.note = said
        out.append(fresh)
    return out


def reconcile_store(store: Store) -> None:
    """Bring every stage's latest Slurm record up to date (before planning a rerun)."""
    attempts = [a for a in map(store.latest, store.stage_names()) if a is not None]
    attempts = [a for a in attempts if slurm_job(a)]
    if attempts:
        reconcile(attempts, query_attempts(attempts))
