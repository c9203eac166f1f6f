"""`phi4 status`: what the store holds, one row per stage (or per attempt with --all)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .checkpoints import resume_text
from .executors.outcomes import describe, last_line
from .metrics import last_record, steps_done
from .records import UNFINISHED, State
from .store import StageDir, Store


@dataclass
class StatusRow:
    stage: str
    fingerprint: str
    state: str  # a State, or the word Slurm uses for a queued job (executors/slurm_status)
    attempt: int
    started: float | None
    ended: float | None
    duration: float | None
    exit_code: int | None
    step: int | None
    loss: float | None
    artifacts: list[str]
    note: str  # why it failed or was blocked
    path: str
    executor: str | None = None  # local | slurm | nemo_run
    job: str | None = None  # Slurm job id (local runs: the stage's pid)
    evaluations: list[dict] = field(default_factory=list)  # EvaluationResult dicts

    def as_json(self) -> dict:
        return asdict(self)


def row_for(folder: StageDir) -> StatusRow | None:
    """One attempt: the one the record describes. Its step and loss are its own (none for a
    submission that has not started: metrics.jsonl still holds the attempt before it)."""
    status = folder.status()
    if status is None:
        damage = folder.damaged_status()
        return None if damage is None else _damaged_row(folder, damage)
    state = folder.state(status)
    began = status.began
    end = status.ended or (time.time() if state == State.RUNNING else None)
    record = (last_record(folder.metrics) or {}) if began else {}
    logged = record.get("time")
    if isinstance(logged, (int, float)) and status.started and logged < status.started:
        record = {}  # a resumed attempt that has not logged yet: that line is the last one's
    note = status.error or ""  # for `blocked`: "upstream X failed"
    if state == State.FAILED:
        note = failure_note(folder, note, status.exit_code)
    if state == State.INTERRUPTED:
        note = "the run died"
    # A failure's note is its error line; where a rerun resumes, `phi4 plan` says.
    resume = resume_text(folder.checkpoints) if state in UNFINISHED - {State.FAILED} else ""
    if state == State.INTERRUPTED or (resume and resume != "will start over"):
        note += ("; " if note else "") + f"rerun {resume}"
    manifest = folder.manifest()
    artifacts = sorted(manifest.artifacts) if manifest is not None else []
    loss = record.get("loss")
    evaluation = folder.evaluation()
    return StatusRow(
        stage=folder.name, fingerprint=folder.fingerprint, state=state,
        attempt=status.number, started=status.started if began else None,
        ended=status.ended,
        duration=(end - status.started) if began and status.started and end else None,
        exit_code=status.exit_code, step=steps_done(record),
        loss=loss if isinstance(loss, (int, float)) else None, artifacts=artifacts,
        note=note, path=str(folder.path), executor=status.executor, job=status.job_id,
        evaluations=[r.model_dump() for r in evaluation.results] if evaluation else [])


def failure_note(folder: StageDir, error: str, code: int | None) -> str:
    """A failure's note says what went wrong: when the record holds only the exit code (as
    records written before error lines were kept do), the stage log's error line is added."""
    if error and (code is None or error != describe(code)):
        return error
    said = last_line(folder.log_file)
    base = error or (describe(code) if code is not None else State.FAILED)
    return f"{base}: {said}" if said else base


def _damaged_row(folder: StageDir, damage: str) -> StatusRow:
    """A stage whose status.json cannot be read is shown, not hidden: a published artifact
    that verifies is still used; the next attempt, if one runs, keeps its checkpoints/ and
    writes a new record."""
    return StatusRow(
        stage=folder.name, fingerprint=folder.fingerprint, state=State.DAMAGED, attempt=0,
        started=None, ended=None, duration=None, exit_code=None, step=None, loss=None,
        artifacts=[], note=f"{damage}; its next attempt writes a new record (checkpoints/ kept)",
        path=str(folder.path))


def collect(store: Store, every_attempt: bool = False) -> list[StatusRow]:
    """Latest attempt per stage name; with `every_attempt`, every fingerprint (newest first)."""
    rows = []
    for name in store.stage_names():
        if every_attempt:
            found = [r for r in map(row_for, store.stage_dirs(name)) if r is not None]
            rows += sorted(found, key=lambda r: r.started or 0, reverse=True)
        else:
            latest = store.latest(name)
            row = row_for(latest) if latest else None
            if row is not None:
                rows.append(row)
    return rows


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_rows(rows: list[StatusRow]) -> list[str]:
    if not rows:
        return []
    table = [("STAGE", "FINGERPRINT", "STATE", "TRY", "JOB", "TIME", "STEP", "LOSS", "ARTIFACTS",
              "NOTE")]
    for r in rows:
        job = f"slurm:{r.job}" if r.executor in ("slurm", "nemo_run") and r.job else "-"
        table.append((r.stage, r.fingerprint, r.state, str(r.attempt), job,
                      duration_text(r.duration),
                      "-" if r.step is None else str(r.step),
                      "-" if r.loss is None else f"{r.loss:.4g}",
                      ",".join(r.artifacts) or "-", r.note))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(table[0], widths)) + "  " + table[0][-1]]
    for r, row in zip(rows, table[1:]):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        lines += [f"  {line}" for line in evaluation_lines(r.evaluations)]
    return lines


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def evaluation_lines(results: list[dict]) -> list[str]:
    """One line per measurement: `name: base X -> trained Y (chance Z, N samples)` where an
    evaluation compares the model before the stage with the one after, else its one value."""
    by_name: dict[str, dict[str, dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], {})[r.get("model", "trained")] = r
    lines = []
    for name, models in by_name.items():
        trained, base = models.get("trained"), models.get("base")
        any_r = trained or base or next(iter(models.values()))
        text = (f"base {_value(base['value'])} -> trained {_value(trained['value'])}"
                if base and trained else _value(any_r["value"]))
        better = "higher" if any_r.get("higher_is_better", True) else "lower"
        extra = [f"{better} is better"]
        if any_r.get("chance") is not None:
            extra.append(f"chance {_value(any_r['chance'])}")
        if any_r.get("samples") is not None:
            extra.append(f"{any_r['samples']} samples")
        lines.append(f"{name}: {text} ({', '.join(extra)})")
    return lines
