"""Content hashes of files and folders, cached so that unchanged files are read only once.

A cache entry is keyed by what changes whenever a file's bytes may have changed: device,
inode, size, mtime and ctime (ctime cannot be set back by `touch`). A file modified within
RACY_SECONDS of being hashed is not cached, since a later write in the same clock tick
would leave every key field unchanged (git's "racily clean" problem). An entry carries a
check of its own (key and digest hashed together), so a damaged entry is never trusted: the
file is hashed again. A mismatch found through the cache is confirmed by hashing the file
itself before anything is called corrupt.

Readers never follow a path blindly: folders are walked with lstat, and a file is opened only
after lstat says it is a regular file, non-blocking, and checked again with fstat, so a FIFO,
a device or a socket is reported (UnreadableFile), never opened for a read that would hang.
Artifacts hold regular files and folders only (publish settles links first, see store.py);
`follow_links` is for the user's own data, where links to shared storage are common.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

from .config.files import special_kind

RACY_SECONDS = 2.0
_CHUNK = 1 << 20
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0))

Manifest = dict[str, dict]  # relative path -> {"size": int, "sha256": str}


class UnreadableFile(Exception):
    """A file a reader cannot hash: not a regular file, a dangling link, or an OS error.
    `rel` names it relative to the folder being read; str() says what and why."""

    def __init__(self, rel: str, why: str):
        super().__init__(f"{rel} {why}")
        self.rel, self.why = rel, why


kind_problem = special_kind  # why a file of this mode holds no hashable content


class HashCache:
    """sha256 per file in `<folder>/<key[:2]>/<key>`: one small file per entry, written by
    rename, so concurrent runs and network filesystems need no shared database. The cache
    is an optimisation only: an entry that cannot be read, parsed or written is ignored."""

    def __init__(self, folder: Path | None, read_only: bool = False):
        self.folder = folder
        self.read_only = read_only  # read entries, never write any (`phi4 plan`)

    def sha256(self, path: Path, st: os.stat_result | None = None, *, fresh: bool = False,
               rel: str | None = None) -> str:
        """The file's sha256; `fresh` skips the cached entry (and replaces it)."""
        rel = rel or path.name
        st = st or _lstat(path, rel)
        key = hashlib.sha256(
            f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()
        ).hexdigest()
        entry = self.folder / key[:2] / key if self.folder else None
        if entry is not None and not fresh:
            cached = _read_entry(entry, key)
            if cached is not None:
                return cached
        digest = hash_file(path, rel)
        newest = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        if entry is not None and not self.read_only and time.time() - newest > RACY_SECONDS:
            _write_entry(entry, key, digest)
        return digest


def _entry_text(key: str, digest: str) -> str:
    return f"{digest} {hashlib.sha256(f'{key}:{digest}'.encode()).hexdigest()[:16]}"


def _read_entry(entry: Path, key: str) -> str | None:
    try:
        with open(entry, "rb", opener=regular_opener) as f:
            text = f.read(200).decode("ascii")
    except (OSError, UnicodeDecodeError, UnreadableFile):
        return None
    digest = text.split(" ", 1)[0]
    return digest if text == _entry_text(key, digest) and len(digest) == 64 else None


def _write_entry(entry: Path, key: str, digest: str) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{key}.{os.getpid()}")
        tmp.write_text(_entry_text(key, digest))
        os.replace(tmp, entry)
    except OSError:
        pass  # a cache that cannot be written only costs a re-hash next time


def regular_opener(path: str, flags: int) -> int:
    """open() for a file lstat said is regular: non-blocking, and refused (fstat) if it was
    swapped for something else meanwhile."""
    fd = os.open(path, _OPEN_FLAGS)
    why = kind_problem(os.fstat(fd).st_mode)
    if why is not None or stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableFile(os.path.basename(path), why or "is a folder")
    return fd


def _lstat(path: Path, rel: str) -> os.stat_result:
    try:
        st = os.lstat(path)
    except OSError as err:
        raise UnreadableFile(rel, f"cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile(rel, kind_problem(st.st_mode) or "is a folder")
    return st


def hash_file(path: Path, rel: str | None = None) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb", opener=regular_opener) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except UnreadableFile as err:
        raise UnreadableFile(rel or path.name, err.why) from None
    except OSError as err:
        raise UnreadableFile(rel or path.name, f"cannot be read: {err.strerror or err}") from None
    return h.hexdigest()


def files_under(root: Path, follow_links: bool = False) -> list[tuple[str, Path, os.stat_result]]:
    """(relative posix path, path, stat) of every regular file under `root` (or `root`
    itself), sorted. Anything else (a link, unless `follow_links`; a FIFO, device or socket;
    a dangling link; a folder that cannot be listed) raises UnreadableFile. Followed links to
    folders are walked once each (a loop of links is an error, not an endless walk)."""
    out: list[tuple[str, Path, os.stat_result]] = []
    seen: set[tuple[int, int]] = set()

    def entry(path: Path, rel: str) -> None:
        try:
            st = os.stat(path) if follow_links else os.lstat(path)
        except OSError as err:
            why = "is a dangling link" if os.path.islink(path) else \
                f"cannot be read: {err.strerror or err}"
            raise UnreadableFile(rel, why) from None
        if stat.S_ISREG(st.st_mode):
            out.append((rel, path, st))
        elif stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                raise UnreadableFile(rel, "is a loop of links")
            seen.add((st.st_dev, st.st_ino))
            try:
                names = sorted(os.listdir(path))
            except OSError as err:
                raise UnreadableFile(rel, f"cannot be listed: {err.strerror or err}") from None
            for name in names:
                entry(path / name, f"{rel}/{name}" if rel else name)
            seen.discard((st.st_dev, st.st_ino))
        else:
            raise UnreadableFile(rel or root.name, kind_problem(st.st_mode) or "is unreadable")

    try:
        top = os.stat(root) if follow_links else os.lstat(root)
    except OSError as err:
        raise UnreadableFile(root.name, f"cannot be read: {err.strerror or err}") from None
    if stat.S_ISREG(top.st_mode):
        return [(root.name, root, top)]
    entry(root, "")
    return out


def build(root: Path, cache: HashCache, follow_links: bool = False) -> Manifest:
    """The manifest of `root`; UnreadableFile when a file in it cannot be hashed."""
    manifest: Manifest = {}
    for rel, path, st in files_under(root, follow_links):
        if follow_links:  # hash what the link points at, by its own key
            manifest[rel] = {"size": st.st_size,
                             "sha256": cache.sha256(Path(os.path.realpath(path)), rel=rel)}
        else:
            manifest[rel] = {"size": st.st_size, "sha256": cache.sha256(path, st, rel=rel)}
    return manifest


def digest(manifest: Manifest) -> str:
    """One hash for a whole manifest: what fingerprints and lineage records compare."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def check(root: Path, manifest: Manifest, cache: HashCache) -> str | None:
    """None when the files under `root` match `manifest`, else the first difference found
    (a file that cannot be read, or is not a regular file, is one). Never raises."""
    if not root.is_dir() or root.is_symlink():
        return "missing"
    try:
        present = {rel: (path, st) for rel, path, st in files_under(root)}
        for rel in sorted(manifest):
            found = present.pop(rel, None)
            if found is None:
                return f"{rel} missing"
            path, st = found
            if st.st_size != manifest[rel]["size"]:
                return f"{rel} size {st.st_size} != {manifest[rel]['size']}"
            if cache.sha256(path, st, rel=rel) != manifest[rel]["sha256"] and \
                    cache.sha256(path, st, rel=rel, fresh=True) != manifest[rel]["sha256"]:
                return f"{rel} sha256 mismatch"
    except UnreadableFile as err:
        return str(err)
    if present:
        return f"{min(present)} not in the manifest"
    return None
