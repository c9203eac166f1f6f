"""Accounting for data passes: every record read is either kept or skipped for a named reason.

One convention for all readers (text, chat, later image/audio): a bad record is located by
`file:line`, then either raises `DataError` (policy "fail") or is counted under its reason and
logged (policy "skip"). Nothing is dropped without a count.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OnBadRecord = Literal["skip", "fail"]
_POLICIES = ("skip", "fail")

# Enough individual warnings to diagnose a broken file without flooding the log.
_MAX_LOGGED = 20
_MAX_EXAMPLES = 50

log = logging.getLogger("phi4core.data")


class DataError(ValueError):
    """A record that cannot be used, with where it came from (`file:line`) and why."""

    def __init__(self, where: str, reason: str = "", detail: str = "") -> None:
        # reason may be empty: a loader worker's error is re-raised in the training process
        # from its message alone (torch's ExceptionWrapper), and stays a DataError there.
        self.where = where
        self.reason = reason
        self.detail = detail
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else "")
                         if reason else where)


def check_policy(on_bad_record: str) -> OnBadRecord:
    if on_bad_record not in _POLICIES:
        raise ValueError(f"on_bad_record must be one of {_POLICIES}, got {on_bad_record!r}")
    return on_bad_record  # type: ignore[return-value]


@dataclass
class DataReport:
    """Counts of one data pass: records read, kept, and skipped per reason (with examples)."""

    name: str = "data"
    records_read: int = 0
    records_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    # Lines that hold no record at all (blank lines); counted apart from bad records.
    blank_lines: int = 0
    # Kept records that were changed on the way (e.g. truncated), per kind of change.
    adjusted: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    def keep(self) -> None:
        self.records_kept += 1

    def bad(self, where: str, reason: str, detail: str, policy: OnBadRecord) -> None:
        """Handle one bad record: raise under "fail", count and log under "skip"."""
        if policy == "fail":
            raise DataError(where, reason, detail)
        self.skipped[reason] += 1
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)
        if self.records_skipped <= _MAX_LOGGED:
            log.warning("%s: skipped %s", self.name, message)
        elif self.records_skipped == _MAX_LOGGED + 1:
            log.warning("%s: more bad records; only counting from now on", self.name)

    def merge(self, other: DataReport) -> None:
        self.records_read += other.records_read
        self.records_kept += other.records_kept
        self.skipped.update(other.skipped)
        self.blank_lines += other.blank_lines
        self.adjusted.update(other.adjusted)
        room = _MAX_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def summary(self) -> str:
        text = f"{self.name}: read {self.records_read}, kept {self.records_kept}"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
            text += f", skipped {self.records_skipped} ({reasons})"
        if self.adjusted:
            text += "; kept but " + ", ".join(f"{r}: {n}" for r, n in sorted(self.adjusted.items()))
        if self.blank_lines:
            text += f"; {self.blank_lines} blank lines"
        return text

    def log_summary(self) -> None:
        (log.warning if self.skipped else log.info)("%s", self.summary())

    def to_dict(self) -> dict:
        return {
            "records_read": self.records_read,
            "records_kept": self.records_kept,
            "records_skipped": self.records_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "blank_lines": self.blank_lines,
            "adjusted": dict(sorted(self.adjusted.items())),
            "examples": list(self.examples),
        }
