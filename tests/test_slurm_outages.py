"""Slurm misbehaving: squeue/scontrol failing, printing garbage or hanging, and jobs that are
ending when a rerun looks at them. A fake Slurm on PATH (slurm_fake.py) plays the controller,
so these run anywhere."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from dag_helpers import REPO, make_pipeline, phi4, plan_json
from slurm_fake import FakeSlurm, fake_slurm
from slurm_helpers import LOCAL_CLUSTER

from orchestrator.records import State
from orchestrator.store import Store

SLURM = ("--executor", "slurm", "--cluster", str(LOCAL_CLUSTER))


def _fingerprints(pipeline: Path, store: Path, env: dict[str, str]) -> dict[str, str]:
    return {n: s["fingerprint"] for n, s in plan_json(pipeline, store, extra_env=env).items()}


def _queued(store: Path, stage: str, fingerprint: str, job_id: str, *, running: bool = False,
            depends_on: dict[str, str] | None = None):
    """A stage recorded as submitted to Slurm (and started, with `running`) as `job_id`."""
    folder = Store(store).stage_dir(stage, fingerprint)
    folder.queue("slurm", force=False, command=["true"], reasons=["new"], inputs={},
                 depends_on=depends_on)
    folder.record_job(job_id)
    if running:
        folder.begin("slurm", command=["true"], reasons=["new"], inputs={}, job_id=job_id)
    return folder


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, FakeSlurm]:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    return pipeline, tmp_path / "store", fake_slurm(tmp_path / "bin")


@pytest.mark.parametrize("mode", ["fail", "garbage", "hang"])
def test_no_resubmission_while_a_jobs_state_is_unknown(chain, mode: str) -> None:
    """The class: any answer that is not an answer (error, garbage, silence) is "unknown",
    never "the job is gone"; a rerun then submits nothing and says why and what to do."""
    pipeline, store, slurm = chain
    fps = _fingerprints(pipeline, store, slurm.env)
    _queued(store, "a", fps["a"], "101", running=True)
    _queued(store, "b", fps["b"], "102", depends_on={"a": "101"})
    slurm.add_job("101", "RUNNING")
    slurm.add_job("102", "PENDING", "Dependency")
    slurm.down(mode)
    out = phi4("run", str(pipeline), *SLURM, store=store, extra_env=slurm.env, check=2)
    assert slurm.submitted == [] and slurm.cancelled == []
    said = out.stderr
    assert "Traceback" not in said and "\nphi4: not submitting:" in said, said
    assert "a (job 101)" in said and "b (job 102)" in said and "scontrol ping" in said
    assert {"fail": "exit 1", "garbage": "502 Bad Gateway", "hang": "did not answer"}[mode] \
        in said
    # Once Slurm answers, the same rerun keeps both jobs.
    slurm.down(None)
    out = phi4("run", str(pipeline), *SLURM, store=store, extra_env=slurm.env, check=0)
    assert slurm.submitted == [] and "kept       a: job 101" in out.stdout


def test_status_and_a_run_with_nothing_live_still_work_during_an_outage(chain) -> None:
    """Refusing is for stages whose job cannot be seen: with none, sbatch is tried."""
    pipeline, store, slurm = chain
    slurm.down("fail")
    phi4("run", str(pipeline), *SLURM, store=store, extra_env=slurm.env, check=0)
    assert len(slurm.submitted) == 2
    out = phi4("status", store=store, extra_env=slurm.env, check=0)
    assert "Slurm not reachable" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("ending", ["COMPLETING", "SIGNALING"])
def test_a_rerun_replaces_an_ending_job_and_chains_on_the_new_one(chain, ending: str) -> None:
    """Just after an external `scancel`, a's job is still listed (completing) and b's is
    pending on it: both are replaced, and b waits on a's new job, never on the dying one."""
    pipeline, store, slurm = chain
    fps = _fingerprints(pipeline, store, slurm.env)
    _queued(store, "a", fps["a"], "101", running=True)
    _queued(store, "b", fps["b"], "102", depends_on={"a": "101"})
    slurm.add_job("101", ending)
    slurm.add_job("102", "PENDING", "Dependency")
    out = phi4("run", str(pipeline), *SLURM, store=store, extra_env=slurm.env, check=0)
    first, second = slurm.submitted
    assert "--dependency" not in first and first.endswith("/job.sbatch")
    new_a = out.stdout.split("submitted  a: job ")[1].split()[0]
    assert f"--dependency=afterok:{new_a} " in second, (second, out.stdout)
    assert "101" not in second
    assert set(slurm.cancelled) == {"101", "102"}  # a requeue cannot bring them back
    a = Store(store).stage_dir("a", fps["a"]).status()
    assert a is not None and a.state == State.PENDING and a.job_id == new_a


def test_wait_follows_its_jobs_through_an_outage(chain) -> None:
    pipeline, store, slurm = chain
    fps = _fingerprints(pipeline, store, slurm.env)
    argv = [sys.executable, "-m", "orchestrator.cli", "run", str(pipeline), *SLURM, "--store",
            str(store), "--wait", "--poll", "0.1", "--only", "a"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), **slurm.env}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        while not slurm.submitted:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        slurm.down("fail")
        line = ""
        while "Slurm is not answering" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, proc.communicate()
        # Meanwhile the job ran and its hooks recorded success.
        folder = Store(store).stage_dir("a", fps["a"])
        folder.begin("slurm", command=["true"], reasons=["new"], inputs={}, job_id="201")
        folder.end(State.SUCCEEDED, exit_code=0)
        slurm.set_job("201", "COMPLETED")
        slurm.down(None)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "Slurm answers again" in err and "1 succeeded" in err
    assert "Traceback" not in err


def test_a_forced_rerun_is_not_mistaken_for_the_finished_job_still_completing(chain) -> None:
    """Stage a's job recorded success and is still listed as completing: a forced rerun
    submits a new job, leaves the finished one alone, never marks that attempt cancelled."""
    pipeline, store, slurm = chain
    fps = _fingerprints(pipeline, store, slurm.env)
    folder = _queued(store, "a", fps["a"], "101", running=True)
    folder.end(State.SUCCEEDED, exit_code=0)
    slurm.add_job("101", "COMPLETING")
    out = phi4("run", str(pipeline), *SLURM, "--only", "a", "--force", store=store,
               extra_env=slurm.env, check=0)
    assert len(slurm.submitted) == 1 and slurm.cancelled == [], out.stdout
    a = folder.status()
    assert a is not None and (a.state, a.number, a.error) == (State.PENDING, 2, None)
