"""Signalling a stage while megatron's checkpoint writer is busy (see writer_hold/)."""

from __future__ import annotations

import os
import time
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "writer_hold"
REPO = Path(__file__).resolve().parents[1]


def hold_env(folder: Path, step: int) -> dict[str, str]:
    """Environment that holds the writer of checkpoint `step` while `folder/hold` exists."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hold").touch()
    return {"PHI4_TEST_HOLD_WRITE": str(folder), "PHI4_TEST_HOLD_STEP": str(step),
            "PYTHONPATH": f"{SHIM}{os.pathsep}{REPO}"}


def pending(pid: int) -> set[int]:
    """Signals pending for process `pid` (blocked, so not delivered yet); empty once it ended."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    bits = 0
    for line in text.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            bits |= int(line.split()[1], 16)
    return {n + 1 for n in range(64) if bits >> n & 1}


def wait_until(predicate, what: str, alive=None, timeout: float = 300.0) -> None:
    """Poll `predicate`; fail if `alive()` says the stage ended first, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert alive is None or alive(), f"ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def writer_pid(folder: Path, alive=None) -> int:
    """The pid of the held writer, once it holds."""
    marker = folder / "writing"
    wait_until(marker.is_file, "the checkpoint writer to start", alive)
    return int(marker.read_text())
