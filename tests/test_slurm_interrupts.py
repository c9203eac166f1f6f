"""A training stage on the local Slurm controller stopped by `scancel` (SIGTERM to every process
of the job, megatron's checkpoint helpers included) while it writes a checkpoint, with an older
one already on disk: the checkpoint completes, the stage is resumable, and the rerun ends with
the weights of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from interrupt_helpers import hold_env, pending, wait_until, writer_pid
from slurm_helpers import LOCAL_CLUSTER, REPO, phi4, recorded, wait_status, why_not_up

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
RECIPE = str(REPO / "recipes" / "text_pretrain.yaml")
# 40 steps whatever the tiny profile gives the demo (its text stages run longer)
TINY = ("--profile", "tiny", "--set", "train.steps=40", "--set", "train.save_interval=10")
SLURM = ("--executor", "slurm", "--cluster", str(LOCAL_CLUSTER))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    reason = why_not_up()
    if reason:
        pytest.skip(reason)
    return {"OMP_NUM_THREADS": "1", "PHI4_CACHE": str(tmp_path_factory.mktemp("cache"))}


def _summary(store: Path) -> dict:
    (path,) = (store / "stages" / "text_pretrain").glob("*/artifacts/model/train_summary.json")
    return json.loads(path.read_text())


def test_scancel_while_a_checkpoint_is_written_then_the_rerun_is_bit_identical(
        env, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    phi4("run", RECIPE, *TINY, "--store", str(reference), env=env, check=0, timeout=600)

    store, hold = tmp_path / "store", tmp_path / "hold"
    phi4("run", RECIPE, *TINY, *SLURM, "--store", str(store), check=0,
         env={**env, **hold_env(hold, 20)})
    job = recorded(store, "text_pretrain")["job_id"]
    stage_dir = Path(recorded(store, "text_pretrain")["script"]).parent
    try:
        writer = writer_pid(hold)  # step_10 is on disk, step_20 is being written
        subprocess.run(["scancel", job], check=True, timeout=30)
        wait_until(lambda: signal.SIGTERM in pending(writer), "SIGTERM held off by the writer",
                   timeout=60)
    finally:
        (hold / "hold").unlink()
    rows = wait_status(store, lambda r: r["text_pretrain"]["state"] != "running",
                       "the end of the cancelled job", timeout=120)
    log = (stage_dir / "logs" / "stdout.log").read_text()
    assert rows["text_pretrain"]["state"] in ("preempted", "cancelled"), log[-3000:]
    assert "preempted (signal 15): checkpoint at step 20" in log, log[-3000:]
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()
                  if (p / "meta.json").is_file()) == ["step_10", "step_20"]
    plan = json.loads(phi4("plan", RECIPE, *TINY, "--store", str(store), "--format", "json",
                           env=env, check=0).stdout)
    assert plan["stages"][0]["reasons"][0].endswith("will resume from the checkpoint at step 20")

    out = phi4("run", RECIPE, *TINY, *SLURM, "--store", str(store), "--wait", "--poll", "0.5",
               env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _summary(store)["resumed_from_step"] == 20
    assert _summary(store)["weights_sha256"] == _summary(reference)["weights_sha256"]
