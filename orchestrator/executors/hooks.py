"""What a Slurm batch script asks of phi4 at the start and end of its stage
(`python -m orchestrator stage-hook begin|end STAGE_DIR`): the bookkeeping the local executor
does around its child process, done on the node, in the store, with the same code."""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path

from phi4core.exitcodes import PREEMPTED

from ..store import Attempt, Store, read_json
from . import slurm_cli
from .attempts import fill_digests, record_exit

SKIP = 3  # begin: the stage is already published; the job ends at once, successfully


def attempt_at(stage_dir: str | Path) -> Attempt:
    """<store>/stages/<name>/<fingerprint> -> its Attempt."""
    path = Path(stage_dir).resolve()
    return Store(path.parents[2]).attempt(path.parent.name, path.name)


def _outputs(attempt: Attempt) -> list[str]:
    return list((read_json(attempt.spec) or {}).get("outputs") or [])


def begin(stage_dir: str | Path) -> int:
    attempt = attempt_at(stage_dir)
    name, job = attempt.name, os.environ.get("SLURM_JOB_ID")
    status = attempt.status() or {}
    inputs = fill_digests(attempt.store, status.get("inputs") or {})
    # Skip only what the submission would have found up to date: not forced, published, and
    # made from the input files there are now (plan._republished_inputs asks the same).
    if not status.get("force") and attempt.artifact_problem(_outputs(attempt)) is None \
            and not attempt.changed_inputs({n: r.get("digest") for n, r in inputs.items()
                                            if r.get("source") == "stage"}):
        if status.get("state") != "succeeded":
            attempt.update_status(state="succeeded", ended=time.time(), error=None)
        print(f"=== phi4: {name} is already published (another run finished it); "
              f"job {job} ends here", flush=True)
        return SKIP
    missing = _missing_input(attempt, status.get("inputs") or {})
    if missing is not None:  # an upstream that ended without publishing (afterany, NeMo-Run)
        attempt.update_status(state="blocked", blocked_by=missing, ended=time.time(),
                              error=f"upstream {missing} has no published artifact", job_id=job)
        print(f"=== phi4: {name} cannot start: upstream {missing} has no published artifact",
              flush=True)
        return 1
    record = attempt.begin(attempt.fields() or {}, executor=status.get("executor") or "slurm",
                           job_id=job,
                           restarts=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                           nodes=os.environ.get("SLURM_JOB_NODELIST"),
                           inputs=inputs)
    command = record.get("command") or []
    print(f"=== phi4 attempt {record['attempt']} of {name} ({attempt.fingerprint}) as Slurm "
          f"job {job} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
          f"{shlex.join(command)}", flush=True)
    return 0


def _missing_input(attempt: Attempt, inputs: dict[str, dict]) -> str | None:
    for record in inputs.values():
        if record.get("source") != "stage":
            continue
        upstream = attempt.store.attempt(record["stage"], record["fingerprint"])
        if upstream.artifact_problem([record["artifact"]]) is not None:
            return record["stage"]
    return None


def end(stage_dir: str | Path, code: int) -> int:
    """Record the step's exit; returns the batch script's verdict: 0 done, PREEMPTED to be
    requeued, anything else failed or stopped."""
    attempt = attempt_at(stage_dir)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    # RUNNING: the stage stopped by itself (or on our USR1). Anything else (COMPLETING):
    # Slurm is ending the job (scancel, preemption, time limit) and decides what follows.
    stopping = job_id and _job_state(job_id) not in ("RUNNING", "UNKNOWN")
    if code != 0 and (attempt.status() or {}).get("state") == "cancelled":
        print(f"=== phi4: {attempt.name} was cancelled (exit code {code})", flush=True)
        return 1
    if code == PREEMPTED:
        if stopping:
            note = "checkpointed as Slurm stopped the job; rerun to resume"
        else:
            note = f"checkpointed; requeued as job {job_id}, resumes from checkpoints/"
        record_exit(attempt, _outputs(attempt), code, preempted_note=note)
        print(f"=== phi4: {attempt.name} preempted: {note}", flush=True)
        return 1 if stopping else PREEMPTED
    outcome = record_exit(attempt, _outputs(attempt), code, cancelled=code != 0 and stopping)
    print(f"=== phi4: {attempt.name} {outcome.state}"
          + (f": {outcome.detail}" if outcome.detail else ""), flush=True)
    if outcome.state == "succeeded":
        return 0
    return code if 0 < code < 256 and code != PREEMPTED else 1


def _job_state(job_id: str) -> str:
    try:
        return slurm_cli.query([job_id])[job_id].state
    except slurm_cli.SlurmError:
        return "UNKNOWN"
