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


def progress_text(record: dict | None, total_steps: int | None = None) -> str:
    """`step 20/40 loss 3.12` from a metrics record ("" when there is none)."""
    if not record or "step" not in record:
        return ""
    step = f"step {record['step']}" + (f"/{total_steps}" if total_steps else "")
    loss = record.get("loss")
    return step + (f"  loss {loss:.4g}" if isinstance(loss, (int, float)) else "")
