"""JSON Lines: writing records atomically (strict JSON), reading them with located errors."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from phi4core.data.report import DataReport, OnBadRecord
from phi4core.files import atomic_output, json_text


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically; returns the number of records."""
    n = 0
    with atomic_output(path) as f:
        for record in records:
            f.write(json_text(record, ensure_ascii=False, sort_keys=True))
            f.write("\n")
            n += 1
    return n


def iter_jsonl(
    paths: Iterable[str | os.PathLike], report: DataReport, on_bad_record: OnBadRecord
) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, parsed value) for every non-blank line of the given JSONL files.

    Lines are decoded one by one so that an invalid UTF-8 byte or a malformed line is reported
    at its own line number instead of aborting the whole file. Each non-blank line counts as a
    record read; blank lines are counted separately. Files ending in `.gz` are decompressed
    (lhotse writes its manifests so).
    """
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    report.blank_lines += 1
                    continue
                report.records_read += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.bad(where, "invalid utf-8", str(e), on_bad_record)
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    report.bad(where, "malformed json", f"{e.msg} at column {e.colno}",
                               on_bad_record)
                    continue
                yield where, value
