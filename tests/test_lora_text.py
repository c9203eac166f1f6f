"""The fine-tuning adapter lora.text: on a text model's decoder, run in language mode, set per
recipe (model.lora.text), published as the `adapter` artifact; eval/export stage recipes."""

from __future__ import annotations

import pytest
import torch

from phi4core.config import LoraConfig, preset


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


def test_text_adapter_starts_as_the_base_and_runs_in_language_mode(single):
    from phi4core.models.decoder import build_model, param_groups
    from phi4core.models.lora import lora_linears

    mc = preset("phi4_mini_tiny")
    lora = mc.model_copy(update={"lora_text": LoraConfig(rank=4, alpha=8,
                                                         targets=["qkv_proj", "down_proj"])})
    torch.manual_seed(0)
    base = build_model(mc).eval()
    torch.manual_seed(0)
    tuned = build_model(lora).eval()
    assert sorted(param_groups(tuned)) == ["backbone", "lora.text"]
    assert tuned.lora_router.adapter == "text"
    assert {t.name for _, t, _ in lora_linears(tuned)} == {"qkv_proj", "down_proj"}
    x = torch.randint(0, mc.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = tuned(x, None, None)
        assert torch.equal(same, base(x, None, None))  # B starts at zero: exactly the base
        for _, _, linear in lora_linears(tuned):
            linear.lora_text.B.normal_(0, 0.1)
        assert (tuned(x, None, None) - same).abs().max() > 1e-3


def test_recipe_sets_the_adapter_and_outputs_it():
    from orchestrator.config import load_recipe
    from orchestrator.config.checks import model_of
    from phi4core.module_groups import artifact_groups

    loaded = load_recipe("recipes/text_sft_lora.yaml", "tiny")
    mc = model_of(loaded.recipe)
    assert (mc.lora_text.rank, mc.lora_text.alpha, mc.lora_text.dropout) == (16, 32, 0.05)
    assert mc.module_groups == ["backbone", "lora.text"]
    assert artifact_groups("adapter", mc.module_groups, ["lora.text"]) == ("lora.text",)
    mm = preset("phi4_multimodal_tiny").module_groups
    assert artifact_groups("adapter", mm, ["lora.vision"]) == ("lora.vision",)


@pytest.mark.parametrize("body, message", [
    ("model: {preset: phi4_mini, lora: {video: {rank: 4, alpha: 8}}}",
     "unknown LoRA adapter 'video'"),
    ("model: {preset: phi4_mini, lora: {text: {rank: 4, alpha: 8, targets: [q_proj]}}}",
     "unknown LoRA targets"),
    ("model: {preset: phi4_mini, lora: {text: {rank: 0, alpha: 8}}}", "greater than 0"),
])
def test_bad_adapter_settings_are_one_line_errors(tmp_path, body, message):
    from orchestrator.config import load_recipe
    from orchestrator.config.errors import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n" + body + "\ntokenizer: demo\ntrainable: [lora.text]\n"
                      "outputs: [adapter]\ndata: {sources: [{kind: synthetic, modality: chat}]}\n"
                      "train: {steps: 2, global_batch_size: 2, seq_length: 64, lr: 1.0e-3}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert message in str(err.value) and "r.yaml:2" in str(err.value)


@pytest.mark.parametrize("body, message", [
    ("kind: eval\ninputs: {base: {hf: /x, frozen: true}}\n", "needs `evaluate:`"),
    ("kind: eval\nevaluate: {heldout: v.jsonl, base: [nope]}\ninputs: {base: {hf: /x}}\n",
     "names no input"),
    ("kind: eval\nevaluate: {}\ninputs: {base: {hf: /x}}\n", "needs `heldout:`"),
    ("kind: export\ninputs: {base: {hf: /x}}\noutputs: [gguf]\n", "peft (the adapter"),
    ("kind: export\ninputs: {base: {hf: /x}}\noutputs: [peft]\n"
     "data: {sources: [{kind: synthetic, modality: chat}]}\n",
     "belongs to train stages"),
    ("kind: export\noutputs: [peft]\n", "needs inputs"),
])
def test_eval_and_export_recipes_are_checked(tmp_path, body, message):
    from orchestrator.config import load_recipe
    from orchestrator.config.errors import ConfigError

    recipe = tmp_path / "s.yaml"
    recipe.write_text("name: s\n" + body)
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert message in str(err.value)


def test_profiles_apply_to_the_finetune_pipeline(monkeypatch):
    from orchestrator.config import load_pipeline

    monkeypatch.setenv("PHI4_MINI_HF", "/models/mini")
    for profile in ("tiny", "1gpu"):
        stages = load_pipeline("pipelines/finetune_phi4_mini.yaml", profile).stages
        train = stages["text_sft_lora"].recipe
        assert train.tokenizer == "/models/mini"
        assert train.inputs["backbone"].hf == "/models/mini"
        assert stages["text_sft_lora_eval"].recipe.kind == "eval"
        assert stages["text_sft_lora_export"].recipe.outputs == ["peft", "hf"]
    assert train.resources.gpus_per_node == 1 and train.train.micro_batch_size == 2
