"""The held-out evaluators: loss/perplexity, exact-answer accuracy and its chance, and the
evaluation.json a stage writes (phi4core.evaluation)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from phi4core.config import preset
from phi4core.data.tokenizer import get_demo_tokenizer
from phi4core.evaluation.answers import (
    blind_exact_chance,
    blind_token_chance,
    exact_match,
    score_answers,
    token_accuracy,
)
from phi4core.evaluation.language import heldout_loss, heldout_texts, text_batches


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def random_lm():
    from phi4core.models.decoder import build_model
    from phi4core.parallel import init_single_process

    init_single_process()
    torch.manual_seed(0)
    return build_model(preset("phi4_mini_tiny"))


def _docs(tokenizer, n=12):
    from phi4core.data.synthetic import TEXT_GENERATORS, generate

    return heldout_texts(tokenizer, [r["text"] for r in generate(TEXT_GENERATORS, n, seed=5)])


def test_heldout_loss_is_token_weighted_whatever_the_batching(tokenizer, random_lm):
    docs = _docs(tokenizer)
    one = heldout_loss(random_lm, text_batches(docs, 64, tokenizer.pad_id, batch_size=5))
    other = heldout_loss(random_lm, text_batches(docs, 64, tokenizer.pad_id, batch_size=12))
    assert one.tokens == other.tokens == sum(min(len(d) - 1, 64) for d in docs)
    assert one.samples == 12
    assert one.loss == pytest.approx(other.loss, rel=1e-5)
    # An untrained model guesses: its perplexity is of the order of the vocabulary's size.
    assert 0.3 * tokenizer.vocab_size < one.perplexity < 3 * tokenizer.vocab_size
    assert random_lm.training  # the model's mode is restored


def test_heldout_loss_refuses_batches_without_scored_tokens(tokenizer, random_lm):
    (batch,) = text_batches(_docs(tokenizer, 2), 32, tokenizer.pad_id)
    batch["loss_mask"].zero_()
    with pytest.raises(ValueError, match="no scored token"):
        heldout_loss(random_lm, [batch])


class _Oracle(torch.nn.Module):
    """Logits peaked on the labels, except at the positions `wrong` marks."""

    def __init__(self, labels: torch.Tensor, wrong: torch.Tensor, vocab: int = 16):
        super().__init__()
        self.labels, self.wrong, self.vocab = labels, wrong, vocab

    def forward(self, tokens, position_ids, attention_mask, **kw):
        target = torch.where(self.wrong, (self.labels + 1) % self.vocab, self.labels)
        return torch.nn.functional.one_hot(target, self.vocab).float()


def test_answers_are_scored_token_by_token_and_exactly():
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.float)
    # row 0 wrong only outside its answer; row 1 wrong on one answer token; row 2 right
    wrong = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    batch = {"tokens": labels, "labels": labels, "loss_mask": mask,
             "position_ids": torch.arange(4).expand(3, 4)}
    scored = score_answers(_Oracle(labels, wrong), [batch])
    assert [s.target for s in scored] == [(3, 4), (3, 4), (6, 7)]
    assert [s.exact for s in scored] == [True, False, True]
    assert exact_match(scored) == pytest.approx(2 / 3)
    assert token_accuracy(scored) == pytest.approx(5 / 6)
    batch["loss_mask"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="no answer tokens"):
        score_answers(_Oracle(labels, wrong), [batch])


def test_blind_chance_is_the_prior_of_the_other_items():
    q = ["count?"] * 3 + ["colour?"] * 2
    targets = [(1, 9), (1, 9), (2, 9), (5, 9), (6, 9)]
    # count: (1, 9) guessed right twice (the others hold a 1 each time), (2, 9) only its 9
    # (no other answer starts with 2: the 9 most often second); colour: each item sees only
    # the other colour, then its 9 (by position)
    assert blind_exact_chance(q, targets) == pytest.approx(2 / 5)
    assert blind_token_chance(q, targets) == pytest.approx(7 / 10)
    assert blind_exact_chance(["q"] * 3, [(1,), (2,), (3,)]) == 0.0  # no prior to learn
    with pytest.raises(ValueError):
        blind_token_chance([], [])


def test_an_untrained_model_scores_no_better_than_chance_on_held_out_speech(tmp_path, tokenizer):
    """The evaluator a speech stage runs, on an untrained model: it must not look trained."""
    from phi4core.evaluation.stage import media_accuracy
    from phi4core.models.multimodal import build_multimodal_model
    from phi4core.parallel import init_single_process

    init_single_process()
    torch.manual_seed(0)
    mc = preset("phi4_multimodal_tiny")
    model = build_multimodal_model(mc)
    results = media_accuracy(model, "speech", tmp_path, tokenizer, 256, mc.vision, items=16)
    assert [r.name for r in results] == ["transcription_accuracy", "transcription_exact_match",
                                         "translation_accuracy", "translation_exact_match"]
    for r in results:
        assert r.samples == 16 and 0 <= r.chance < 0.8
        assert r.value <= r.chance + 0.05, r


def test_evaluation_json_is_the_orchestrators_record(tmp_path):
    from orchestrator.records import EvaluationRecord
    from phi4core.evaluation.stage import Result, write_evaluation

    spec = SimpleNamespace(name="vision_sft", fingerprint="abc", stage_dir=str(tmp_path))
    path = write_evaluation(spec, [Result("caption_accuracy", 0.75, 0.3, 48),
                                   Result("heldout_perplexity", 3.5, 512.0, 64, False)])
    record = EvaluationRecord.model_validate_json(path.read_text())
    assert record.result("caption_accuracy").value == 0.75
    assert record.result("heldout_perplexity").higher_is_better is False
    assert math.isclose(record.result("heldout_perplexity").chance, 512.0)


def test_image_heldout_reads_an_energon_dataset_as_its_chat_records(tmp_path, tokenizer):
    """The same records, packed by `phi4 data pack-images` and as a chat JSONL with images,
    give the same held-out loss over the same first max_samples samples, in vision mode."""
    import json

    from phi4core.config import DataSource
    from phi4core.data.pack_images import pack_images
    from phi4core.data.tokenizer import IMAGE_PLACEHOLDER
    from phi4core.finetune.image_heldout import ImageHeldout
    from phi4core.models.multimodal import build_multimodal_model
    from phi4core.parallel import init_single_process
    from tests._vision_helpers import write_corpus

    images, _ = write_corpus(tmp_path / "src", 7)
    packed_lines, chat_lines = [], []
    for i in range(7):
        reply = [{"role": "assistant", "content": f"cap number {i}"}]
        packed_lines.append({"images": [f"cap{i}.png"], "messages": [
            {"role": "user", "content": "<|image_1|> Describe the image."}] + reply})
        chat_lines.append({"images": [f"src/images/cap{i}.png"], "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER} Describe the image."}] + reply})
    for name, lines in (("packed.jsonl", packed_lines), ("chat.jsonl", chat_lines)):
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    dataset = pack_images(images, tmp_path / "packed.jsonl", tmp_path / "ds", shard_size=3).out

    init_single_process()
    torch.manual_seed(0)
    mc = preset("phi4_multimodal_tiny")
    model = build_multimodal_model(mc)

    def measured(source: dict) -> dict:
        held = ImageHeldout([DataSource(**source)], tokenizer, 600, mc.vision, 5, tmp_path)
        return {r["name"]: r for r in held.measure(model, "base", "cpu")}

    packed = measured({"kind": "webdataset", "path": str(dataset)})
    chat = measured({"kind": "chat_jsonl", "path": str(tmp_path / "chat.jsonl")})
    assert packed["heldout_image_loss"]["samples"] == chat["heldout_image_loss"]["samples"] == 5
    assert packed["heldout_image_loss"]["value"] == pytest.approx(
        chat["heldout_image_loss"]["value"], rel=1e-5)
    assert set(packed) == {"heldout_image_loss", "heldout_image_perplexity"}


@pytest.mark.parametrize("source, error", [
    ({"kind": "synthetic", "modality": "audio"}, r"heldout_images\[0\] \(synthetic audio\)"),
    ({"kind": "lhotse", "path": "x"}, r"heldout_images\[0\] \(lhotse\)"),
])
def test_image_heldout_sources_are_image_text_ones(source, error):
    from phi4core.config import Evaluate

    with pytest.raises(ValueError, match=error):
        Evaluate(heldout_images=[source])
    assert Evaluate(heldout_images=[{"kind": "synthetic", "modality": "image"}]).heldout is None


def test_eval_recipe_anchors_image_heldout_paths_and_points_at_bad_sources(tmp_path):
    from orchestrator.config import load_recipe
    from orchestrator.config.errors import ConfigError

    recipe = tmp_path / "sub" / "s.yaml"
    recipe.parent.mkdir()
    head = "name: s\nkind: eval\ninputs: {model: {hf: /x, frozen: true}}\nevaluate:\n"
    recipe.write_text(head + "  heldout_images: [{kind: webdataset, path: held}]\n")
    (source,) = load_recipe(recipe).recipe.evaluate.heldout_images
    assert source.path == str(recipe.parent / "held")
    recipe.write_text(head + "  heldout_images: [{kind: synthetic, modality: speech}]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert "heldout_images[0] (synthetic speech)" in str(err.value)
    assert "s.yaml:" in str(err.value)
