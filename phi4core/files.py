"""Files as phi4core writes them: atomic, readable by the team, strict JSON, hashed once.

Invariants:
- A reader sees the old file or folder or the complete new one, never a partial write: output
  goes to a unique temporary name in the same folder and is renamed into place.
- Files and folders are created with the mode open() and mkdir() give (0o666 / 0o777 less the
  process umask), never narrower: tempfile.mkstemp/mkdtemp would make them 0600/0700, which
  teammates reading a store on shared storage cannot open. A writer that narrows the mode by
  itself (safetensors writes 0600) is followed by `follow_umask`.
- JSON written here is strict (RFC 8259): a non-finite float (NaN, inf) becomes null, since a
  bare `NaN` is not JSON and breaks every strict reader.
- The sha256 of a file is computed by `sha256_file` and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- modes -------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file (0o666) or folder (0o777) the mode the umask allows, as open()/mkdir() do."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


# -- temporary names beside the target -------------------------------------------------------


def _unique_beside(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def temp_path_beside(path: str | os.PathLike) -> str:
    """A new empty file in the target's folder (so the final os.replace never crosses
    filesystems), created with the umask's mode like any other file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _unique_beside(path, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty folder beside `path` (for a folder renamed into place when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _unique_beside(path, "tmp")
        try:
            tmp.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w"):
    """Write to a temporary file and rename it over `path` only if the block succeeds."""
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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """A new empty folder beside `out`, renamed over it (replace_dir) only if the block
    succeeds; removed otherwise, Ctrl-C included, so `out` is never half written."""
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first and
    removed after, so `out` is always either the old or the new folder, never a mix."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = _unique_beside(out, "old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# -- strict JSON -------------------------------------------------------------------------------


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (at any depth of dicts, lists, tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN or Infinity (they become null)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any, indent: int = 2,
               sort_keys: bool = True) -> None:
    """Strict JSON, written atomically."""
    with atomic_output(path) as f:
        f.write(json_text(value, indent=indent, sort_keys=sort_keys))
        f.write("\n")
