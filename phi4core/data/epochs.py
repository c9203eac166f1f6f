"""A dataset cycled through epochs, each in its own seeded order: sample i depends on i alone,
so a resumed run continues exactly where it stopped.

`SampleStream` walks any such index-addressed source as an iterator whose whole position is
one number, for loaders and mixers that pull samples (state_dict / load_state_dict)."""

from __future__ import annotations

import numpy as np


class Epochs:
    """Index i -> item of epoch i // len(dataset), in that epoch's order: a seeded permutation,
    or `order(seed, epoch)` when the dataset has its own (e.g. duration buckets)."""

    def __init__(self, dataset, seed: int, order=None) -> None:
        self.dataset, self.seed, self.order = dataset, seed, order
        self._order: tuple[int, np.ndarray] | None = None

    def __getitem__(self, i: int):
        n = len(self.dataset)
        epoch, j = divmod(i, n)
        if self._order is None or self._order[0] != epoch:
            perm = (self.order(self.seed, epoch) if self.order is not None
                    else np.random.default_rng(self.seed + epoch).permutation(n))
            self._order = (epoch, perm)
        return self.dataset[int(self._order[1][j])]

    def __len__(self) -> int:
        return len(self.dataset)


class SampleStream:
    """Samples source[position], source[position + 1], ... of an index-addressed source
    (endless when the source is, as `Epochs`); the position is its whole state."""

    def __init__(self, source, position: int = 0) -> None:
        self.source, self.position = source, position

    def __iter__(self):
        return self

    def __next__(self):
        item = self.source[self.position]
        self.position += 1
        return item

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
