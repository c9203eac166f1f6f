"""Two processes under torchrun (gloo): TP=2 and DP=2 train and agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi4core.train.testing import tiny_spec, write_spec

REPO = Path(__file__).resolve().parents[1]
# Two ranks on one machine (gloo), and TP=2 equal to DP=2 only with CPU initialisation.
pytestmark = pytest.mark.cpu_only


def _torchrun(spec, path: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(cache)}
    with open(path.with_suffix(".log"), "w") as log:  # a file, not a pipe: see test_train_stage
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "phi4core", "train", str(path)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=300).returncode
    assert rc == 0, path.with_suffix(".log").read_text()[-4000:]
    return json.loads((Path(spec.output_dir) / "model" / "train_summary.json").read_text())


@pytest.mark.slow
def test_tp2_and_dp2(tmp_path):
    tp = tiny_spec(tmp_path, "tp2", steps=6, save_interval=3)
    tp.parallel.tp, tp.world_size = 2, 2
    dp = tiny_spec(tmp_path, "dp2", steps=6, save_interval=3)
    dp.world_size = 2
    a = _torchrun(tp, write_spec(tp, tmp_path / "tp2.json"), tmp_path / "cache")
    b = _torchrun(dp, write_spec(dp, tmp_path / "dp2.json"), tmp_path / "cache")
    assert a["last_loss"] < a["first_loss"] - 1.0
    # CPU initialisation builds full weights and splits them: same start, same data, same loss.
    assert a["first_loss"] == pytest.approx(b["first_loss"], abs=1e-5)
    assert a["last_loss"] == pytest.approx(b["last_loss"], abs=1e-4)
    # The global grad norm (clipped at 1.0 here) must not count TP-duplicated norms twice.
    norms = [[json.loads(x)["grad_norm"]
              for x in (Path(s.stage_dir) / "metrics.jsonl").read_text().splitlines()]
             for s in (tp, dp)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4) and max(norms[0]) > 1.0
    ckpts = sorted(p.name for p in (Path(tp.stage_dir) / "checkpoints").iterdir())
    assert ckpts == ["step_3", "step_6"]


@pytest.mark.slow
def test_pp2_trains_and_resumes_bit_identical_after_sigkill(tmp_path):
    """Pipeline parallel (1F1B over gloo): a run killed after its first checkpoint and rerun
    ends with the same weights as an uninterrupted one."""
    import signal
    import time

    def pp2(name: str):
        spec = tiny_spec(tmp_path, name, steps=8, save_interval=4)
        spec.parallel.pp, spec.world_size = 2, 2
        return spec

    whole = pp2("whole")
    a = _torchrun(whole, write_spec(whole, tmp_path / "whole.json"), tmp_path / "cache")
    assert a["last_loss"] < a["first_loss"] - 1.0

    killed = pp2("killed")
    path = write_spec(killed, tmp_path / "killed.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": str(tmp_path / "cache")}
    with open(tmp_path / "killed.first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "2", "-m", "phi4core", "train", str(path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    meta = Path(killed.stage_dir) / "checkpoints" / "step_4" / "meta.json"
    deadline = time.monotonic() + 240
    while not meta.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meta.is_file(), (tmp_path / "killed.first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (Path(killed.output_dir) / "model").exists()
    b = _torchrun(killed, path, tmp_path / "cache")
    assert b["resumed_from_step"] >= 4
    assert b["weights_sha256"] == a["weights_sha256"]
