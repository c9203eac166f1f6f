"""Which checkpoint an unfinished stage resumes from, read without the trainer (torch-free).

The trainer (phi4core.train.resume_checkpoints) writes `checkpoints/step_N/` and its
`meta.json` last, with every file's size and sha256, and resumes from the newest one whose
files all match. Here the same choice is made by sizes alone (hashing gigabytes would make
`phi4 status` slow): a half-written `tmp.step_N`, a `step_N` without its mark or with a missing
or truncated file is passed over, as the trainer passes over it.
"""

from __future__ import annotations

import json
from pathlib import Path

META = "meta.json"  # phi4core.train.resume_checkpoints.META (that module imports torch)


def resume_step(checkpoints: Path) -> int | None:
    """The step of the newest complete checkpoint in `checkpoints`, or None."""
    try:
        found = [(int(p.name.removeprefix("step_")), p) for p in checkpoints.glob("step_*")
                 if p.name.removeprefix("step_").isdigit()]
    except OSError:
        return None
    for step, folder in sorted(found, reverse=True):
        if _complete(folder):
            return step
    return None


def _complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / META).read_text())
        files = meta.get("files", {}) if isinstance(meta, dict) else None
        if not isinstance(files, dict):
            return False
        return all(isinstance(want, dict) and (folder / name).stat().st_size == want.get("bytes")
                   for name, want in files.items())
    except (OSError, ValueError):
        return False


def resume_text(checkpoints: Path) -> str:
    """How the next attempt starts: from which checkpoint, or over."""
    step = resume_step(checkpoints)
    if step is not None:
        return f"will resume from the checkpoint at step {step}"
    try:
        any_files = any(checkpoints.iterdir())
    except OSError:
        any_files = False
    return "will resume from checkpoints/" if any_files else "will start over"
