"""The held-out evaluations a stage runs when its training ends, into `evaluation.json`.

A stage trained on the synthetic demo sources is measured on held-out records of the same
generators, drawn with a seed no training corpus uses (`HELDOUT_SEED`):

* heldout_perplexity (every stage): the language model's perplexity on held-out demo text,
  in language mode; chance is the vocabulary size (a uniform guess). A multimodal stage
  trains no backbone and language mode uses no adapter, so it must leave this exactly as the
  text stages left it.
* for each medium, questions asked of every held-out record, scored as answer-token accuracy
  (`<task>_accuracy`) and exact match (`<task>_exact_match`) under teacher forcing
  (phi4core.evaluation.answers), each with the score of a media-blind guess as chance:
  caption ("Describe the image.": "3 red circles."), transcription and translation (spoken
  words: "red cat.", "rouge chat."), sound_description (audio pulses), joint_caption
  (image_audio).

Stages on other sources (real corpora) write no evaluations here: their held-out sets belong to
an evaluation stage. The file is the orchestrator's EvaluationRecord (stage, fingerprint,
results), written atomically by rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from phi4core.data.synthetic import HELDOUT_SEED
from phi4core.evaluation.answers import (
    blind_exact_chance,
    blind_token_chance,
    exact_match,
    score_answers,
    token_accuracy,
)
from phi4core.evaluation.language import heldout_loss, heldout_texts, text_batches
from phi4core.files import write_json

log = logging.getLogger("phi4core.evaluation")

TEXT_DOCS = 64
TEXT_SEQ = 128  # fixed, whatever the stage's seq_length: text stages and multimodal ones compare
MEDIA_ITEMS = 48
BATCH = 8
EVALUATION_FILE = "evaluation.json"
MEDIA = ("image", "audio", "image_audio", "speech")


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    chance: float
    samples: int
    higher_is_better: bool = True

    def record(self) -> dict:
        return {"name": self.name, "value": self.value, "chance": self.chance,
                "samples": self.samples, "higher_is_better": self.higher_is_better,
                "model": "trained"}

    def line(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        return (f"{self.name} {self.value:.4g} (chance {self.chance:.4g}, {better} is better, "
                f"{self.samples} held-out samples)")


def evaluated_modalities(spec) -> list[str] | None:
    """The media modalities to measure, or None when the stage reads non-synthetic data."""
    if any(s.kind != "synthetic" for s in spec.data.sources):
        return None
    seen = []
    for s in spec.data.sources:
        if s.modality in MEDIA and s.modality not in seen:
            seen.append(s.modality)
    return seen


def text_perplexity(model: torch.nn.Module, tokenizer, docs: int = TEXT_DOCS,
                    seq_length: int = TEXT_SEQ, device: torch.device | str = "cpu") -> Result:
    from phi4core.data.synthetic import TEXT_GENERATORS, generate

    texts = [r["text"] for r in generate(TEXT_GENERATORS, docs, HELDOUT_SEED)]
    batches = text_batches(heldout_texts(tokenizer, texts), seq_length, tokenizer.pad_id, BATCH)
    result = heldout_loss(model, batches, device)
    return Result("heldout_perplexity", result.perplexity, float(tokenizer.vocab_size),
                  result.samples, higher_is_better=False)


@dataclass(frozen=True)
class Task:
    """One held-out question asked of every held-out record of a modality."""

    name: str
    question: str
    answer: Callable[[dict], str]  # from the record's truth


def _tasks() -> dict[str, list[Task]]:
    from phi4core.data import synthetic_media as sm

    return {
        "image": [Task("caption", "Describe the image.",
                       lambda t: f"{sm.describe_image(t['image'])}.")],
        "audio": [Task("sound_description", "Describe the sound.",
                       lambda t: f"{sm.describe_audio(t['audio'])}.")],
        "speech": [Task("transcription", sm.TRANSCRIBE,
                        lambda t: f"{t['audio']['text']}."),
                   Task("translation", sm.TRANSLATE,
                        lambda t: f"{t['audio']['translation']}.")],
        "image_audio": [Task("joint_caption", "Describe the image and the sound.",
                             lambda t: f"{sm.describe_image(t['image'])} and "
                                       f"{sm.describe_audio(t['audio'])}.")],
    }


def heldout_corpus(folder: Path, modality: str, seq_length: int,
                   items: int = MEDIA_ITEMS, vision=None) -> Path:
    """The index of `items` held-out records of `modality` (images sized for a model of
    `vision`), written under `folder` on first use (atomically; reused after)."""
    from phi4core.data.multimodal import synthetic_image_options
    from phi4core.data.synthetic_media import write_media_corpus

    extra, name = {}, f"heldout_{modality}_{items}"
    if "image" in modality:
        suffix, extra = synthetic_image_options(seq_length, vision)
        name += suffix
    return write_media_corpus(folder / name, modality, items, seed=HELDOUT_SEED, **extra)


def task_accuracy(model: torch.nn.Module, index: Path, modality: str, task: Task, tokenizer,
                  seq_length: int, vision, device: torch.device | str = "cpu") -> list[Result]:
    """`model` (on `device`) asked `task.question` about each record of `index`: its answers' token
    accuracy (`<task>_accuracy`) and exact match (`<task>_exact_match`), with their chances."""
    from phi4core.data.jsonl import iter_jsonl, write_jsonl
    from phi4core.data.multimodal import MultimodalCollator, MultimodalDataset, media_modality
    from phi4core.data.report import DataReport
    from phi4core.data.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER

    records = [r for _, r in iter_jsonl([index], DataReport(name="heldout"), "fail")]
    asked = [{**r, "messages": [
        {"role": "user", "content": IMAGE_PLACEHOLDER * len(r["images"])
         + AUDIO_PLACEHOLDER * len(r["audios"]) + task.question},
        {"role": "assistant", "content": task.answer(r["truth"])}]} for r in records]
    task_index = index.with_name(f"{task.name}.jsonl")
    write_jsonl(task_index, asked)
    dataset = MultimodalDataset(task_index, tokenizer, seq_length, vision,
                                media_modality(modality), "fail")
    collate = MultimodalCollator(seq_length, tokenizer.pad_id, vision)
    batches = (collate([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))])
               for start in range(0, len(dataset), BATCH))
    scored = score_answers(model, batches, device)
    questions = [task.question] * len(scored)
    targets = [s.target for s in scored]
    return [Result(f"{task.name}_accuracy", token_accuracy(scored),
                   blind_token_chance(questions, targets), len(scored)),
            Result(f"{task.name}_exact_match", exact_match(scored),
                   blind_exact_chance(questions, targets), len(scored))]


def media_accuracy(model: torch.nn.Module, modality: str, folder: Path, tokenizer,
                   seq_length: int, vision, items: int = MEDIA_ITEMS,
                   device: torch.device | str = "cpu") -> list[Result]:
    """Every held-out task of `modality` (see `_tasks`)."""
    index = heldout_corpus(folder, modality, seq_length, items, vision)
    return [r for task in _tasks()[modality]
            for r in task_accuracy(model, index, modality, task, tokenizer, seq_length, vision,
                                   device)]


def evaluate_stage(spec, model: torch.nn.Module, tokenizer) -> list[Result] | None:
    """Run the stage's evaluations on `model` (one unwrapped chunk); None when it has none."""
    modalities = evaluated_modalities(spec)
    if modalities is None:
        return None
    device = next(model.parameters()).device  # the batches go where the model is
    results = [text_perplexity(model, tokenizer, device=device)]
    folder = Path(spec.stage_dir) / "data"
    for modality in modalities:
        results.extend(media_accuracy(model, modality, folder, tokenizer,
                                      spec.train.seq_length, spec.model.vision, device=device))
    return results


def write_evaluation(spec, results: list[Result]) -> Path:
    path = Path(spec.stage_dir) / EVALUATION_FILE
    write_json(path, {"stage": spec.name, "fingerprint": spec.fingerprint,
                      "results": [r.record() for r in results]})
    return path
