"""The tiny phi4_mini pipeline trained through the local Slurm controller, and a training job
preempted by the pre-timeout signal: it checkpoints, is requeued, resumes, and ends with the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import LOCAL_CLUSTER, REPO, job_info, phi4, recorded, wait_status, why_not_up

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PIPELINE = str(REPO / "pipelines" / "phi4_mini.yaml")
# 40 steps whatever the tiny profile gives the demo (its text stages run longer)
SLURM = ("--profile", "tiny", "--set", "train.steps=40", "--set", "train.save_interval=20",
         "--executor", "slurm", "--cluster", str(LOCAL_CLUSTER))


def _summary(store: Path, stage: str) -> dict:
    (path,) = (store / "stages" / stage).glob("*/artifacts/model/train_summary.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    reason = why_not_up()
    if reason:
        pytest.skip(reason)
    return {"OMP_NUM_THREADS": "1", "PHI4_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> Path:
    """Both tiny stages trained through Slurm, uninterrupted."""
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    t0 = time.monotonic()
    out = phi4("run", PIPELINE, *SLURM, "--store", str(store), "--wait", "--poll", "0.5",
               env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"tiny phi4_mini through Slurm: {time.monotonic() - t0:.1f} s")
    return store


def test_tiny_pipeline_trains_through_slurm(trained: Path, env) -> None:
    for stage in ("text_pretrain", "text_post_train"):
        row = recorded(trained, stage)
        assert (row["state"], row["executor"], row["attempt"]) == ("succeeded", "slurm", 1)
        assert _summary(trained, stage)["weights_sha256"]
        assert (Path(row["script"]).parent / "artifacts" / "manifest.json").is_file()
    again = phi4("run", PIPELINE, *SLURM, "--store", str(trained), env=env, check=0)
    assert "nothing to run: 2 stages up to date" in again.stdout


def test_pre_timeout_signal_checkpoints_requeues_and_resumes_bit_identical(
        trained: Path, env, tmp_path: Path) -> None:
    store = tmp_path / "store"
    phi4("run", PIPELINE, *SLURM, "--store", str(store), "--only", "text_pretrain", env=env,
         check=0)
    job = recorded(store, "text_pretrain")["job_id"]
    stage_dir = Path(recorded(store, "text_pretrain")["script"]).parent
    metrics = stage_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # a few steps in
        assert time.monotonic() < deadline, (stage_dir / "logs" / "stdout.log").read_text()
        time.sleep(0.1)
    # What slurmctld sends signal_lead_s (60 s here) before the job's time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    rows = wait_status(store, lambda r: r["text_pretrain"]["state"] in ("succeeded", "failed"),
                       "the end of text_pretrain", timeout=180)
    log = (stage_dir / "logs" / "stdout.log").read_text()
    assert rows["text_pretrain"]["state"] == "succeeded", log[-3000:]
    assert job_info(job)["Restarts"] == "1" and rows["text_pretrain"]["attempt"] == 2
    assert "requeued as job" in log
    resumed = _summary(store, "text_pretrain")
    assert 0 < resumed["resumed_from_step"] < 40  # it stopped mid-way, then went on
    assert resumed["weights_sha256"] == _summary(trained, "text_pretrain")["weights_sha256"]
