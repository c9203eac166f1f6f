"""Reading the trainer's metrics.jsonl: only its last record, without reading the whole file."""

from __future__ import annotations

import json
from pathlib import Path

_TAIL = 8192


def last_record(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the tail window
        if isinstance(record, dict):
            return record
    return None


def steps_done(record: dict | None) -> int | None:
    """Optimizer steps completed: the trainer logs the 0-based index of the step it finished."""
    if not record or not isinstance(record.get("step"), int):
        return None
    return record["step"] + 1


def progress_text(record: dict | None, total_steps: int | None = None) -> str:
    """`step 20/40 loss 3.12` from a metrics record ("" when there is none)."""
    done = steps_done(record)
    if done is None:
        return ""
    step = f"step {done}" + (f"/{total_steps}" if total_steps else "")
    loss = record.get("loss")
    return step + (f"  loss {loss:.4g}" if isinstance(loss, (int, float)) else "")
