"""A dataset cycled through epochs, each in its own seeded order: sample i depends on i alone,
so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import numpy as np


class Epochs:
    """Index i -> item of epoch i // len(dataset), in that epoch's permutation."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __getitem__(self, i: int):
        n = len(self.dataset)
        epoch, j = divmod(i, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(n))
        return self.dataset[int(self._order[1][j])]
