"""Exact-answer accuracy of a chat model on held-out questions, and what guessing scores.

An answer counts as right when greedy decoding would produce it exactly: under teacher forcing,
the model's most likely next token equals the answer's at every scored position (the assistant
turn and its end token). That is one forward pass per batch, no generation loop, and the same
verdict as decoding greedily and comparing strings.

`chance` is the accuracy of a guesser that ignores the media: it answers each held-out question
with the answer that question most often has among the OTHER held-out items (leave one out, so
it never sees the item it guesses; ties go to the answer seen first). That is what a model
that learned the answers' prior, and nothing of the media, can expect to score.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import torch

from phi4core.evaluation.language import model_inputs


@torch.no_grad()
def exact_answers(model: torch.nn.Module, batches: Iterable[dict],
                  device: torch.device | str = "cpu") -> list[bool]:
    """One verdict per row of `batches`: every token of `loss_mask` is the model's argmax.
    A row with no scored token is an error (it has no answer to judge)."""
    was_training = model.training
    model.eval()
    verdicts: list[bool] = []
    try:
        for batch in batches:
            args, kwargs = model_inputs(batch, device)
            logits = model(*args, **kwargs)
            mask = batch["loss_mask"].to(logits.device) > 0
            if not bool(mask.any(dim=1).all()):
                raise ValueError("a held-out row has no answer tokens (loss_mask all 0)")
            hit = logits.argmax(dim=-1) == batch["labels"].to(logits.device)
            verdicts.extend(bool(row) for row in (hit | ~mask).all(dim=1).cpu())
    finally:
        model.train(was_training)
    return verdicts


def blind_chance(questions: Sequence[str], answers: Sequence[str]) -> float:
    """Accuracy of the media-blind guesser described in the module's docstring."""
    if len(questions) != len(answers) or not questions:
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    by_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(questions, answers):
        by_question[q][a] += 1
    right = 0
    for q, a in zip(questions, answers):
        others = by_question[q].copy()
        others[a] -= 1
        guess = max(others, key=lambda k: others[k]) if sum(others.values()) else None
        right += guess == a
    return right / len(questions)
