"""Fine-tuning a released Phi-4-mini with LoRA through `pipelines/finetune_phi4_mini.yaml`:
a random tiny HF Phi-3 folder (phi4_mini_tiny's shapes, the demo vocabulary, Phi-4-mini's chat
template) fine-tuned on chat JSONL with tool calls, evaluated against the base model, exported
as a PEFT folder and as a merged HF folder. The pipeline runs once for the module."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._hf_helpers import tiny_mini_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _reverse_task(n: int, seed: int) -> list[dict]:
    """Multiple choice: the words reversed (what the fine-tuning data teaches) or not."""
    from phi4core.data.synthetic import _ADJECTIVES, _NOUNS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_NOUNS + _ADJECTIVES) for _ in range(4)]
        right = " ".join(reversed(words))
        wrong = [" ".join(words), " ".join(words[1:] + words[:1])]
        choices = wrong + [right]
        rng.shuffle(choices)
        out.append({"messages": [{"role": "user",
                                  "content": f"Reverse the words: {' '.join(words)}"}],
                    "choices": choices, "answer": choices.index(right)})
    return out


def phi4(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO,
                          env=_env(work),
                          capture_output=True, text=True, timeout=900)


def _env(work: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(work / "cache"),
            "PYTHONPATH": str(REPO), "PHI4_MINI_HF": str(work / "hf"),
            "PHI4_CHAT_DATA": str(work / "chat")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from phi4core.data.synthetic import write_chat_corpus

    work = tmp_path_factory.mktemp("finetune")
    tiny_mini_folder(work / "hf", cache=work / "cache")
    chat = work / "chat"
    chat.mkdir()
    write_chat_corpus(chat / "train.jsonl", n=240, seed=0, kinds=["reverse", "tool"])
    with (chat / "train.jsonl").open("a") as f:  # one record skipped, one truncated
        f.write(json.dumps({"messages": [{"role": "user", "content": ""}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "Count."}, {
            "role": "assistant", "content": " ".join(["cat dog"] * 200)}]}) + "\n")
    write_chat_corpus(chat / "valid.jsonl", n=24, seed=1, kinds=["reverse", "tool"])
    _write_jsonl(chat / "tasks.jsonl", _reverse_task(24, seed=2))
    store = work / "store"
    proc = phi4(work, "run", "pipelines/finetune_phi4_mini.yaml", "--profile", "tiny",
                "--store", str(store))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    def stage(name: str) -> Path:
        (folder,) = [p for p in (store / "stages" / name).iterdir() if p.is_dir()]
        return folder

    return {"work": work, "store": store, "proc": proc, "stage": stage}


def test_only_the_adapter_trains_and_is_published(run):
    adapter = run["stage"]("text_sft_lora") / "artifacts" / "adapter"
    meta = json.loads((adapter / "phi4_model.json").read_text())
    assert meta["groups"] == ["lora.text"]
    assert meta["model_config"]["lora_text"]["rank"] == 16
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]
    sums = json.loads((adapter / "frozen_checksums.json").read_text())
    assert sums["before"]["combined"] == sums["after"]["combined"]
    assert set(sums["before"]["groups"]) == {"backbone"}
    # the artifact is the adapter's size, not the backbone's
    size = sum(f.stat().st_size for f in adapter.rglob("*.distcp"))
    backbone = (run["work"] / "hf" / "model.safetensors").stat().st_size
    assert size < backbone / 4


def test_eval_stage_shows_trained_below_base(run):
    from orchestrator.records import EvaluationRecord

    record = EvaluationRecord.model_validate_json(
        (run["stage"]("text_sft_lora_eval") / "evaluation.json").read_text())
    base, trained = (record.result("heldout_loss", m) for m in ("base", "trained"))
    assert trained.value < base.value, record
    assert trained.samples == base.samples == 24
    task = record.result("task_accuracy")
    assert task.chance == pytest.approx(1 / 3) and task.samples == 24
    status = phi4(run["work"], "status", "--store", str(run["store"]))
    assert "heldout_loss" in status.stdout and "base" in status.stdout, status.stdout


def _phi4_logits(run, tokens):
    from phi4core.config import InputSpec
    from phi4core.finetune import inputs as fin

    specs = {"backbone": InputSpec(source="hf", path=str(run["work"] / "hf"), frozen=True),
             "adapter": InputSpec(source="stage", artifact="adapter", path=str(
                 run["stage"]("text_sft_lora") / "artifacts" / "adapter"))}
    mc = fin.model_config(specs)
    (model,) = fin.build(mc)
    for name, inp in specs.items():
        fin.load([model], mc, name, inp)
    with torch.no_grad():
        return model(tokens, None, None).float()


def test_exports_load_in_transformers_with_phi4_logits(run):
    from peft import PeftModel
    from transformers import AutoTokenizer, Phi3ForCausalLM

    out = run["stage"]("text_sft_lora_export") / "artifacts"
    tokens = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    mine = _phi4_logits(run, tokens)
    base = Phi3ForCausalLM.from_pretrained(run["work"] / "hf", torch_dtype=torch.float32)
    with torch.no_grad():
        plain = base(tokens).logits.float()
        peft = PeftModel.from_pretrained(base, out / "peft").eval()
        adapted = peft(tokens).logits.float()
        merged = Phi3ForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
        folded = merged(tokens).logits.float()
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the model
    assert (adapted - mine).abs().max() < 1e-4
    assert (folded - mine).abs().max() < 1e-4
    tok = AutoTokenizer.from_pretrained(out / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"


def test_data_preview_shows_the_template_the_loss_and_the_trainers_counts(run, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    for key, value in _env(run["work"]).items():
        monkeypatch.setenv(key, value)
    got = CliRunner().invoke(cli, ["data", "preview", str(REPO / "recipes/text_sft_lora.yaml"),
                                    "--profile", "tiny", "--n", "2", "--format", "json"])
    assert got.exit_code == 0, got.output
    shown = json.loads(got.stdout[got.stdout.index("{"):])
    trainer = json.loads((run["stage"]("text_sft_lora") / "data_report.json").read_text())
    assert shown["reports"] == trainer
    (report,) = trainer
    assert (report["records_read"], report["records_kept"]) == (242, 241)
    assert report["skipped_by_reason"] == {"empty content": 1}
    assert report["adjusted"] == {"truncated": 1}
    text = "\n".join(shown["lines"])
    assert "renders 2 of 2 records as phi4 does" in text or "template:" in text
    assert "⟦" in text and "segment 0" in text and "<|assistant|>⟦" in text
