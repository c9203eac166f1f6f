"""The one reader of configuration files: regular files only, of bounded size.

Every file the config layer opens (recipes, pipelines, profiles, cluster files, `extends:`
parents, `phi4 lr fit` sweeps) is read here. A FIFO, a device (`/dev/zero`), a socket, a file
larger than `MAX_FILE_BYTES` or a path the OS refuses (too long, a loop of links) is one
ConfigError at that file: never a hang, an unbounded read or an OSError traceback.

Invariant: nothing is opened before `os.stat` says it is a regular file, and the opened
descriptor is checked again (`fstat`), so a file swapped for a FIFO in between cannot block:
it is opened non-blocking.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError, Origin

# A recipe is a few kilobytes; the largest real sweep CSV a few hundred. Anything bigger is a
# wrong path (a dataset, a checkpoint), not configuration.
MAX_FILE_BYTES = 4 * 1024 * 1024

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0))


def special_kind(mode: int) -> str | None:
    """Why a file of this mode holds no readable content (None: a regular file or a folder).
    One wording for the configuration reader and the store's manifests."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _kind(mode: int) -> str | None:
    """Why a file of this mode is not readable as configuration (None: a regular file)."""
    return "is a directory" if stat.S_ISDIR(mode) else special_kind(mode)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a configuration file ("not found", "is a FIFO, ...",
    "cannot be read: File name too long"), or None when it can. Never raises."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except ValueError:  # an embedded NUL byte
        return "cannot be read: the path holds a NUL byte"
    why = _kind(info.st_mode)
    if why is None and info.st_size > MAX_FILE_BYTES:
        return f"is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"
    return why


def read_bytes(path: Path, expected: str = "a YAML file") -> bytes:
    """The whole content of a configuration file; ConfigError at the file otherwise."""
    origin = Origin(str(path))
    why = file_problem(path)
    if why == "not found":
        raise ConfigError.single(origin, (), "file not found")
    if why is not None:
        raise ConfigError.single(origin, (), f"{why}; expected {expected}")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ConfigError.single(origin, (), f"cannot read: {exc.strerror or exc}") from None
    try:
        why = _kind(os.fstat(fd).st_mode)
        if why is not None:  # replaced between stat and open
            raise ConfigError.single(origin, (), f"{why}; expected {expected}")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError.single(origin, (), f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:  # grew while read, or a file whose size stat cannot tell
        raise ConfigError.single(
            origin, (), f"is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; "
                        f"expected {expected}")
    return b"".join(chunks)
