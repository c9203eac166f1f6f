"""`phi4 gc`: which stage folders and checkpoints the store can do without (read-only here;
the removal itself is store.py's).

Kept, with everything they were made from (the inputs each kept folder's status.json records,
followed upstream to the end):
- each stage's `latest` folder, and its `--keep-last N` most recent folders;
- the folders a pipeline given on the command line plans to use (its up-to-date stages);
- every folder whose stage runs or is queued now (its lock held, or recorded running or
  pending), and its checkpoints.
Removed: every other fingerprint folder (versions, checkpoints, logs, metrics), and the
checkpoints of a kept folder whose last attempt succeeded (a rerun starts over: they are never
resumed from). An unfinished stage keeps its checkpoints: its rerun resumes from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .records import State
from .store import StageDir, Store

_ACTIVE = (State.RUNNING, State.PENDING)


@dataclass(frozen=True)
class Removal:
    folder: StageDir
    what: str  # "folder" (the whole fingerprint) or "checkpoints"
    bytes: int

    @property
    def path(self) -> Path:
        return self.folder.path if self.what == "folder" else self.folder.checkpoints


@dataclass
class GcPlan:
    removals: list[Removal] = field(default_factory=list)
    kept: dict[tuple[str, str], str] = field(default_factory=dict)  # (stage, fp) -> why

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


def _recency(folder: StageDir) -> float:
    status = folder.status()
    when = (status.started or status.submitted) if status is not None else None
    if when is None:
        try:
            when = os.lstat(folder.status_file).st_mtime
        except OSError:
            when = 0.0
    return when


def _active(folder: StageDir) -> bool:
    if folder.state() in _ACTIVE:
        return True
    return folder.lock().is_held_elsewhere()


def plan_gc(store: Store, keep_last: int = 1, pinned: set[tuple[str, str]] | None = None
            ) -> GcPlan:
    """What gc removes; `pinned`: (stage, fingerprint) pairs a pipeline refers to."""
    plan = GcPlan()
    roots: dict[tuple[str, str], str] = {}
    for key in pinned or set():
        roots[key] = "a pipeline refers to it"
    every: dict[tuple[str, str], StageDir] = {}
    for name in store.stage_names():
        folders = sorted(store.stage_dirs(name), key=_recency, reverse=True)
        for folder in folders:
            every[(name, folder.fingerprint)] = folder
        latest = store.latest(name)
        if latest is not None:
            roots.setdefault((name, latest.fingerprint), "latest")
        for folder in folders[:keep_last]:
            roots.setdefault((name, folder.fingerprint), f"one of the {keep_last} most recent")
        for folder in folders:
            if _active(folder):
                roots[(name, folder.fingerprint)] = "running or queued"
    # Everything a kept folder was made from stays: its inputs, theirs, and so on.
    stack = list(roots.items())
    while stack:
        key, why = stack.pop()
        if key in plan.kept or key not in every:  # kept already, or not in the store
            continue
        plan.kept[key] = why
        status = every[key].status()
        for record in (status.inputs.values() if status is not None else []):
            if record.source == "stage" and record.stage and record.fingerprint:
                stack.append(((record.stage, record.fingerprint), f"an input of {key[0]}"))
    for key, folder in sorted(every.items()):
        if key not in plan.kept:
            plan.removals.append(Removal(folder, "folder", tree_bytes(folder.path)))
            continue
        status = folder.status()
        if status is not None and status.state == State.SUCCEEDED \
                and plan.kept[key] != "running or queued" and _has_files(folder.checkpoints):
            plan.removals.append(Removal(folder, "checkpoints", tree_bytes(folder.checkpoints)))
    return plan


def _has_files(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError:
        return False


def tree_bytes(path: Path) -> int:
    """Bytes the files under `path` hold, each inode once (hard links are not counted twice);
    links are not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen or name in dirs:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def collect(store: Store, planned: GcPlan) -> list[tuple[Removal, bool]]:
    """Carry out a plan: each removal with whether it was done (not when its stage started
    running meanwhile: the store re-checks under the stage lock)."""
    done = []
    for removal in planned.removals:
        ok = removal.folder.remove() if removal.what == "folder" \
            else removal.folder.remove_checkpoints()
        done.append((removal, ok))
    store.collect_trash()
    return done
