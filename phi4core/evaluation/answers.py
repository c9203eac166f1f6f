"""Accuracy of a chat model's answers to held-out questions, and what guessing scores.

Every answer is scored under teacher forcing, in one forward pass per batch (no generation
loop): at each answer token (the assistant turn and its end token) the model's most likely
next token, given the question and the answer's tokens before it, is right or wrong.

* token accuracy: the fraction of answer tokens predicted right;
* exact match: the fraction of answers with every token right, which is exactly when greedy
  decoding would produce the answer.

The chance of each is what a guesser that ignores the media scores on the same items: at each
answer token it predicts the token that most often follows the same question and the same
answer prefix among the OTHER held-out items (leave one out, so it never sees the item it
guesses; ties go to the token seen first; an unseen prefix backs off to the token most often at
that position). That is what a model that learned the answers'
prior, and nothing of the media, can expect to score.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from phi4core.evaluation.language import model_inputs


@dataclass(frozen=True)
class ScoredAnswer:
    target: tuple[int, ...]  # the answer's tokens (the labels at its scored positions)
    hits: tuple[bool, ...]  # whether the model's argmax was right at each

    @property
    def exact(self) -> bool:
        return all(self.hits)


@torch.no_grad()
def score_answers(model: torch.nn.Module, batches: Iterable[dict],
                  device: torch.device | str = "cpu") -> list[ScoredAnswer]:
    """One ScoredAnswer per row of `batches` (its `loss_mask` marks the answer). A row with no
    scored token is an error (it has no answer to judge). The model's mode is restored."""
    was_training = model.training
    model.eval()
    scored: list[ScoredAnswer] = []
    try:
        for batch in batches:
            args, kwargs = model_inputs(batch, device)
            logits = model(*args, **kwargs)
            mask = (batch["loss_mask"] > 0).cpu()
            if not bool(mask.any(dim=1).all()):
                raise ValueError("a held-out row has no answer tokens (loss_mask all 0)")
            guess = logits.argmax(dim=-1).cpu()
            labels = batch["labels"].cpu()
            for row in range(labels.shape[0]):
                target, predicted = labels[row][mask[row]], guess[row][mask[row]]
                scored.append(ScoredAnswer(tuple(target.tolist()),
                                           tuple((target == predicted).tolist())))
    finally:
        model.train(was_training)
    return scored


def exact_match(scored: Sequence[ScoredAnswer]) -> float:
    return sum(s.exact for s in scored) / len(scored)


def token_accuracy(scored: Sequence[ScoredAnswer]) -> float:
    return sum(sum(s.hits) for s in scored) / sum(len(s.hits) for s in scored)


def _leave_one_out(questions: Sequence[str], targets: Sequence[tuple[int, ...]]
                   ) -> list[list[bool]]:
    """Per item and answer token: whether the media-blind guesser (see the module) is right.
    Where no other item shares the prefix, it backs off to the token most often at that
    position of the question's other answers."""
    if len(questions) != len(targets) or not questions:
        raise ValueError(f"{len(questions)} questions for {len(targets)} answers")
    following: dict[tuple, Counter] = defaultdict(Counter)
    at: dict[tuple, Counter] = defaultdict(Counter)
    for q, t in zip(questions, targets):
        for j, token in enumerate(t):
            following[(q, t[:j])][token] += 1
            at[(q, j)][token] += 1

    def guess(counts: Counter, own: int) -> int | None:
        others = counts.copy()
        others[own] -= 1
        if not any(n > 0 for n in others.values()):
            return None
        return max(others, key=lambda k: others[k])

    right = []
    for q, t in zip(questions, targets):
        row = []
        for j, token in enumerate(t):
            g = guess(following[(q, t[:j])], token)
            if g is None:
                g = guess(at[(q, j)], token)
            row.append(g == token)
        right.append(row)
    return right


def blind_exact_chance(questions: Sequence[str], targets: Sequence[tuple[int, ...]]) -> float:
    """Exact-match accuracy of the media-blind guesser."""
    return sum(all(row) for row in _leave_one_out(questions, targets)) / len(questions)


def blind_token_chance(questions: Sequence[str], targets: Sequence[tuple[int, ...]]) -> float:
    """Token accuracy of the media-blind guesser."""
    rows = _leave_one_out(questions, targets)
    return sum(sum(row) for row in rows) / sum(len(row) for row in rows)
