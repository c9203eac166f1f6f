"""The benchmark scripts run (the GPU one exits cleanly without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.cpu_only
def test_gpu_smoke_without_gpu_exits_cleanly():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "skipped" and "no CUDA GPU" in out["reason"]


@pytest.mark.slow
def test_decoder_cpu_bench_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "decoder_cpu.py"), "--seconds", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ratio"] > 0 and out["logits_max_abs_diff"] < 1e-4


def test_validate_startup_bench_prints_ratios_to_the_floor():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "validate_startup.py"), "--runs", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(line.startswith("floor: pydantic+omegaconf+yaml+click") for line in lines)
    for label in ("phi4 validate (9 stages)", "... with --profile tiny"):
        line = next(line for line in lines if label in line)
        assert "x floor" in line and "x bare" in line
