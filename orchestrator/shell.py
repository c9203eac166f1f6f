"""Shell words phi4 writes into the scripts it generates (batch scripts, NeMo-Run tasks).

Invariant: every word is `shlex.quote`d, except `Raw` ones, which only phi4 itself creates
(shell variables such as `"$SLURM_JOB_ID"`), never from a user's value.
"""

from __future__ import annotations

import shlex


class Raw(str):
    """A shell fragment written by phi4 itself (never from a user): emitted unquoted."""


def shell_words(words: list[str] | tuple[str, ...]) -> str:
    return " ".join(w if isinstance(w, Raw) else shlex.quote(w) for w in words)
