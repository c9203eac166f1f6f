"""For tests against the local Slurm controller (scripts/slurm_local.sh up)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "clusters" / "local.yaml"
START_HINT = "start it with `make slurm-up` or `scripts/slurm_local.sh up`"


def why_not_up() -> str | None:
    if shutil.which("sbatch") is None:
        return f"sbatch is not on PATH: Slurm is not installed; {START_HINT}"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol ping` failed ({e}); {START_HINT}"
    if r.returncode != 0 or "is UP" not in r.stdout:
        said = (r.stdout + r.stderr).strip().splitlines()
        return f"the Slurm controller is not up ({said[0] if said else 'no answer'}); {START_HINT}"
    return None


def phi4(*args: str, check: int | None = None, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as users run it, from this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("PHI4_STORE", None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, \
            f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(store: Path) -> dict[str, dict]:
    out = phi4("status", "--format", "json", "--store", str(store), check=0)
    return {row["stage"]: row for row in json.loads(out.stdout)["stages"]}


def wait_status(store: Path, done, what: str, timeout: float = 60) -> dict[str, dict]:
    """Poll `phi4 status` until `done(rows)`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = status(store)
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s: "
                        + json.dumps({k: (v["state"], v["note"]) for k, v in rows.items()}))
        time.sleep(0.3)


def job_info(job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job_id}: {r.stderr}"
    return dict(re.findall(r"(\S+?)=(\S*)", r.stdout))


def job_ended(job_id: str, timeout: float = 30) -> dict[str, str]:
    """job_info once the job has left the controller's live states: a stage publishes its
    status before its batch script exits, so "succeeded" in the store can come while Slurm
    still says RUNNING or COMPLETING."""
    deadline = time.monotonic() + timeout
    while (info := job_info(job_id))["JobState"] in LIVE_STATES:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    return info


LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
               "SUSPENDED"}


def recorded(store: Path, stage: str) -> dict:
    """The status.json of a stage's latest attempt."""
    stage_dir = store / "stages" / stage
    fingerprint = (stage_dir / "latest").read_text().strip()
    return json.loads((stage_dir / fingerprint / "status.json").read_text())
