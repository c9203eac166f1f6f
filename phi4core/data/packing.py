"""Packing variable-length samples into fixed-length sequences without cross-sample attention.

A packed sequence carries its document boundaries two ways: `cu_seqlens` (cumulative segment
lengths, for megatron's `PackedSeqParams` / THD attention on GPU) and an explicit block-diagonal
causal `attention_mask` (for the CPU path). Position ids restart at 0 in every segment. The
padding at the end of a sequence is a segment of its own, with loss mask 0.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import numpy as np
import torch


def pack_lengths(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity (best-fit decreasing).

    Best fit keeps padding low (it is near-optimal for many small samples) in O(n log n);
    the bins are then shuffled with `seed`, since decreasing order would otherwise put all
    long samples at the start of an epoch. Deterministic for a given seed.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        raise ValueError(f"samples {too_long[:5]} have lengths outside 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            remaining, b = capacity - lengths[i], len(bins) - 1
        else:
            remaining, b = free.pop(slot)
            bins[b].append(i)
            remaining -= lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    for b in bins:
        b.sort()
    random.Random(seed).shuffle(bins)
    return bins


def build_packed_item(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One training sequence from (token ids, trained-token mask) samples.

    The next-token shift happens inside each sample (a sample of n tokens gives n-1 inputs),
    so no label ever crosses into the next sample. loss_mask[i] is 1 when labels[i] is a
    trained token.
    """
    tokens, labels, loss, positions, lengths = [], [], [], [], []
    for ids, mask in samples:
        n = len(ids) - 1
        tokens.append(ids[:-1])
        labels.append(ids[1:])
        loss.append(mask[1:])
        positions.append(np.arange(n))
        lengths.append(n)
    pad = seq_length - sum(lengths)
    if pad < 0:
        raise ValueError(f"samples of {sum(lengths)} tokens do not fit {seq_length}")
    if pad:
        tokens.append(np.full(pad, pad_id))
        labels.append(np.full(pad, pad_id))
        loss.append(np.zeros(pad))
        positions.append(np.arange(pad))
        lengths.append(pad)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    return {
        "tokens": torch.from_numpy(np.concatenate(tokens).astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        "loss_mask": torch.from_numpy(np.concatenate(loss).astype(np.float32)),
        "position_ids": torch.from_numpy(np.concatenate(positions).astype(np.int64)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
    }


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Segment index of every position of one sequence, from its cu_seqlens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths, output_size=seq_length)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool mask from [B, S] segment ids, True where attention is NOT allowed.

    (megatron's convention: `attention_mask` marks the masked-out positions.) Position i may
    attend to j only when j <= i and both lie in the same segment.
    """
    s = segments.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return ~(same & causal)[:, None]


class PackedCollator:
    """Batch packed items: stacked [B, S] tensors plus batch-level document boundaries.

    Returns tokens, labels, loss_mask, position_ids, segment_ids ([B, S]); cu_seqlens over the
    flattened batch (int32, row b's boundaries offset by b*S) and max_seqlen, as megatron's
    THD `PackedSeqParams` wants them (see `packed_seq_params`); and, when `attention_mask`,
    the [B, 1, S, S] block-diagonal causal mask (S^2 bytes per row: disable it on GPU).
    """

    def __init__(self, attention_mask: bool = True) -> None:
        self.attention_mask = attention_mask

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([it[k] for it in items])
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        s = batch["tokens"].shape[1]
        batch["segment_ids"] = torch.stack([segment_ids(it["cu_seqlens"], s) for it in items])
        cu = [items[0]["cu_seqlens"]] + [it["cu_seqlens"][1:] + b * s
                                          for b, it in enumerate(items) if b > 0]
        batch["cu_seqlens"] = torch.cat(cu).to(torch.int32)
        batch["max_seqlen"] = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).max()
        if self.attention_mask:
            batch["attention_mask"] = block_causal_mask(batch["segment_ids"])
        return batch


collate_packed = PackedCollator()


def packed_seq_params(batch: dict[str, torch.Tensor]):
    """Megatron's PackedSeqParams (THD format) for a batch from `PackedCollator`.

    THD attention sees the batch as one flattened sequence of B*S tokens, so the model input
    must be flattened the same way (megatron's packed-sequence recipes use micro-batch 1).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32)
    max_len = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
