"""The torch-side commands through the real console entry: model-info, convert, data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def phi4(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=300)


def test_model_info_reports_the_reference_total() -> None:
    proc = phi4("model-info", "phi4_mini", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["total"] == 3_836_021_760
    assert info["parts"]["embedding"] == 614_596_608


def test_model_info_unknown_preset_is_a_clear_error() -> None:
    proc = phi4("model-info", "phi4_mni")
    assert proc.returncode == 2 and "did you mean 'phi4_mini'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_convert_round_trip_through_the_cli(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from _hf_helpers import tiny_phi3
    from safetensors.torch import load_file

    tiny_phi3(seed=3).save_pretrained(tmp_path / "hf")
    assert phi4("convert", "hf-to-phi4", str(tmp_path / "hf"),
                str(tmp_path / "ckpt")).returncode == 0
    back = phi4("convert", "phi4-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    assert back.returncode == 0, back.stderr
    source = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(next((tmp_path / "hf2").glob("*.safetensors")))
    assert source.keys() == exported.keys()
    assert all(source[k].equal(exported[k]) for k in source)


def test_convert_missing_folder(tmp_path: Path) -> None:
    proc = phi4("convert", "hf-to-phi4", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_data_prepare_text_counts_bad_records(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "one plus one is 2"}\nnot json\n{"text": ""}\n{"text": "ok"}\n')
    env = {"PHI4_CACHE": str(tmp_path / "cache")}
    proc = phi4("data", "prepare-text", str(src), "--tokenizer", "demo", "--out",
                str(tmp_path / "out" / "ds"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "kept 2, skipped 2" in proc.stdout
    assert (tmp_path / "out" / "ds.bin").is_file() and (tmp_path / "out" / "ds.idx").is_file()
    fatal = phi4("data", "prepare-text", str(src), "--tokenizer", "demo", "--out",
                 str(tmp_path / "out2" / "ds"), "--on-bad-record", "fail", env=env)
    assert fatal.returncode == 2 and f"{src}:2:" in fatal.stderr
