"""What a published artifact's folder may hold, and making it so: regular files and folders
only (links that resolve inside it become copies; links that leave it and special files are
refused, never opened), read-only; and removing such a folder again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from . import manifest as mf


class ArtifactError(Exception):
    """An output cannot be published as it is (a link leaving it, a FIFO): the stage fails."""


def make_read_only(root: Path) -> None:
    """Clear every write bit under `root` (files and folders): a stage that reads a
    published artifact cannot change it by accident (root can; verification catches it)."""
    for folder, dirs, files in os.walk(root):
        for name in [*files, *dirs, ""]:
            path = os.path.join(folder, name) if name else folder
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o222:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o222)


def remove_tree(path: Path) -> None:
    """shutil.rmtree, also of read-only published folders (write bits restored first)."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    for folder, dirs, _ in os.walk(path):
        for name in ["", *dirs]:
            target = os.path.join(folder, name) if name else folder
            with contextlib.suppress(OSError):
                if not os.path.islink(target):
                    os.chmod(target, stat.S_IMODE(os.lstat(target).st_mode) | 0o700)
    shutil.rmtree(path, ignore_errors=True)


def settle_links(root: Path, name: str) -> None:
    """Apply the rule for links in an output folder: a link that resolves inside it becomes
    a copy of what it points at (a hard link for a file, a folder copied for a folder), so
    the published artifact holds regular files and folders only; a link that leaves it
    (absolute into staging/, to /dev/zero), a dangling link, a loop, a FIFO, a device or a
    socket raises ArtifactError. Nothing is opened but regular files."""
    top = os.path.realpath(root)
    # (folder, the real folders its content was copied from: a link back into one is a loop)
    stack: list[tuple[Path, frozenset[str]]] = [(root, frozenset())]
    while stack:
        folder, origins = stack.pop()
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                stack.append((path, origins))
            elif stat.S_ISLNK(st.st_mode):
                stack += _settle_link(path, rel, top, origins)
            elif not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{rel} {mf.kind_problem(st.st_mode)}")


def _settle_link(link: Path, rel: str, top: str, origins: frozenset[str]
                 ) -> list[tuple[Path, frozenset[str]]]:
    target = os.path.realpath(link)
    shown = os.readlink(link)
    if not os.path.lexists(target):
        raise ArtifactError(f"{rel} is a dangling link (to {shown})")
    if os.path.commonpath([top, target]) != top:
        raise ArtifactError(f"{rel} is a link to {shown}, outside its artifact")
    st = os.lstat(target)
    where = os.path.realpath(link.parent)
    if stat.S_ISREG(st.st_mode):
        tmp = link.with_name(f".{link.name}.settle")
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)  # regular: cannot block
        os.replace(tmp, link)
        return []
    if not stat.S_ISDIR(st.st_mode):
        raise ArtifactError(f"{rel} is a link to {shown}, which {mf.kind_problem(st.st_mode)}")
    if target in origins or os.path.commonpath([target, where]) == target:
        raise ArtifactError(f"{rel} is a loop of links (to {shown})")
    tmp = link.with_name(f".{link.name}.settle")
    _copy_tree(Path(target), tmp, rel)
    link.unlink()
    os.rename(tmp, link)
    return [(link, origins | {target})]


def _copy_tree(source: Path, dest: Path, rel: str) -> None:
    """Copy a folder keeping links as links (settled when the walk reaches them); a FIFO,
    device or socket in it raises ArtifactError before anything opens it."""
    dest.mkdir()
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        st = os.lstat(entry.path)
        to = dest / entry.name
        if stat.S_ISDIR(st.st_mode):
            _copy_tree(Path(entry.path), to, f"{rel}/{entry.name}")
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry.path), to)
        elif stat.S_ISREG(st.st_mode):
            try:
                os.link(entry.path, to)
            except OSError:
                shutil.copyfile(entry.path, to)
        else:
            raise ArtifactError(f"{rel}/{entry.name} {mf.kind_problem(st.st_mode)}")
