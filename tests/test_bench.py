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


def test_run_all_runs_every_cpu_bench_with_its_own_defaults(monkeypatch):
    """run_all picks up every bench script but the GPU one, and each sees only its own name in
    sys.argv (not the runner's filter arguments, which its argparse would reject)."""
    import runpy

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "bench"))
    seen = []
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["run_all.py"])
    run_all.main()
    names = [Path(argv[0]).stem for argv in seen]
    assert "multimodal_cpu" in names and "decoder_cpu" in names and "gpu_smoke" not in names
    assert all(len(argv) == 1 for argv in seen)
    seen.clear()
    monkeypatch.setattr(sys, "argv", ["run_all.py", "multimodal_cpu"])
    run_all.main()
    assert seen == [[str(ROOT / "bench" / "multimodal_cpu.py")]]


@pytest.mark.slow
def test_multimodal_cpu_bench_reports_every_mode_with_tower_shares():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "multimodal_cpu.py"),
                        "--seconds", "0.1", "--rounds", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] == "multimodal_cpu" and out["image_crops"] > 1
    towers = {"language": [], "vision": ["vision"], "speech": ["audio"],
              "vision_speech": ["vision", "audio"]}
    assert sorted(out["modes"]) == sorted(towers)
    for mode, res in out["modes"].items():
        assert res["ratio"] > 0 and res["logits_max_abs_diff"] < 1e-4, mode
        for model in ("phi4core", "transformers"):
            fig = res[model]
            assert fig["ms_per_sample"] > 0
            assert sorted(fig["shares"]) == sorted(towers[mode] + ["decoder"]), (mode, model)
            assert abs(sum(fig["shares"].values()) - 1.0) < 0.01
    lines = [line for line in r.stderr.splitlines() if "ms/sample" in line]
    assert len(lines) == 4


def test_multimodal_cpu_bench_rejects_an_unknown_mode():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "multimodal_cpu.py"),
                        "--modes", "vision,video"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "video" in r.stderr and "vision_speech" in r.stderr


@pytest.mark.cpu_only
def test_memory_estimate_bench_without_gpu_exits_cleanly():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_estimate.py")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "skipped"
