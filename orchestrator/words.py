"""Counted nouns in messages: "1 stage", "2 stages"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def bytes_text(n: float) -> str:
    """A byte count in the largest binary unit it reaches: `1.5 GiB`, `14.1 MiB`, `512 B`."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:.0f} B"
