"""Held-out loss and perplexity of a language model.

    result = heldout_loss(model, batches)          # batches: the trainer's micro-batch dicts
    result.loss, result.perplexity, result.tokens

A batch is what the trainer feeds a step (`tokens`, `labels`, `loss_mask`, `position_ids`,
optionally `attention_mask`, media keys and `input_mode`); the model is called as the trainer
calls it, returning per-token losses when given labels. The loss is the token-weighted mean
over every batch's `loss_mask`, so it does not depend on how the items are batched.
`text_batches` makes such batches from plain texts: one text per row, right-padded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from phi4core.data.multimodal import MEDIA_KEYS


@dataclass(frozen=True)
class HeldoutLoss:
    loss: float  # mean next-token loss (nats) over the scored tokens
    tokens: int  # how many tokens were scored
    samples: int  # how many rows (items) were scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if math.isfinite(self.loss) and self.loss < 700 else math.inf


def model_inputs(batch: dict, device: torch.device | str = "cpu") -> tuple[tuple, dict]:
    """The positional and keyword arguments the model takes for `batch` (as the trainer's
    forward step): tokens, position ids, attention mask; media and input mode as keywords."""
    mask = batch.get("attention_mask")
    args = (batch["tokens"].to(device), batch["position_ids"].to(device),
            mask.to(device) if mask is not None else None)
    kwargs = {k: batch[k].to(device) for k in MEDIA_KEYS if k in batch}
    if "input_mode" in batch:
        kwargs["input_mode"] = int(batch["input_mode"])
    return args, kwargs


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: Iterable[dict],
                 device: torch.device | str = "cpu") -> HeldoutLoss:
    """Token-weighted mean loss of `model` over `batches`, in eval mode (the model's mode is
    restored after). Raises ValueError when the batches score no token."""
    was_training = model.training
    model.eval()
    total, count, rows = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for batch in batches:
            args, kwargs = model_inputs(batch, device)
            losses = model(*args, labels=batch["labels"].to(device), **kwargs)
            mask = batch["loss_mask"].to(losses.device).float()
            total += (losses.float() * mask).sum().double().cpu()
            count += int(mask.sum().item())
            rows += int(batch["tokens"].shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the held-out batches have no scored token (loss_mask is all 0)")
    return HeldoutLoss(float(total / count), count, rows)


def text_batches(token_lists: Sequence[Sequence[int]], seq_length: int, pad_id: int,
                 batch_size: int = 8) -> list[dict]:
    """Batches of documents, one per row: each document's ids (end-of-document token
    included) scored as next-token pairs, cut to `seq_length`, right-padded (loss 0)."""
    if batch_size <= 0 or seq_length <= 0:
        raise ValueError(f"batch_size and seq_length must be positive, got {batch_size}, "
                         f"{seq_length}")
    docs = [list(ids)[:seq_length + 1] for ids in token_lists if len(ids) >= 2]
    batches = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        b = len(chunk)
        batch = {"tokens": torch.full((b, seq_length), pad_id, dtype=torch.long),
                 "labels": torch.full((b, seq_length), pad_id, dtype=torch.long),
                 "loss_mask": torch.zeros(b, seq_length),
                 "position_ids": torch.arange(seq_length).expand(b, seq_length).contiguous()}
        for row, ids in enumerate(chunk):
            n = len(ids) - 1
            batch["tokens"][row, :n] = torch.tensor(ids[:-1])
            batch["labels"][row, :n] = torch.tensor(ids[1:])
            batch["loss_mask"][row, :n] = 1.0
        batches.append(batch)
    return batches


def heldout_texts(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Each text's ids followed by the end-of-document token, as the pre-training data has."""
    return [ids + [tokenizer.eod_id] for ids in tokenizer.encode_batch(list(texts))]
