"""What the store's JSON records hold: `status.json` and `manifest.json` as typed models.

Invariants:
- Only `store.py` reads and writes these files; everything else gets these models from it.
- A record written by an older phi4 still loads: every field it did not write has a default,
  and keys this version does not know are kept (`extra="allow"`) and written back unchanged.
- `State` names every state a stage can be in or be shown in; nothing else spells one.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class State(StrEnum):
    """A stage's state. Recorded in status.json: PENDING (submitted to a scheduler, not started),
    RUNNING, SUCCEEDED, FAILED, CANCELLED, PREEMPTED (checkpointed, resumable), BLOCKED (an
    upstream ended without publishing). Derived when read, never written: INTERRUPTED (recorded
    running, yet nobody holds the stage lock). Outcomes of one run, never written: UP_TO_DATE,
    NOT_RUN. Shown only: WAITING (for a lock another run holds), REQUEUED (a preempted job
    queued again), STALE (the graph: only an older fingerprint is in the store), DAMAGED
    (`phi4 status`: the stage's status.json cannot be read as a record)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    BLOCKED = "blocked"
    INTERRUPTED = "interrupted"
    UP_TO_DATE = "up to date"
    NOT_RUN = "not run"
    WAITING = "waiting"
    REQUEUED = "requeued"
    STALE = "stale"
    DAMAGED = "damaged"


# An attempt that ended without publishing: the next one resumes from its checkpoints.
UNFINISHED = frozenset({State.FAILED, State.CANCELLED, State.PREEMPTED, State.INTERRUPTED,
                        State.BLOCKED})
# What a run counts as done: downstream stages may start.
DONE = frozenset({State.SUCCEEDED, State.UP_TO_DATE})
# Records whose job a scheduler may still hold (queued, running, or requeued after preemption).
LIVE = frozenset({State.PENDING, State.RUNNING, State.PREEMPTED})


_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)


class InputRecord(_Record):
    """Lineage: what one input of an attempt was read from. `digest`: of the upstream manifest
    (stage inputs; None until that upstream has published) or of the file's content (paths)."""

    source: str  # stage | path | hf
    path: str
    stage: str | None = None
    fingerprint: str | None = None  # of the upstream stage folder
    artifact: str | None = None
    digest: str | None = None


class LoginRecord(_Record):
    """The login node (ssh) a stage's job was submitted through: where Slurm is asked."""

    host: str
    port: int = 22
    user: str
    identity: str | None = None


class StageStatus(_Record):
    """`status.json`: the latest attempt at one stage fingerprint (earlier ones leave only their
    count in `attempt` and their metrics file)."""

    stage: str
    fingerprint: str
    state: State
    attempt: int = Field(0, ge=0)  # how many attempts have started
    executor: str | None = None  # local | slurm | nemo_run
    submitted: float | None = None  # to a scheduler
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    error: str | None = None  # why it failed, was cancelled, preempted or blocked
    blocked_by: str | None = None  # the failed stage at the root of a block
    pid: int | None = None  # of the phi4 process that began the attempt
    host: str | None = None
    child_pid: int | None = None  # local: the stage's process
    job_id: str | None = None  # Slurm job id (local runs: the stage's pid)
    restarts: int | None = None  # Slurm's requeue count
    nodes: str | None = None  # Slurm node list
    cluster: str | None = None
    login: LoginRecord | None = None  # Slurm is reached over ssh (NeMo-Run's SSHTunnel)
    script: str | None = None  # the batch script submitted
    job_log: str | None = None  # the job's own output, when not the stage's log (NeMo-Run)
    dependency: str | None = None  # sbatch --dependency
    depends_on: dict[str, str] = {}  # upstream stage -> the job id this one waits on
    command: list[str] = []
    reasons: list[str] = []  # why the plan ran it
    inputs: dict[str, InputRecord] = {}
    force: bool = False  # a submission's `stage-hook begin` runs it even if published
    start_over: bool = False  # a submission's `stage-hook begin` discards the checkpoints

    @field_validator("depends_on", "inputs", mode="before")
    @classmethod
    def _no_mapping(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("command", "reasons", mode="before")
    @classmethod
    def _no_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def starts_over(self) -> bool:
        """Whether the next attempt must not resume from this one's checkpoints: it finished
        (they hold the final step, trained on the inputs of then), or a submission said so."""
        return self.state == State.SUCCEEDED or self.start_over

    @property
    def began(self) -> bool:
        """Whether this record's attempt started (a submission still queued, or cancelled or
        blocked before it started, did not: its metrics and times are an earlier attempt's)."""
        return self.started is not None and self.state not in (State.PENDING, State.BLOCKED)

    @property
    def number(self) -> int:
        """Which attempt this record describes: `attempt` counts the attempts that started, so
        one that never did is the next."""
        return self.attempt if self.began else self.attempt + 1

    @property
    def input_digests(self) -> dict[str, str | None]:
        return {name: record.digest for name, record in self.inputs.items()}


class EvaluationResult(_Record):
    """One held-out measurement of a stage's model. `chance`: what guessing scores on the same
    items (so a reader sees the margin); `model`: which model was measured ("trained", or
    "base" for the model before this stage, when an evaluation compares the two)."""

    name: str  # e.g. caption_accuracy, transcription_accuracy, heldout_perplexity
    value: float | None  # None: not finite
    higher_is_better: bool = True
    chance: float | None = None
    samples: int | None = None
    model: str = "trained"


class EvaluationRecord(_Record):
    """`evaluation.json` in a stage folder: the held-out evaluations of its latest attempt,
    written (atomically) by the stage's process when its training ends."""

    stage: str
    fingerprint: str
    results: list[EvaluationResult] = []

    def result(self, name: str, model: str = "trained") -> EvaluationResult | None:
        return next((r for r in self.results if r.name == name and r.model == model), None)

    def summary(self) -> str:
        """One line: each result with its chance, e.g. `caption_accuracy 0.62 (chance 0.31)`."""
        parts = []
        for r in self.results:
            value = "not finite" if r.value is None else f"{r.value:.3g}"
            chance = "" if r.chance is None else f" (chance {r.chance:.3g})"
            base = "" if r.model == "trained" else f" [{r.model}]"
            parts.append(f"{r.name}{base} {value}{chance}")
        return "; ".join(parts)


class ManifestRecord(_Record):
    """`manifest.json`: the published artifacts' files (relative path -> size and sha256),
    when they were published, and the digest of each input they were made from (None in a
    manifest older than that record)."""

    artifacts: dict[str, dict[str, dict[str, Any]]]
    created: float
    inputs: dict[str, str | None] | None = None

    @field_validator("artifacts")
    @classmethod
    def _file_entries(cls, value: dict[str, dict[str, dict[str, Any]]]) -> Any:
        """Every file entry has what verification compares: a size and a sha256."""
        for artifact, files in value.items():
            for rel, entry in files.items():
                size, digest = entry.get("size"), entry.get("sha256")
                if type(size) is not int or size < 0:
                    raise ValueError(f"{artifact}/{rel}: `size` must be a whole number >= 0")
                if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
                    raise ValueError(f"{artifact}/{rel}: `sha256` must be 64 hex digits")
        return value
