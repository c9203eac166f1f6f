"""Content hashes of files and folders, cached so that unchanged files are read only once.

A cache entry is keyed by what changes whenever a file's bytes may have changed: device,
inode, size, mtime and ctime (ctime cannot be set back by `touch`). A file modified within
RACY_SECONDS of being hashed is not cached, since a later write in the same clock tick
would leave every key field unchanged (git's "racily clean" problem).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

RACY_SECONDS = 2.0
_CHUNK = 1 << 20

Manifest = dict[str, dict]  # relative path -> {"size": int, "sha256": str}


class HashCache:
    """sha256 per file in `<folder>/<key[:2]>/<key>`: one small file per entry, written by
    rename, so concurrent runs and network filesystems need no shared database."""

    def __init__(self, folder: Path | None, read_only: bool = False):
        self.folder = folder
        self.read_only = read_only  # read entries, never write any (`phi4 plan`)

    def sha256(self, path: Path, st: os.stat_result | None = None) -> str:
        st = st or path.stat()
        key = hashlib.sha256(
            f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()
        ).hexdigest()
        entry = self.folder / key[:2] / key if self.folder else None
        if entry is not None:
            try:
                return entry.read_text()
            except OSError:
                pass
        digest = _hash_file(path)
        newest = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        if entry is not None and not self.read_only and time.time() - newest > RACY_SECONDS:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{key}.{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        return digest


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_under(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under `root` (or `root` itself)."""
    if root.is_file():
        return [(root.name, root)]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            out.append((path.relative_to(root).as_posix(), path))
    return out


def build(root: Path, cache: HashCache) -> Manifest:
    manifest: Manifest = {}
    for rel, path in files_under(root):
        st = path.stat()
        manifest[rel] = {"size": st.st_size, "sha256": cache.sha256(path, st)}
    return manifest


def digest(manifest: Manifest) -> str:
    """One hash for a whole manifest: what fingerprints and lineage records compare."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def check(root: Path, manifest: Manifest, cache: HashCache) -> str | None:
    """None when the files under `root` match `manifest`, else the first difference found."""
    if not root.is_dir():
        return "missing"
    present = dict(files_under(root))
    for rel in sorted(manifest):
        path = present.pop(rel, None)
        if path is None:
            return f"{rel} missing"
        st = path.stat()
        if st.st_size != manifest[rel]["size"]:
            return f"{rel} size {st.st_size} != {manifest[rel]['size']}"
        if cache.sha256(path, st) != manifest[rel]["sha256"]:
            return f"{rel} sha256 mismatch"
    if present:
        return f"{min(present)} not in the manifest"
    return None
