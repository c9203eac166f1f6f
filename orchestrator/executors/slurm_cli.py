"""Talking to Slurm through its commands: sbatch, squeue, sacct or scontrol, scancel.

Job states come from `squeue -t all` (queued jobs and those the controller still remembers),
then for ended jobs from `sacct` where accounting is configured, else `scontrol show job`
(which knows jobs for MinJobAge seconds after they end).

A controller that is restarting, overloaded or unreachable makes these commands fail, hang or
print half an answer. Where the cluster is reached over SSH (`via`, a cluster file's `ssh:`),
each command runs on its login node, and ssh's own failures read as Slurm not answering. A
query is retried with backoff (each call under a timeout) for a bounded time, then raises
SlurmUnavailable: never a guess, since "not listed" would read as "ended" and a rerun would
then submit a second copy of a job that is still running.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..words import count
from .ssh import Login

# States in which a job may still run (or is finishing): never submit a second one then.
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
          "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# Active, but the job is ending (scancel, time limit, node failure): it will not produce the
# stage; a rerun replaces it rather than chaining downstream jobs on it.
ENDING = {"COMPLETING", "SIGNALING", "STAGE_OUT"}
NEVER = "DependencyNeverSatisfied"
_FORGOTTEN = "Invalid job id specified"  # squeue/scontrol on jobs the controller no longer knows
_LINE = re.compile(r"\d+(_\d+)?\|[A-Z_]+\|.*")  # squeue -o %i|%T|%r


def call_timeout() -> float:
    """Seconds one Slurm command may take ($PHI4_SLURM_TIMEOUT_S, default 30)."""
    return _seconds("PHI4_SLURM_TIMEOUT_S", 30.0)


def retry_budget() -> float:
    """Seconds a query keeps retrying before it gives up ($PHI4_SLURM_RETRY_S, default 120)."""
    return _seconds("PHI4_SLURM_RETRY_S", 120.0)


def _seconds(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable, default))
    except ValueError:
        return default
    return value if value >= 0 and value == value and value != float("inf") else default


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and what it printed."""


class SlurmUnavailable(SlurmError):
    """Slurm could not say what became of the jobs (its commands failed, hung or printed
    garbage through every retry): their state is unknown, not "ended"."""


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
    def ending(self) -> bool:
        """Still listed but on its way out (cancelled, timed out): not worth waiting on."""
        return self.state in ENDING

    @property
    def never_runs(self) -> bool:
        """Waiting on an afterok dependency that failed: only scancel ends it."""
        return self.reason == NEVER


def _run(argv: list[str], via: Login | None = None) -> subprocess.CompletedProcess:
    timeout = call_timeout()
    full = via.argv(argv, timeout) if via is not None else argv
    try:
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{full[0]} not found: is "
                         f"{'ssh' if via else 'Slurm'} installed on this machine?") from None
    except subprocess.TimeoutExpired:
        on = f" on {via.where}" if via else ""
        raise SlurmUnavailable(f"{' '.join(argv)}{on} did not answer in {timeout:g} s") from None
    if via is not None and r.returncode == 255:  # ssh's own failure, not the command's
        raise SlurmUnavailable(via.problem(r.stderr) or f"ssh to {via.where} failed")
    return r


class _Garbled(Exception):
    """A command answered, but not in the format asked for."""


def _with_retries(what: str, attempt, deadline: float):
    """`attempt()` until it answers, with backoff (0.5 s doubling, at most 10 s between
    tries) until the `time.monotonic()` deadline; then SlurmUnavailable with the last problem.
    `attempt` raises SlurmUnavailable or _Garbled for an answer not to be trusted."""
    pause, tries = 0.5, 0
    while True:
        tries += 1
        try:
            return attempt()
        except (SlurmUnavailable, _Garbled) as err:
            problem = str(err)
        if time.monotonic() + pause > deadline:
            raise SlurmUnavailable(f"{what} failed {count(tries, 'time')} in a row; "
                                   f"last: {problem}")
        time.sleep(pause)
        pause = min(pause * 2, 10.0)


def _said(r: subprocess.CompletedProcess) -> str:
    text = (r.stderr or r.stdout).strip().splitlines()
    return f"exit {r.returncode}" + (f": {text[-1][:200]}" if text else "")


def dependency_args(dependency: str | None) -> list[str]:
    """Sbatch's options for a job that waits on others. Slurm removes the job once its
    dependency can never be met (an afterok upstream failed), and with it, in turn, the jobs
    waiting on it: nothing of a failed run is left queued forever."""
    return [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []


def submit(script: Path, dependency: str | None) -> str:
    argv = ["sbatch", "--parsable", *dependency_args(dependency), str(script)]
    r = _run(argv)
    job_id = r.stdout.strip().split(";")[0]
    if r.returncode != 0 or not job_id.isdigit():
        said = (r.stderr or r.stdout).strip()
        raise SlurmError(f"sbatch {script} failed (exit {r.returncode}): {said}")
    return job_id


def cancel(job_ids: list[str], via: Login | None = None) -> None:
    if job_ids:
        r = _run(["scancel", *job_ids], via)
        if r.returncode != 0:
            raise SlurmError(f"scancel {' '.join(job_ids)} failed: {r.stderr.strip()}")


@lru_cache(maxsize=4)
def has_accounting(via: Login | None = None) -> bool:
    """Sacct answers only where slurmdbd keeps accounting ("accounting storage is disabled")."""
    try:
        r = _run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], via)
    except SlurmError:
        return False
    return r.returncode == 0


def query(job_ids: list[str], budget: float | None = None, via: Login | None = None
          ) -> dict[str, Job]:
    """What Slurm knows of each job; "UNKNOWN" for jobs it has forgotten. SlurmUnavailable
    when Slurm gave no trustworthy answer within `budget` seconds (default retry_budget())."""
    ids = sorted({j for j in job_ids if j and j.isdigit()}, key=int)
    if not ids:
        return {}
    deadline = time.monotonic() + (retry_budget() if budget is None else budget)
    jobs = _with_retries("squeue", lambda: _squeue(ids, via), deadline)
    ended = [j for j in ids if j not in jobs or not jobs[j].active]
    if ended:
        if has_accounting(via):
            details = _with_retries("sacct", lambda: _sacct(ended, via), deadline)
        else:
            details = {j: _with_retries("scontrol show job", lambda j=j: _scontrol(j, via),
                                        deadline)
                       for j in ended}
        for job_id in ended:
            found = details.get(job_id)
            if found is not None:
                jobs[job_id] = found
    return {j: jobs.get(j, Job(j, "UNKNOWN")) for j in ids}


def _squeue(ids: list[str], via: Login | None) -> dict[str, Job]:
    r = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"], via)
    if r.returncode != 0:
        if _FORGOTTEN in r.stderr:  # none of the jobs is known (any longer)
            return {}
        raise SlurmUnavailable(f"squeue {_said(r)}")
    jobs: dict[str, Job] = {}
    for line in r.stdout.splitlines():
        if not line.strip():
            continue
        if not _LINE.fullmatch(line.strip()):
            raise _Garbled(f"squeue printed {line.strip()[:120]!r}")
        job_id, state, reason = line.strip().split("|", 2)
        if job_id in ids:
            jobs[job_id] = Job(job_id, state, "" if reason == "None" else reason)
    return jobs


def _sacct(ids: list[str], via: Login | None) -> dict[str, Job]:
    r = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids),
              "-o", "JobIDRaw,State,ExitCode,Reason"], via)
    if r.returncode != 0:
        raise SlurmUnavailable(f"sacct {_said(r)}")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            # "CANCELLED by 0" -> CANCELLED
            out[parts[0]] = Job(parts[0], parts[1].split()[0] if parts[1] else "UNKNOWN",
                                "" if parts[3] == "None" else parts[3], parts[2])
        elif line.strip():
            raise _Garbled(f"sacct printed {line.strip()[:120]!r}")
    return out


def _scontrol(job_id: str, via: Login | None) -> Job | None:
    """None when the controller has forgotten the job (it ended over MinJobAge ago)."""
    r = _run(["scontrol", "-o", "show", "job", job_id], via)
    if r.returncode != 0:
        if _FORGOTTEN in r.stderr:
            return None
        raise SlurmUnavailable(f"scontrol show job {job_id} {_said(r)}")
    fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
    if fields.get("JobId") != job_id or "JobState" not in fields:
        raise _Garbled(f"scontrol show job {job_id} printed {r.stdout.strip()[:120]!r}")
    reason = fields.get("Reason", "")
    return Job(job_id, fields["JobState"], "" if reason == "None" else reason,
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
