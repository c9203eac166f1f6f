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


def test_a_folders_own_chat_template_is_compared_with_phi4s_rendering(tmp_path):
    import json
    import os
    from pathlib import Path

    from phi4core.data.chat import PHI4_MINI_CHAT_TEMPLATE, chat_template_check
    from phi4core.data.tokenizer import PhiTokenizer, get_demo_tokenizer
    from phi4core.interop.hf import copy_tokenizer

    cache = os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4"
    copy_tokenizer(get_demo_tokenizer(cache).path, tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for template, agree in ((PHI4_MINI_CHAT_TEMPLATE, True),
                            ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                             "{% endfor %}", False)):
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({**config, "chat_template": template}))
        lines = chat_template_check(PhiTokenizer.from_dir(tmp_path), [data], 5)
        assert ("renders 1 of 1 records" in lines[0]) == agree, lines
        assert (len(lines) == 1) == agree
    assert "<|user|>hi<|end|><|assistant|>hello<|end|><|endoftext|>" in lines[2]


class _Oracle(torch.nn.Module):
    """Logits that predict, at every position, the next token of the known sequence sharing
    the longest prefix with the row: right on those sequences, wrong off them."""

    def __init__(self, sequences, vocab: int) -> None:
        super().__init__()
        self.sequences, self.vocab = [list(map(int, s)) for s in sequences], vocab

    def forward(self, tokens, position_ids=None, attention_mask=None, **_):
        out = torch.full((*tokens.shape, self.vocab), -10.0)
        for r, row in enumerate(tokens.tolist()):
            for p in range(len(row)):
                best = max(self.sequences, key=lambda s: (
                    next((k for k in range(min(p + 1, len(s))) if s[k] != row[k]), p + 1)))
                if p + 1 < len(best):
                    out[r, p, best[p + 1]] = 10.0
        return out


@pytest.mark.parametrize("kind", ["multiple_choice", "exact_match"])
def test_task_accuracy_scores_right_and_wrong_models(tmp_path, kind):
    import json
    import os
    from pathlib import Path

    from phi4core.config import EvalTask
    from phi4core.data.tokenizer import get_demo_tokenizer
    from phi4core.finetune.evaluate import ScoredSet, accuracy

    tok = get_demo_tokenizer(os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4")
    records = [{"messages": [{"role": "user", "content": f"Reverse: cat dog {w}"}],
                "choices": [f"{w} dog cat", f"cat dog {w}", f"dog {w} cat"], "answer": 0}
               for w in ("red", "blue", "old", "new")]
    if kind == "exact_match":
        records = [{"messages": r["messages"], "answer": r["choices"][0]} for r in records]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    scored = ScoredSet(EvalTask(name="t", kind=kind, path=str(path)), tok, 100)
    right = [choices[answer][0] for choices, answer in scored.items]
    wrong = [choices[answer][0][:-2] for choices, answer in scored.items]  # stops early
    if kind == "multiple_choice":
        wrong = [choices[1][0] for choices, _ in scored.items]
        assert scored.chance == pytest.approx(1 / 3)
    assert accuracy(_Oracle(right, tok.vocab_size), scored, tok.pad_id) == 1.0
    assert accuracy(_Oracle(wrong, tok.vocab_size), scored, tok.pad_id) == 0.0


def test_analytic_counts_include_the_text_adapter(single):
    from phi4core.models.decoder import build_meta_model, param_groups
    from phi4core.param_counts import parameter_counts

    mc = preset("phi4_mini").model_copy(update={"lora_text": LoraConfig(rank=16, alpha=32)})
    m = build_meta_model(mc)
    params = dict(m.named_parameters())
    torch_counts = {g: sum(params[n].numel() for n in names)
                    for g, names in param_groups(m).items()}
    assert torch_counts["lora.text"] == 23_068_672 == parameter_counts(mc).groups["lora.text"]
