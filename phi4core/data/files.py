"""File helpers shared by the data layer: atomic writes, content hashes, located JSONL reading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from phi4core.data.report import DataReport, OnBadRecord


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temp_path_beside(path: str | os.PathLike) -> str:
    """A unique name in the target's folder, so the final os.replace never crosses filesystems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w"):
    """Write to a temporary file and rename it over `path` only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never a partial write.
    """
    tmp = temp_path_beside(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first and
    removed after, so `out` is always either the old or the new folder, never a mix."""
    import shutil
    import uuid

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_output(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically; returns the number of records."""
    n = 0
    with atomic_output(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True))
            f.write("\n")
            n += 1
    return n


def iter_jsonl(
    paths: Iterable[str | os.PathLike], report: DataReport, on_bad_record: OnBadRecord
) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, parsed value) for every non-blank line of the given JSONL files.

    Lines are decoded one by one so that an invalid UTF-8 byte or a malformed line is reported
    at its own line number instead of aborting the whole file. Each non-blank line counts as a
    record read; blank lines are counted separately.
    """
    for path in paths:
        with open(path, "rb") as f:
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
