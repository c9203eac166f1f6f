"""What a job script asks of phi4 at the start and end of its stage
(`python -m orchestrator stage-hook begin|end STAGE_DIR`): the bookkeeping the local executor
does around its child process, done on the node, in the store, with the same code.

`begin` answers OK (run the stage), SKIP (already published: end the job successfully) or
FAILURE (an upstream has nothing published); `end` answers OK, PREEMPTED (requeue the job) or
the failure to report. The shell that reads these answers is rendered from the same constants
(exitcodes.py)."""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path

from ..exitcodes import FAILURE, OK, PREEMPTED, SKIP
from ..records import InputRecord, State
from ..store import StageDir, Store
from . import slurm_cli
from .outcomes import record_exit


def stage_dir_at(path: str | Path) -> StageDir:
    """<store>/stages/<name>/<fingerprint> -> its StageDir."""
    path = Path(path).resolve()
    return Store(path.parents[2]).stage_dir(path.parent.name, path.name)


def begin(path: str | Path) -> int:
    folder = stage_dir_at(path)
    name, job = folder.name, os.environ.get("SLURM_JOB_ID")
    queued = folder.status()
    inputs = folder.store.with_digests(queued.inputs if queued else {})
    # Skip only what the submission would have found up to date: not forced, published, and
    # made from the input files there are now (plan._republished_inputs asks the same).
    if not (queued and queued.force) \
            and folder.artifact_problem(folder.declared_outputs()) is None \
            and not folder.changed_inputs({n: r.digest for n, r in inputs.items()
                                           if r.source == "stage"}):
        if queued is None or queued.state != State.SUCCEEDED:
            folder.end(State.SUCCEEDED, exit_code=queued.exit_code if queued else None)
        print(f"=== phi4: {name} is already published (another run finished it); "
              f"job {job} ends here", flush=True)
        return SKIP
    # An upstream that ended without publishing (afterany, NeMo-Run), or whose artifact was
    # changed after it was published: verified before the stage reads it.
    missing = _missing_input(folder, inputs) or folder.input_problem(inputs)
    if missing is not None:
        if job:
            folder.record_job(job)
        folder.end(State.BLOCKED, blocked_by=missing[0], error=missing[1])
        print(f"=== phi4: {name} cannot start: {missing[1]}", flush=True)
        return FAILURE
    record = folder.begin(
        (queued.executor if queued else None) or "slurm",
        command=queued.command if queued else [], reasons=queued.reasons if queued else [],
        inputs=inputs, job_id=job, restarts=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        nodes=os.environ.get("SLURM_JOB_NODELIST"))
    print(f"=== phi4 attempt {record.attempt} of {name} ({folder.fingerprint}) as Slurm "
          f"job {job} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
          f"{shlex.join(record.command)}", flush=True)
    return OK


def _missing_input(folder: StageDir, inputs: dict[str, InputRecord]
                   ) -> tuple[str, str] | None:
    for record in inputs.values():
        if record.source != "stage" or not record.stage or not record.fingerprint:
            continue
        upstream = folder.store.stage_dir(record.stage, record.fingerprint)
        if upstream.published_version() is None or upstream.manifest() is None:
            return record.stage, f"upstream {record.stage} has no published artifact"
    return None


def end(path: str | Path, code: int) -> int:
    """Record the step's exit; returns the job script's verdict: OK done, PREEMPTED to be
    requeued, anything else failed or stopped."""
    folder = stage_dir_at(path)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    outputs = folder.declared_outputs()
    # RUNNING: the stage stopped by itself (or on our USR1). Anything else (COMPLETING):
    # Slurm is ending the job (scancel, preemption, time limit) and decides what follows.
    stopping = job_id and _job_state(job_id) not in ("RUNNING", "UNKNOWN")
    status = folder.status()
    if code != 0 and status is not None and status.state == State.CANCELLED:
        print(f"=== phi4: {folder.name} was cancelled (exit code {code})", flush=True)
        return FAILURE
    if code == PREEMPTED:
        if stopping:
            note = "checkpointed as Slurm stopped the job; rerun to resume"
        else:
            note = f"checkpointed; requeued as job {job_id}, resumes from checkpoints/"
        record_exit(folder, outputs, code, preempted_note=note)
        print(f"=== phi4: {folder.name} preempted: {note}", flush=True)
        return FAILURE if stopping else PREEMPTED
    outcome = record_exit(folder, outputs, code, cancelled=code != 0 and stopping)
    print(f"=== phi4: {folder.name} {outcome.state}"
          + (f": {outcome.detail}" if outcome.detail else ""), flush=True)
    if outcome.state == State.SUCCEEDED:
        return OK
    return code if 0 < code < 256 and code != PREEMPTED else FAILURE


def _job_state(job_id: str) -> str:
    try:
        # Briefly: Slurm's KillWait (30 s by default) is all a cancelled job has left.
        return slurm_cli.query([job_id], budget=5)[job_id].state
    except slurm_cli.SlurmError:
        return "UNKNOWN"
