"""Placeholder expansion: one image/audio placeholder id per input in the text, repeated to
that input's token count before the model sees the ids (the model writes its tower's rows
there)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def expand_placeholders(token_ids, counts: Mapping[int, Sequence[int]], mask=None):
    """Each occurrence of a placeholder id (a key of ``counts``) repeated to its input's token
    count, in order, as the HF processors do. Returns the ids as a numpy array, or (ids, mask)
    when ``mask`` (the trained tokens) is given: it follows, and a placeholder is never
    trained."""
    ids = np.asarray(token_ids)
    reps = np.ones(len(ids), dtype=np.int64)
    for token_id, per_input in counts.items():
        where = np.flatnonzero(ids == token_id)
        if len(where) != len(per_input):
            raise ValueError(f"{len(where)} placeholder(s) {token_id} in the tokens but "
                             f"{len(per_input)} input(s) to put there")
        if any(n < 1 for n in per_input):
            raise ValueError(f"an input of placeholder {token_id} has no tokens: {per_input}")
        reps[where] = per_input
    if mask is None:
        return np.repeat(ids, reps)
    return np.repeat(ids, reps), np.repeat(np.asarray(mask), reps)
