"""The attempts a store holds, and what each logged: read-only, torch-free.

Every attempt at one fingerprint shares its folder. `status.json` describes the
latest (its metrics in `metrics.jsonl`, evaluations in `evaluation.json`); an attempt that
was started over left `metrics.attempt<N>.jsonl` and `evaluation.attempt<N>.json` (store.py
begin()). A resumed attempt continues the metrics of the one it resumes, so each metrics file
is one run of the trainer from step 0, named by the last attempt that wrote it.

References, as `phi4 diff` and `phi4 metrics` take them:
    STAGE            the stage's latest attempt (its `latest` pointer)
    FINGERPRINT      (or a unique prefix of 6+ hex digits) that folder's latest attempt
    STAGE@N          the stage's N-th attempt in time order (1 the first; -1 the last)
    FINGERPRINT@N    attempt N of that fingerprint's folder
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .records import EvaluationRecord, StageStatus
from .store import StageDir, Store, read_json

_ATTEMPT_FILE = re.compile(r"metrics\.attempt(\d+)\.jsonl")
_HEX = re.compile(r"[0-9a-f]{6,16}")


class RunsError(Exception):
    """A reference names no attempt in the store: one line for the user, exit 2."""


@dataclass(frozen=True)
class Attempt:
    """One trainer run at one fingerprint: the latest (`current`) or a kept earlier one."""

    folder: StageDir
    number: int  # the attempt count when it ended (status.json's `attempt` for the latest)
    current: bool
    metrics_file: Path
    evaluation_file: Path

    @property
    def stage(self) -> str:
        return self.folder.name

    @property
    def fingerprint(self) -> str:
        return self.folder.fingerprint

    @property
    def label(self) -> str:
        return f"{self.stage}@{self.fingerprint[:8]}#{self.number}"

    def status(self) -> StageStatus | None:
        """The record, for the latest attempt only (earlier ones left none)."""
        return self.folder.status() if self.current else None

    def evaluation(self) -> EvaluationRecord | None:
        if self.current:
            return self.folder.evaluation()
        data = read_json(self.evaluation_file)
        try:
            return EvaluationRecord.model_validate(data) if isinstance(data, dict) else None
        except ValueError:
            return None

    def records(self) -> list[dict]:
        return read_metrics(self.metrics_file)

    def started(self) -> float | None:
        """When it began: the record's start for the latest, else its first metrics line."""
        status = self.status()
        if status is not None and status.started is not None:
            return status.started
        first = next(iter(_lines(self.metrics_file)), None)
        return first.get("time") if first and _number(first.get("time")) else None


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics file; a line cut short (being written) is skipped."""
    return list(_lines(path))


def _lines(path: Path) -> Iterator[dict]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    yield record
    except OSError:
        return


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def attempts_of(folder: StageDir) -> list[Attempt]:
    """The folder's attempts, oldest first: every kept earlier one, then the latest."""
    found = []
    try:
        names = [p.name for p in folder.path.iterdir()]
    except OSError:
        names = []
    for name in names:
        m = _ATTEMPT_FILE.fullmatch(name)
        if m:
            n = int(m.group(1))
            found.append(Attempt(folder, n, False, folder.path / name,
                                 folder.path / f"evaluation.attempt{n}.json"))
    found.sort(key=lambda a: a.number)
    status = folder.status()
    if status is not None or folder.metrics.exists():
        number = status.number if status is not None else (found[-1].number + 1 if found else 1)
        found.append(Attempt(folder, number, True, folder.metrics, folder.evaluation_file))
    return found


def stage_attempts(store: Store, name: str) -> list[Attempt]:
    """Every attempt of stage `name`, every fingerprint, in the order they started."""
    every = [a for folder in store.stage_dirs(name) for a in attempts_of(folder)]
    return sorted(every, key=lambda a: (a.started() or math.inf, a.number))


def find_fingerprint(store: Store, text: str) -> StageDir | None:
    """The folder whose fingerprint is `text` or starts with it (unique), else None."""
    if not _HEX.fullmatch(text):
        return None
    matches = [d for name in store.stage_names() for d in store.stage_dirs(name)
               if d.fingerprint.startswith(text)]
    if len(matches) > 1:
        raise RunsError(f"{text} is the start of {len(matches)} fingerprints "
                        f"({', '.join(d.fingerprint for d in matches[:4])}): give more digits")
    return matches[0] if matches else None


def resolve(store: Store, ref: str) -> Attempt:
    """The attempt a reference names (see the module docstring); RunsError if none."""
    base, _, index = ref.partition("@")
    number: int | None = None
    if index:
        try:
            number = int(index)
        except ValueError:
            raise RunsError(f"{ref}: after @ comes an attempt number (1 the first, -1 the "
                            "last)") from None
        if number == 0:
            raise RunsError(f"{ref}: attempts are counted from 1 (or from the last: -1)")
    folder = None if base in store.stage_names() else find_fingerprint(store, base)
    if folder is not None:
        attempts = attempts_of(folder)
        if not attempts:
            raise RunsError(f"{ref}: the folder of {folder.name} {folder.fingerprint} holds "
                            "no attempt")
        if number is None:
            return attempts[-1]
        if number > 0:
            chosen = [a for a in attempts if a.number == number]
        else:
            chosen = [attempts[number]] if -number <= len(attempts) else []
        if not chosen:
            kept = ", ".join(str(a.number) for a in attempts)
            raise RunsError(f"{ref}: {folder.name} {folder.fingerprint} keeps attempts {kept}")
        return chosen[0]
    if base not in store.stage_names():
        names = store.stage_names()
        raise RunsError(f"{ref}: no stage or fingerprint {base!r} in {store.root}"
                        + (f"; stages: {', '.join(names)}" if names else ""))
    if number is None:
        latest = store.latest(base)
        attempts = attempts_of(latest) if latest is not None else []
        if not attempts:
            raise RunsError(f"{ref}: stage {base} has no attempt in the store")
        return attempts[-1]
    every = stage_attempts(store, base)
    position = number - 1 if number > 0 else len(every) + number
    if not 0 <= position < len(every):
        raise RunsError(f"{ref}: stage {base} has {len(every)} attempt(s) in the store")
    return every[position]


@dataclass
class Summary:
    """What `phi4 diff` and `phi4 metrics` put side by side for one attempt."""

    stage: str
    fingerprint: str
    attempt: int
    state: str | None
    steps: int | None
    final_loss: float | None
    best_loss: float | None
    tokens_per_s: float | None  # median over the logged steps (the first, warm-up, left out)
    peak_mem_mb: float | None
    duration_s: float | None
    evaluations: dict[str, float | None] = field(default_factory=dict)

    def as_json(self) -> dict:
        return dict(self.__dict__)


def summarize(attempt: Attempt) -> Summary:
    records = attempt.records()
    losses = [r["loss"] for r in records if _number(r.get("loss"))]
    speeds = [r["tokens_per_s"] for r in records[1:] or records if _number(r.get("tokens_per_s"))]
    memory = [r["peak_mem_mb"] for r in records if _number(r.get("peak_mem_mb"))]
    status = attempt.status()
    duration = None
    if status is not None and status.began and status.started and status.ended:
        duration = status.ended - status.started
    elif len(records) >= 2 and _number(records[0].get("time")) \
            and _number(records[-1].get("time")):
        duration = records[-1]["time"] - records[0]["time"]  # earlier attempts: logged span
    evaluation = attempt.evaluation()
    evaluations = {}
    for result in evaluation.results if evaluation else []:
        key = result.name if result.model == "trained" else f"{result.name} ({result.model})"
        evaluations[key] = result.value
    return Summary(
        stage=attempt.stage, fingerprint=attempt.fingerprint, attempt=attempt.number,
        state=str(attempt.folder.state(status)) if status is not None else None,
        steps=records[-1]["step"] + 1 if records else None,
        final_loss=losses[-1] if losses else None, best_loss=min(losses) if losses else None,
        tokens_per_s=_median(speeds), peak_mem_mb=max(memory) if memory else None,
        duration_s=duration, evaluations=evaluations)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
