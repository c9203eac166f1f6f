"""The Mixture of LoRAs at TP=2, PP=2 and with sequence parallelism against TP=1, on CPU with
gloo: 2 processes under torchrun (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_parallel_mp import _free_port

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
pytestmark = pytest.mark.cpu_only  # gloo ranks, CPU initialisation split over TP


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_lora")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "mp_lora_worker.py"), str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_lora_tp2_matches_tp1(result):
    # really split: qkv A replicated [r, h], B on rows; o_proj A on columns, B replicated
    assert result["tp2_qkv_lora_shapes"] == [[4, 96], [80, 4]]
    assert result["tp2_proj_lora_shapes"] == [[4, 48], [96, 4]]
    assert max(result["tp2_logits_maxdiff"].values()) <= TOL  # vision and speech modes
    for a, b in zip(result["loss_tp1"], result["loss_tp2"], strict=True):
        assert abs(a - b) <= TOL, (result["loss_tp1"], result["loss_tp2"])
    assert result["loss_tp1"][-1] < result["loss_tp1"][0]  # LoRA_V alone learns
    assert result["tp2_adapter_after_maxdiff"] <= TOL
    assert result["tp2_frozen_speech_maxdiff"] == 0.0  # the frozen adapter never moved


@pytest.mark.slow
def test_lora_merged_at_tp2_gives_the_unmerged_logits(result):
    assert result["tp2_merged_vision_maxdiff"] <= TOL


@pytest.mark.slow
def test_lora_pp2_matches_tp1(result):
    for a, b in zip(result["loss_tp1"], result["loss_pp2"], strict=True):
        assert abs(a - b) <= TOL, (result["loss_tp1"], result["loss_pp2"])
    assert result["pp2_adapter_after_maxdiff"] <= TOL
    assert result["pp2_adapter_tensors"] == 8  # one layer per stage, 4 linears x (A, B)


@pytest.mark.slow
def test_lora_checkpoint_tp2_loads_at_tp1(result):
    assert result["ckpt_tp2_to_tp1_adapter_maxdiff"] == 0.0


@pytest.mark.slow
def test_lora_sequence_parallel_matches_tp1(result):
    for sp in (0, 1):
        diffs = result[f"sp_pair_maxdiff_sp{sp}"]
        assert set(diffs) == {"y", "col.A.grad", "col.B.grad", "row.A.grad", "row.B.grad"}
        assert max(diffs.values()) <= TOL, diffs
