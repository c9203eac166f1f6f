"""Talking to Slurm through its commands: sbatch, squeue, sacct or scontrol, scancel.

Job states come from `squeue -t all` (queued jobs and those the controller still remembers),
then for ended jobs from `sacct` where accounting is configured, else `scontrol show job`
(which knows jobs for MinJobAge seconds after they end).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# States in which a job may still run (or is finishing): never submit a second one then.
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
          "RESV_DEL_HOLD", "SPECIAL_EXIT"}
NEVER = "DependencyNeverSatisfied"
_TIMEOUT = 60


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and what it printed."""


@dataclass
class Job:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT... ("UNKNOWN": forgotten)
    reason: str = ""
    exit_code: str = ""  # "3:0" (code:signal), when known

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def never_runs(self) -> bool:
        """Waiting on an afterok dependency that failed: only scancel ends it."""
        return self.reason == NEVER


def _run(argv: list[str], input_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, input=input_text,
                              timeout=_TIMEOUT)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is Slurm installed on this machine?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer in {_TIMEOUT} s") from None


def submit(script: Path, dependency: str | None) -> str:
    argv = ["sbatch", "--parsable"]
    if dependency:
        argv.append(f"--dependency={dependency}")
    argv.append(str(script))
    r = _run(argv)
    job_id = r.stdout.strip().split(";")[0]
    if r.returncode != 0 or not job_id.isdigit():
        said = (r.stderr or r.stdout).strip()
        raise SlurmError(f"sbatch {script} failed (exit {r.returncode}): {said}")
    return job_id


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        r = _run(["scancel", *job_ids])
        if r.returncode != 0:
            raise SlurmError(f"scancel {' '.join(job_ids)} failed: {r.stderr.strip()}")


@lru_cache(maxsize=1)
def has_accounting() -> bool:
    """Sacct answers only where slurmdbd keeps accounting ("accounting storage is disabled")."""
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], capture_output=True,
                           text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def query(job_ids: list[str]) -> dict[str, Job]:
    """What Slurm knows of each job; "UNKNOWN" for jobs it has forgotten."""
    ids = sorted({j for j in job_ids if j and j.isdigit()}, key=int)
    if not ids:
        return {}
    jobs: dict[str, Job] = {}
    r = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in ids:
            jobs[parts[0]] = Job(parts[0], parts[1], "" if parts[2] == "None" else parts[2])
    ended = [j for j in ids if j not in jobs or not jobs[j].active]
    if ended:
        details = _sacct(ended) if has_accounting() else {j: _scontrol(j) for j in ended}
        for job_id in ended:
            found = details.get(job_id)
            if found is not None:
                jobs[job_id] = found
    return {j: jobs.get(j, Job(j, "UNKNOWN")) for j in ids}


def _sacct(ids: list[str]) -> dict[str, Job]:
    r = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids),
              "-o", "JobIDRaw,State,ExitCode,Reason"])
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            # "CANCELLED by 0" -> CANCELLED
            out[parts[0]] = Job(parts[0], parts[1].split()[0] if parts[1] else "UNKNOWN",
                                "" if parts[3] == "None" else parts[3], parts[2])
    return out


def _scontrol(job_id: str) -> Job | None:
    r = _run(["scontrol", "-o", "show", "job", job_id])
    if r.returncode != 0:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
    reason = fields.get("Reason", "")
    return Job(job_id, fields.get("JobState", "UNKNOWN"), "" if reason == "None" else reason,
               fields.get("ExitCode", ""))


def ping() -> str | None:
    """None when the controller answers; else why not."""
    try:
        r = _run(["scontrol", "ping"])
    except SlurmError as err:
        return str(err)
    if r.returncode != 0 or "UP" not in r.stdout:
        return (r.stdout + r.stderr).strip() or "scontrol ping failed"
    return None
