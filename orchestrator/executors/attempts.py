"""How an attempt's end is recorded, whoever ran it: the local executor after its child exits,
or a Slurm batch script after its step exits (`phi4 stage-hook end`). Publishing and
verification live in the store; this decides which state an exit code means."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from phi4core.exitcodes import PREEMPTED

from ..launch import ResolvedInput
from ..store import Attempt, Store


@dataclass
class Outcome:
    state: str  # succeeded | up to date | failed | cancelled | preempted | blocked | not run
    detail: str = ""
    exit_code: int | None = None
    blocked_by: str | None = None  # the failed stage at the root of a block


def record_exit(attempt: Attempt, outputs: list[str], code: int, *, cancelled: bool = False,
                preempted_note: str = "checkpointed; rerun to resume") -> Outcome:
    """Publish on exit 0; otherwise record why not. Returns what to report."""
    end = {"ended": time.time(), "exit_code": code}
    if code == 0:
        problem = attempt.publish(outputs)
        if problem is None:
            attempt.update_status(state="succeeded", **end)
            return Outcome("succeeded", exit_code=0)
        attempt.update_status(state="failed", error=problem, **end)
        return Outcome("failed", problem, 0)
    if cancelled:
        attempt.update_status(state="cancelled", **end)
        return Outcome("cancelled", describe(code), code)
    if code == PREEMPTED:
        attempt.update_status(state="preempted", error=preempted_note, **end)
        return Outcome("preempted", preempted_note, code)
    attempt.update_status(state="failed", error=describe(code), **end)
    said = last_line(attempt.log_file)
    return Outcome("failed", f"{describe(code)}{f': {said}' if said else ''}; "
                   f"log: {attempt.log_file}", code)


def consumed(store: Store, inputs: dict[str, ResolvedInput]) -> dict[str, dict]:
    """Lineage: exactly which upstream files an attempt reads (digests of the upstream
    manifests; None for an upstream not published yet, filled in when the attempt starts)."""
    out = {}
    for name, inp in inputs.items():
        out[name] = {"source": inp.source, "path": inp.path, "stage": inp.stage,
                     "fingerprint": inp.fingerprint, "artifact": inp.artifact,
                     "digest": inp.fingerprint if inp.source != "stage" else None}
    return fill_digests(store, out)


def fill_digests(store: Store, inputs: dict[str, dict]) -> dict[str, dict]:
    for record in inputs.values():
        if record.get("source") == "stage":
            record["digest"] = store.attempt(record["stage"], record["fingerprint"]) \
                .artifact_digest(record["artifact"])
    return inputs


def last_line(log: Path, limit: int = 160) -> str:
    """The stage's last words (usually the error), for the failure line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((ln for ln in reversed(lines) if ln), "")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
