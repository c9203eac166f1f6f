"""What a training stage publishes through `phi4 run`: nothing when its loss, gradients or
weights are not finite; files the team can read; a model that converts from any of its folders.

One tiny pipeline of four independent stages is run once, under umask 027: `healthy`, and
three that must fail: `grad_nan` (train.lr 1e30: the gradients become NaN after one step),
`loss_nan` (an {hf} input with a NaN weight: the loss is NaN from the first step) and
`weights_nan` (the same input trained for one step, under the skipped-step limit: only the
final check of the weights can stop it).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UMASK = 0o027

TINY = """\
extends: {base}
model: {{preset: phi4_mini, size: tiny}}
tokenizer: demo
data: {{sources: [{{kind: synthetic, modality: text, samples: 200}}]}}
precision: {{params: fp32, fp8: "off"}}
parallel: {{tp: 1, pp: 1, cp: 1, sequence_parallel: false}}
resources: {{nodes: 1, gpus_per_node: 0, procs_per_node: 1, time: "00:30:00"}}
train: {{steps: 6, seq_length: 128, global_batch_size: 4, micro_batch_size: 2, lr: 3.0e-3,
        warmup_steps: 0, save_interval: 3, max_skipped_steps: 2}}
logging: {{interval: 1, tensorboard: false}}
"""
STAGES = {
    "healthy": "",
    "grad_nan": "train: {lr: 1.0e30}\n",
    "loss_nan": "inputs: {backbone: {hf: HF_NAN}}\n",
    "weights_nan": "inputs: {backbone: {hf: HF_NAN}}\ntrain: {steps: 1}\n",
}
FAILS = {"grad_nan": "gradient norm is nan", "loss_nan": "loss is nan",
         "weights_nan": "hold NaN or inf values"}


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _env(work: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(work / "cache"),
            "PYTHONPATH": str(REPO)}


def phi4(work: Path, *args: str, umask: int = UMASK) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO,
                          env=_env(work), capture_output=True, text=True, timeout=900,
                          preexec_fn=lambda: os.umask(umask))


def _nan_hf_folder(out: Path) -> None:
    """A Phi3ForCausalLM folder with phi4_mini_tiny's shapes and one NaN weight."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi4core.config import PRESETS
    from phi4core.interop.hf import hf_config_from_model_config

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**hf_config_from_model_config(PRESETS["phi4_mini_tiny"])))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("results")
    _nan_hf_folder(work / "hf_nan")
    (work / "tiny.yaml").write_text(TINY.format(base=REPO / "recipes" / "_base" / "text.yaml"))
    for name, body in STAGES.items():
        (work / f"{name}.yaml").write_text(
            f"extends: tiny.yaml\nname: {name}\n" + body.replace("HF_NAN", str(work / "hf_nan")))
    (work / "pipeline.yaml").write_text(
        "name: results\nstages: [" + ", ".join(f"{n}.yaml" for n in STAGES) + "]\n")
    store = work / "store"
    proc = phi4(work, "run", str(work / "pipeline.yaml"), "--store", str(store), "--keep-going")
    status = json.loads(phi4(work, "status", "--store", str(store), "--format", "json").stdout)
    return {"work": work, "store": store, "proc": proc,
            "state": {row["stage"]: row["state"] for row in status["stages"]}}


def _stage_dir(run, name: str) -> Path:
    (folder,) = [p for p in (run["store"] / "stages" / name).iterdir() if p.is_dir()]
    return folder


def test_healthy_stage_succeeds_with_its_tokenizer(run):
    out = run["proc"].stdout + run["proc"].stderr
    assert run["state"]["healthy"] == "succeeded", out[-3000:]
    model = _stage_dir(run, "healthy") / "artifacts" / "model"
    assert (model / "tokenizer" / "tokenizer.json").is_file()
    summary = _strict((model / "train_summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["last_loss"] < summary["first_loss"]
    assert "match" not in _strict((model / "frozen_checksums.json").read_text())


@pytest.mark.parametrize("name", sorted(FAILS))
def test_non_finite_stage_fails_and_publishes_nothing(run, name):
    assert run["proc"].returncode == 1
    assert run["state"][name] == "failed", run["state"]
    folder = _stage_dir(run, name)
    assert not (folder / "artifacts").exists() and not (folder / "manifest.json").exists()
    log = (folder / "logs" / "stdout.log").read_text()
    assert FAILS[name] in log and "nothing is published" in log, log[-3000:]
    assert "Traceback" not in log
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        _strict(line)  # no bare NaN: null instead


def test_store_files_follow_the_umask(run):
    """Group may read (umask 027 allows it), others may not: nothing narrower, nothing wider."""
    wrong = []
    for path in [run["store"], *run["store"].rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        want = 0o055 if stat.S_ISDIR(mode) else 0o044  # read (and enter) for group and others
        if mode & want != want & ~UMASK:
            wrong.append(f"{oct(mode & 0o777)} {path.relative_to(run['store'])}")
    assert not wrong, wrong[:10]


def test_convert_phi4_to_hf_from_a_stage_folder_and_a_step(run):
    from safetensors.torch import load_file

    work, folder = run["work"], _stage_dir(run, "healthy")
    exports = {}
    for label, src in (("stage", folder), ("step", folder / "checkpoints" / "step_3")):
        out = work / f"hf_{label}"
        proc = phi4(work, "convert", "phi4-to-hf", str(src), str(out), umask=0o022)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
        for f in [out, *out.iterdir()]:
            assert f.stat().st_mode & 0o777 == (0o755 if f.is_dir() else 0o644), f
        exports[label] = load_file(out / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert not exports["stage"][name].equal(exports["step"][name])  # step 3 is not step 6
    published = load_file(work / "hf_stage" / "model.safetensors")
    via_artifact = work / "hf_artifact"
    assert phi4(work, "convert", "phi4-to-hf", str(folder / "artifacts" / "model"),
                str(via_artifact)).returncode == 0
    assert load_file(via_artifact / "model.safetensors")[name].equal(published[name])


def test_convert_phi4_to_hf_refuses_what_it_cannot_use(run, tmp_path):
    work = run["work"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        _stage_dir(run, "loss_nan"): "no published model and no intact training checkpoint",
        _stage_dir(run, "weights_nan"): "hold NaN or inf values",
        tmp_path / "empty": "not a phi4 checkpoint",
        tmp_path / "file": "not a folder",
    }
    for src, message in cases.items():
        proc = phi4(work, "convert", "phi4-to-hf", str(src), str(tmp_path / "out"))
        assert proc.returncode == 2 and message in proc.stderr, (src, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
