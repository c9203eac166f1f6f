"""Micro-batches mixed from several sources by weight, with a position that saves and restores.

A *stream* is anything that yields collated micro-batches and can save and restore its
position:

    batch = stream.next()          # one micro-batch of this data-parallel rank, one input mode
    state = stream.state_dict()    # picklable: the position after the batches returned so far
    stream.load_state_dict(state)  # before the first next()
    stream.close()
    stream.report                  # optional: a DataReport of what it skipped

`IndexedStream` makes one of a map-style sample set (text, chat, synthetic media: sample i
depends on i alone); phi4core.data.vision_loader.VisionStream reads energon datasets; speech
loaders plug in the same way. `MixedBatches` picks the stream of each micro-batch slot by the
error-minimising interleave megatron's blend uses (slot s goes to the stream furthest behind
its share `weight * (s + 1)`), so the choice depends on the slot counter alone: every data-
parallel rank picks the same stream for a slot (one input mode per micro-batch across ranks),
the mixture is the same on every run, and a restored mixture continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class IndexedStream:
    """Micro-batches of a map-style sample set for one data-parallel rank: round k covers
    samples [k*micro*dp, (k+1)*micro*dp), this rank taking its contiguous `micro` of them.
    The position is the number of rounds consumed."""

    def __init__(self, samples, collate, micro: int, dp_rank: int = 0, dp: int = 1,
                 num_workers: int = 0, worker_init_fn=None, name: str = "indexed") -> None:
        self.samples, self.collate = samples, collate
        self.micro, self.dp_rank, self.dp = micro, dp_rank, dp
        self.num_workers, self.worker_init_fn, self.name = num_workers, worker_init_fn, name
        self.rounds = 0
        self.limit = len(samples) // (micro * dp)
        self._it: Iterator | None = None

    def next(self) -> dict:
        if self._it is None:
            from torch.utils.data import DataLoader

            loader = DataLoader(
                self.samples, batch_sampler=_Rounds(self.rounds, self.limit, self.micro,
                                                    self.dp_rank, self.dp),
                collate_fn=self.collate, num_workers=self.num_workers,
                multiprocessing_context="fork" if self.num_workers else None,
                worker_init_fn=self.worker_init_fn if self.num_workers else None)
            self._it = iter(loader)
        if self.rounds >= self.limit:
            raise RuntimeError(f"{self.name}: all {self.limit} rounds of samples used")
        batch = next(self._it)
        self.rounds += 1
        return batch

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"kind": "indexed", "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self._it = None

    def close(self) -> None:
        self._it = None


class _Rounds:
    """Sample indices of one rank's rounds [start, stop), made lazily (a long run has
    millions)."""

    def __init__(self, start: int, stop: int, micro: int, dp_rank: int, dp: int) -> None:
        self.start, self.stop, self.micro, self.dp_rank, self.dp = start, stop, micro, dp_rank, dp

    def __iter__(self) -> Iterator[list[int]]:
        per_round = self.micro * self.dp
        for k in range(self.start, self.stop):
            first = k * per_round + self.dp_rank * self.micro
            yield list(range(first, first + self.micro))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def interleave_choice(weights: np.ndarray, counts: np.ndarray, slot: int) -> int:
    """The stream furthest behind its share after `slot` slots (ties: the first)."""
    return int(np.argmax(weights * (slot + 1) - counts))


class MixedBatches:
    """This rank's micro-batches, step by step, from `streams` mixed by `weights`."""

    def __init__(self, streams: Sequence[Any], weights: Sequence[float], num_micro: int) -> None:
        if not streams or len(streams) != len(weights):
            raise ValueError(f"{len(streams)} streams but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"weights must be positive and finite, got {list(weights)}")
        self.streams, self.weights = list(streams), w / w.sum()
        self.num_micro = num_micro
        self.slot = 0
        self.counts = np.zeros(len(streams), dtype=np.int64)

    def next_batch(self) -> dict:
        i = interleave_choice(self.weights, self.counts, self.slot)
        batch = self.streams[i].next()
        self.counts[i] += 1
        self.slot += 1
        return batch

    def next_step(self) -> list[dict]:
        """The micro-batches of the next step."""
        return [self.next_batch() for _ in range(self.num_micro)]

    def state_dict(self) -> dict:
        return {"slot": self.slot, "counts": self.counts.tolist(),
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"saved a mixture of {len(state['streams'])} streams, this one "
                             f"has {len(self.streams)}")
        self.slot = int(state["slot"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)

    def reports(self) -> list:
        return [s.report for s in self.streams if getattr(s, "report", None) is not None]

    def close(self) -> None:
        for s in self.streams:
            s.close()
