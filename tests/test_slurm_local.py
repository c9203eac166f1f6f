"""The local one-node Slurm (scripts/slurm_local.sh up) does what the orchestrator relies on.

Submission, completion seen through `scontrol show job` (there is no sacct), afterok chains whose
parent fails, several jobs at once, and USR1 delivered to a batch script's trap (how preemption
and the pre-timeout signal reach a job). Skipped when Slurm is not installed or not up.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm_helpers import job_info, why_not_up

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm():
    """Skips when the controller is down; cancels whatever the tests left queued."""
    reason = why_not_up()
    if reason:
        pytest.skip(reason)
    submitted: list[str] = []
    yield submitted
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True, timeout=30)


def sbatch(submitted: list[str], script: str, *args: str, cwd: Path) -> str:
    r = subprocess.run(
        ["sbatch", "--parsable", "--job-name=phi4-test", "--time=5", "--mem-per-cpu=1G", *args],
        input=script, capture_output=True, text=True, cwd=cwd, timeout=30,
    )
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit(), r.stdout
    submitted.append(job_id)
    return job_id


def wait_for(job_id: str, ok, what: str, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if ok(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id}: no {what} after {timeout:.0f} s: "
                        f"JobState={info.get('JobState')} Reason={info.get('Reason')}")
        time.sleep(0.1)


def state_is(*states: str):
    return lambda info: info.get("JobState") in states


def test_cluster_file_names_the_local_partition(slurm):
    cluster = yaml.safe_load((REPO / "clusters" / "local.yaml").read_text())
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    partitions = {p.rstrip("*") for p in r.stdout.split()}
    assert cluster["name"] == "local"
    assert cluster["partition"] in partitions, partitions


def test_trivial_job_completes(slurm, tmp_path):
    t0 = time.monotonic()
    job = sbatch(slurm, "#!/bin/bash\necho hello from $SLURM_JOB_ID\n",
                 f"--output={tmp_path}/%j.out", cwd=tmp_path)
    info = wait_for(job, state_is("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "end")
    assert info["JobState"] == "COMPLETED", info
    assert info["ExitCode"] == "0:0"
    assert (tmp_path / f"{job}.out").read_text().strip() == f"hello from {job}"
    print(f"job {job}: submit to COMPLETED in {time.monotonic() - t0:.2f} s")


def test_afterok_on_a_failed_job_never_runs(slurm, tmp_path):
    # A is held until B is queued, so B surely depends on a job that has not ended yet.
    a = sbatch(slurm, "#!/bin/bash\nexit 3\n", "--hold", "--output=/dev/null", cwd=tmp_path)
    b = sbatch(slurm, "#!/bin/bash\ntouch ran\n", f"--dependency=afterok:{a}",
               "--output=/dev/null", cwd=tmp_path)
    assert job_info(b)["Dependency"].startswith(f"afterok:{a}")
    subprocess.run(["scontrol", "release", a], check=True, timeout=30)
    info_a = wait_for(a, state_is("FAILED", "COMPLETED"), "end")
    assert info_a["JobState"] == "FAILED" and info_a["ExitCode"] == "3:0", info_a
    info_b = wait_for(b, lambda i: i.get("Reason") == "DependencyNeverSatisfied",
                      "Reason=DependencyNeverSatisfied")
    assert info_b["JobState"] == "PENDING", info_b
    subprocess.run(["scancel", b], check=True, timeout=30)
    wait_for(b, state_is("CANCELLED"), "CANCELLED")
    assert not (tmp_path / "ran").exists()


def test_two_jobs_run_at_once(slurm, tmp_path):
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                              timeout=30).stdout.split()[0].rstrip("+"))
    if cpus < 2:
        pytest.skip(f"the node has {cpus} CPU")
    # Each job needs the other to be running: they finish only if they overlap.
    job = ("#!/bin/bash\ntouch {me}\n"
           "for i in $(seq 200); do [ -e {other} ] && exit 0; sleep 0.1; done\nexit 1\n")
    x = sbatch(slurm, job.format(me="x", other="y"), "--output=/dev/null", cwd=tmp_path)
    y = sbatch(slurm, job.format(me="y", other="x"), "--output=/dev/null", cwd=tmp_path)
    for j in (x, y):
        info = wait_for(j, state_is("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "end")
        assert info["JobState"] == "COMPLETED", f"jobs did not overlap: {info}"


def test_usr1_reaches_the_batch_script_trap(slurm, tmp_path):
    # `scancel --signal=USR1 --batch` is what slurmctld does at --signal=B:USR1@N before the
    # time limit, and what we use to test preemption handling without waiting minutes.
    script = (
        "#!/bin/bash\n"
        "trap 'echo got USR1; exit 0' USR1\n"
        "echo ready\n"
        "for i in $(seq 600); do sleep 0.1 & wait $!; done\n"
        "echo no signal; exit 1\n"
    )
    out = tmp_path / "usr1.out"
    job = sbatch(slurm, script, "--signal=B:USR1@60", f"--output={out}", cwd=tmp_path)
    info = wait_for(job, state_is("RUNNING", "COMPLETED", "FAILED"), "RUNNING")
    assert info["JobState"] == "RUNNING", info
    deadline = time.monotonic() + 30
    while not (out.exists() and "ready" in out.read_text()):
        assert time.monotonic() < deadline, "the batch script never printed 'ready'"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_for(job, state_is("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "end")
    assert info["JobState"] == "COMPLETED", (info, out.read_text())
    assert "got USR1" in out.read_text()
