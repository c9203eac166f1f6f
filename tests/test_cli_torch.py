"""The torch-side commands through the real console entry: model-info, convert, data."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def phi4(*args: str, cwd: Path = REPO, env: dict | None = None,
         umask: int | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def test_model_info_reports_the_reference_total() -> None:
    proc = phi4("model-info", "phi4_mini", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["total"] == 3_836_021_760
    assert info["parts"]["embedding"] == 614_596_608


# The reference table (phi4_multimodal.md) summed per module group.
MULTIMODAL_GROUPS = {
    "backbone": 3_836_021_760,
    "vision.encoder": 398_085_280 + 30_480_160,  # used part + unused tail
    "vision.projector": 2_304 + 12_982_272,  # separators + projector
    "audio.encoder": 12_616_704 + 16_000 + 428_605_440,  # conv, relative bias, conformer
    "audio.projector": 2 * 12_589_056,  # speech; vision+speech
    "lora.vision": 369_098_752,
    "lora.speech": 461_373_440,
}


def test_model_info_multimodal_counts_every_built_group_exactly() -> None:
    """Every group counted from its modules equals the reference; the groups whose modules do
    not exist yet are listed, not guessed; with all of them the total is the published one."""
    assert sum(MULTIMODAL_GROUPS.values()) == 5_574_460_224
    proc = phi4("model-info", "phi4_multimodal", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {"backbone", "lora.vision", "lora.speech"} <= set(info["groups"])
    assert set(info["groups"]) | set(info["not_built"]) == set(MULTIMODAL_GROUPS)
    assert not set(info["groups"]) & set(info["not_built"])
    for group, count in info["groups"].items():
        if group == "vision.encoder" and count == MULTIMODAL_GROUPS[group] - 30_480_160:
            continue  # SigLIP's unused tail kept as untrained checkpoint tensors: a row, no group
        assert count == MULTIMODAL_GROUPS[group], group
    assert info["total"] == sum(MULTIMODAL_GROUPS[g] for g in info["groups"])
    assert sum(r["parameters"] for r in info["rows"]) == info["total"]
    rows = {r["name"]: r["parameters"] for r in info["rows"]}
    assert rows["lora.vision"] == 369_098_752 and rows["lora.speech"] == 461_373_440
    if not info["not_built"]:
        assert info["total"] == 5_574_460_224
    text = phi4("model-info", "phi4_multimodal")
    assert text.returncode == 0 and "lora.speech" in text.stdout
    assert "461,373,440" in text.stdout


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


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """prepare-text's dataset and manifest, the demo tokenizer cache, a phi4 checkpoint and an
    HF export: readable by whom the umask allows (never 0600/0700)."""
    sys.path.insert(0, str(REPO / "tests"))
    from _hf_helpers import tiny_phi3

    src = tmp_path / "in" / "a.jsonl"
    src.parent.mkdir()
    src.write_text('{"text": "one plus one is 2"}\n')
    tiny_phi3(seed=3).save_pretrained(tmp_path / "in" / "hf")
    out = tmp_path / "out"
    env = {"PHI4_CACHE": str(out / "cache")}
    commands = [("data", "prepare-text", str(src), "--tokenizer", "demo", "--out",
                 str(out / "data" / "ds")),
                ("convert", "hf-to-phi4", str(tmp_path / "in" / "hf"), str(out / "ckpt")),
                ("convert", "phi4-to-hf", str(out / "ckpt"), str(out / "hf"))]
    for argv in commands:
        proc = phi4(*argv, env=env, umask=umask)
        assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in out.rglob("*") if not p.is_symlink()]
    assert {"ds.bin", "ds.idx", "tokenizer.json", "model.safetensors", "metadata.json"} <= {
        p.name for p in written}
    wrong = []
    for path in written:
        mode = path.stat().st_mode
        full = 0o777 if stat.S_ISDIR(mode) else 0o666
        if mode & 0o777 != full & ~umask:
            wrong.append(f"{oct(mode & 0o777)} {path.relative_to(out)}")
    assert not wrong, wrong
