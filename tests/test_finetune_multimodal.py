"""Fine-tuning a released Phi-4-multimodal's vision adapter through
`pipelines/finetune_phi4_multimodal.yaml`: a random tiny transformers Phi4MultimodalForCausalLM
folder (phi4_multimodal_tiny's shapes, its two adapters as PEFT folders, the demo vocabulary
and Phi-4-mini's chat template) fine-tuned on synthetic images, evaluated against the released
model on held-out synthetic images, then exported. One run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi4core.config import preset
from tests.test_mm_hf_interop import hf_reference, make_hf_folder, mode_inputs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from phi4core.data.chat import PHI4_MINI_CHAT_TEMPLATE
    from phi4core.data.tokenizer import get_demo_tokenizer
    from phi4core.interop.hf import copy_tokenizer
    from phi4core.parallel import init_single_process

    init_single_process()
    work = tmp_path_factory.mktemp("finetune_mm")
    hf = make_hf_folder(preset("phi4_multimodal_tiny"), work / "hf")
    copy_tokenizer(get_demo_tokenizer(work / "cache").path, hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": PHI4_MINI_CHAT_TEMPLATE}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(work / "cache"),
           "PYTHONPATH": str(REPO), "PHI4_MM_HF": str(hf)}
    store = work / "store"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run",
                           "pipelines/finetune_phi4_multimodal.yaml", "--profile", "tiny",
                           "--store", str(store)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    def stage(name: str) -> Path:
        (folder,) = [p for p in (store / "stages" / name).iterdir() if p.is_dir()]
        return folder

    return {"work": work, "hf": hf, "stage": stage, "store": store, "env": env}


def test_only_the_vision_adapter_trains_and_is_published(run):
    adapter = run["stage"]("vision_sft_lora") / "artifacts" / "adapter"
    meta = json.loads((adapter / "phi4_model.json").read_text())
    assert meta["groups"] == ["lora.vision"]
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]
    # the released folder gave every group, its LoRA_V the start of the training
    assert {"backbone", "lora.vision", "lora.speech"} <= set(summary["inputs"]["model"])
    sums = json.loads((adapter / "frozen_checksums.json").read_text())
    assert sums["before"]["combined"] == sums["after"]["combined"]
    assert "lora.vision" not in sums["before"]["groups"]
    assert {"backbone", "lora.speech", "vision.encoder"} <= set(sums["before"]["groups"])


def test_eval_stage_shows_trained_below_base_in_vision_mode(run):
    from orchestrator.records import EvaluationRecord

    record = EvaluationRecord.model_validate_json(
        (run["stage"]("vision_sft_lora_eval") / "evaluation.json").read_text())
    base, trained = (record.result("heldout_image_loss", m) for m in ("base", "trained"))
    assert trained.value < base.value, record
    assert trained.samples == base.samples == 16
    ppl = {m: record.result("heldout_image_perplexity", m).value for m in ("base", "trained")}
    assert ppl["trained"] == pytest.approx(math.exp(trained.value), rel=1e-6)
    assert ppl["trained"] < ppl["base"]
    # the demo's caption questions on the same held-out images, for both models
    for m in ("base", "trained"):
        caption = record.result("caption_accuracy", m)
        assert caption.samples == 16 and caption.chance is not None
    status = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--store",
                             str(run["store"])], cwd=REPO, env=run["env"], capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "heldout_image_loss" in status.stdout and "base" in status.stdout, status.stdout


def test_exports_give_phi4_vision_logits_in_transformers(run):
    from peft import PeftModel
    from transformers import Phi4MultimodalForCausalLM

    from phi4core.config import InputSpec
    from phi4core.finetune import inputs as fin

    out = run["stage"]("vision_sft_lora_export") / "artifacts"
    specs = {"model": InputSpec(source="hf", path=str(run["hf"]), frozen=True),
             "adapter": InputSpec(source="stage", artifact="adapter", path=str(
                 run["stage"]("vision_sft_lora") / "artifacts" / "adapter"))}
    mc = fin.model_config(specs)
    (model,) = fin.build(mc)
    for name, inp in specs.items():
        fin.load([model], mc, name, inp)
    x = mode_inputs(mc)["vision"]
    with torch.no_grad():
        mine = model(x["input_ids"], None, None, input_mode="vision",
                     **{k: v for k, v in x.items() if k != "input_ids"}).float()
        released = hf_reference(run["hf"])
        released.set_adapter("vision")
        before = released(**x).logits.float()
        base = Phi4MultimodalForCausalLM.from_pretrained(run["hf"], attn_implementation="eager")
        base.config.vision_config._attn_implementation = "eager"
        tuned = PeftModel.from_pretrained(base, out / "peft", adapter_name="vision").eval()
        adapted = tuned(**x).logits.float()
        whole = hf_reference(out / "hf")
        whole.set_adapter("vision")
        folder = whole(**x).logits.float()
    assert (mine - before).abs().max() > 1e-3  # fine-tuning changed the vision adapter
    assert (adapted - mine).abs().max() < TOL
    assert (folder - mine).abs().max() < TOL
    assert (out / "hf" / "tokenizer.json").is_file()
