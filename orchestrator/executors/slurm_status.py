"""What the store says about Slurm stages, corrected by what Slurm says about their jobs.

A job's own hooks record its start and end; when they could not (a job cancelled before it
started, killed at its time limit, lost with its node, removed by Slurm because its dependency
can never be met), `reconcile` writes the ending Slurm reports. Stages whose job is still
queued are described from Slurm: pending (and why), or "never ran: upstream X failed" when they
wait on a dependency that can no longer be met.

The jobs of `--executor slurm` and of NeMo-Run's SlurmExecutor are followed alike (the stage
record names the job); a stage submitted through a login node (`login` in its record) is asked
about over ssh there.
"""

from __future__ import annotations

from collections.abc import Callable

from ..records import LIVE, State
from ..store import StageDir, Store
from . import slurm_cli
from .ssh import Login

_BAD = (State.FAILED, State.CANCELLED, State.PREEMPTED, State.BLOCKED)


def on_slurm(executor: str | None, cluster: str | None) -> bool:
    """Whether a record's job is a Slurm job: native, or NeMo-Run's on a cluster."""
    return executor == "slurm" or (executor == "nemo_run" and cluster is not None)


def slurm_job(folder: StageDir) -> str | None:
    """The Slurm job of the folder's latest attempt, while that job may be queued or running."""
    status = folder.status()
    if status is not None and on_slurm(status.executor, status.cluster) and \
            status.state in LIVE:
        return status.job_id
    return None


def login_of(folder: StageDir) -> Login | None:
    status = folder.status()
    return Login.of(status.login) if status is not None and status.login else None


def query_stage_dirs(folders: list[StageDir], budget: float | None = None
                     ) -> dict[str, slurm_cli.Job]:
    """Each folder's job, asked where it was submitted (here, or a login node over ssh)."""
    by_login: dict[Login | None, list[str]] = {}
    for folder in folders:
        job = slurm_job(folder)
        if job:
            by_login.setdefault(login_of(folder), []).append(job)
    jobs: dict[str, slurm_cli.Job] = {}
    for login, ids in by_login.items():
        jobs.update(slurm_cli.query(ids, budget, login))
    return jobs


def reconcile(folders: list[StageDir], jobs: dict[str, slurm_cli.Job]) -> None:
    """Record the end of jobs that ended without their end hook having said so."""
    for folder in folders:
        status = folder.status()
        job_id = slurm_job(folder)
        job = jobs.get(job_id or "")
        if status is None or job is None or job.active or job.state == "UNKNOWN" or \
                status.state not in (State.PENDING, State.RUNNING):
            continue
        code = _exit_code(job.exit_code)
        if job.state == "CANCELLED" and job.never_runs:  # --kill-on-invalid-dep
            root = blocking_upstream(folder.store, folder.name, lambda j: _active(jobs, j))
            folder.end(State.BLOCKED, blocked_by=root[0] if root else None,
                       error=f"never ran: {_upstream_text(root)} (Slurm removed job {job_id}: "
                             f"{job.reason})", ended=status.ended)
            continue
        if job.state == "CANCELLED":
            state, error = State.CANCELLED, f"Slurm job {job_id} was cancelled"
        elif job.state == "PREEMPTED":
            state, error = State.PREEMPTED, f"Slurm job {job_id} was preempted"
        else:
            state, error = State.FAILED, (f"Slurm job {job_id} ended {job.state} (exit "
                                          f"{job.exit_code or '?'}) without phi4's end record; "
                                          f"log: {status.job_log or folder.log_file}")
        folder.end(state, error=error, exit_code=code, ended=status.ended)


def _exit_code(text: str) -> int | None:
    code, _, sig = text.partition(":")
    if not code.isdigit():
        return None
    return -int(sig) if sig.isdigit() and int(sig) else int(code)


def _active(jobs: dict[str, slurm_cli.Job], job_id: str | None) -> bool:
    known = jobs.get(job_id or "")
    return known is not None and known.active


def _upstream_text(root: tuple[str, str] | None) -> str:
    return f"upstream {root[0]} {root[1]}" if root else "an upstream job failed"


def never_ran_because(store: Store, name: str, active: Callable[[str | None], bool]
                      ) -> str | None:
    """`upstream X failed` when `name`'s queued job waits on a stage that ended badly, directly
    or through upstream jobs that are themselves stuck behind it."""
    root = blocking_upstream(store, name, active)
    return _upstream_text(root) if root else None


def blocking_upstream(store: Store, name: str, active: Callable[[str | None], bool],
                      _seen: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """(stage, how it ended) at the root of what keeps `name`'s job from ever starting."""
    folder = store.latest(name)
    status = folder.status() if folder else None
    for upstream in sorted(status.depends_on if status else {}):
        if upstream in _seen:
            continue
        up = store.latest(upstream)
        up_status = up.status() if up else None
        if up is None or up_status is None:
            continue
        if up_status.state in _BAD and not active(slurm_job(up)):
            root = up_status.blocked_by if up_status.state == State.BLOCKED else None
            return (root, State.FAILED) if root else (upstream, up_status.state)
        if up_status.state == State.PENDING:
            found = blocking_upstream(store, upstream, active, _seen | {name})
            if found:
                return found
    return None


def describe(store: Store, folder: StageDir, jobs: dict[str, slurm_cli.Job]
             ) -> tuple[str, str] | None:
    """(state, note) for a stage whose Slurm job is still queued or running; None otherwise.
    The state is a State, or Slurm's own word for an active job in another state."""
    status = folder.status()
    job = jobs.get(slurm_job(folder) or "")
    if status is None or job is None or not job.active:
        return None
    if job.state != "PENDING":
        state = State.RUNNING if job.state in ("RUNNING", "CONFIGURING", "COMPLETING") \
            else job.state.lower()
        ending = " (ending: a rerun replaces it)" if job.ending else ""
        return state, f"Slurm job {job.job_id} {job.state.lower()}{ending}"

    why = never_ran_because(store, folder.name, lambda j: _active(jobs, j))
    if why or job.never_runs:
        return State.BLOCKED, (f"never ran: {why or 'an upstream job failed'} (job "
                               f"{job.job_id} pending: {job.reason or 'Dependency'}; rerun or "
                               "phi4 cancel)")
    if status.state == State.PREEMPTED:
        return State.REQUEUED, (f"job {job.job_id} pending ({job.reason or 'queued'}); resumes "
                                "from checkpoints/")
    return State.PENDING, f"job {job.job_id} pending ({job.reason or 'queued'})"


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
                status = latest.status() if latest else None
                if name not in targets and status and targets & set(status.depends_on):
                    targets.add(name)
                    grew = True
    folders = [f for f in (store.latest(n) for n in sorted(targets)) if f is not None]
    jobs = query_stage_dirs(folders)
    chosen = [(f, slurm_job(f)) for f in folders]
    chosen = [(f, j) for f, j in chosen if j and jobs.get(j) and jobs[j].active]
    by_login: dict[Login | None, list[str]] = {}
    for folder, job_id in chosen:
        by_login.setdefault(login_of(folder), []).append(job_id)
    for login, ids in by_login.items():
        slurm_cli.cancel(ids, login)
    for folder, job_id in chosen:
        folder.end(State.CANCELLED, error=f"cancelled by phi4 cancel (job {job_id})")
    return [(f.name, j) for f, j in chosen]


def annotate(store: Store, rows: list) -> list:
    """`phi4 status` rows, with Slurm's word on stages whose job may still be queued or
    running (their records brought up to date first). Rows of other stages are unchanged."""
    # (NeMo-Run's LocalExecutor records no job: only jobs on a cluster have one.)
    live = [r for r in rows if r.executor in ("slurm", "nemo_run") and r.state in LIVE and r.job]
    if not live:
        return rows
    folders = {r.path: store.stage_dir(r.stage, r.fingerprint) for r in live}
    try:
        # Only a look: retried briefly, then the store's records with a note.
        jobs = query_stage_dirs(list(folders.values()), min(slurm_cli.retry_budget(), 10.0))
    except slurm_cli.SlurmError as err:
        for r in live:
            r.note = f"{r.note + '; ' if r.note else ''}Slurm not reachable: {err}"
        return rows
    reconcile(list(folders.values()), jobs)
    from ..status import row_for

    out = []
    for r in rows:
        folder = folders.get(r.path)
        if folder is None:
            out.append(r)
            continue
        fresh = row_for(folder) or r
        said = describe(store, folder, jobs)
        if said is not None:
            fresh.state, fresh.note = said
        out.append(fresh)
    return out


def reconcile_store(store: Store) -> None:
    """Bring every stage's latest Slurm record up to date (before planning a rerun)."""
    folders = [f for f in map(store.latest, store.stage_names()) if f is not None]
    folders = [f for f in folders if slurm_job(f)]
    if folders:
        reconcile(folders, query_stage_dirs(folders))
