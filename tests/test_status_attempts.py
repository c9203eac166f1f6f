"""`phi4 status` (and the plan's reasons): one attempt per row, a failure's error line, counted
nouns, and the checkpoint a rerun really resumes from."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dag_helpers import make_pipeline, phi4, plan_json
from slurm_fake import fake_slurm

from orchestrator.executors.outcomes import record_exit
from orchestrator.records import State
from orchestrator.store import StageDir, Store


def _rows(store: Path, env: dict[str, str] | None = None) -> dict[str, dict]:
    out = phi4("status", "--format", "json", store=store, check=0, extra_env=env)
    return {r["stage"]: r for r in json.loads(out.stdout)["stages"]}


def _folder(pipeline: Path, store: Path, stage: str = "a") -> StageDir:
    fingerprint = plan_json(pipeline, store)[stage]["fingerprint"]
    return Store(store).stage_dir(stage, fingerprint)


def _attempt(folder: StageDir, *losses: float) -> None:
    """An attempt that logged one metrics record per loss."""
    folder.begin("local", command=["true"], reasons=["new"], inputs={})
    with open(folder.metrics, "a") as f:
        for step, loss in enumerate(losses):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_a_queued_attempt_shows_nothing_of_the_attempt_before(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    folder = _folder(pipeline, store)
    _attempt(folder, 3.0, 2.5)
    folder.end(State.CANCELLED, exit_code=-15)
    row = _rows(store)["a"]
    assert (row["attempt"], row["state"], row["step"], row["loss"]) == (1, "cancelled", 2, 2.5)
    # A rerun submitted to Slurm, still queued: attempt 2, no step, loss or time of its own yet.
    slurm = fake_slurm(tmp_path / "bin")
    folder.queue("slurm", force=False, command=["true"], reasons=["new"], inputs={})
    folder.record_job("301")
    slurm.add_job("301", "PENDING", "Priority")
    row = _rows(store, slurm.env)["a"]
    assert (row["attempt"], row["state"], row["step"], row["loss"], row["duration"]) == (
        2, "pending", None, None, None), row
    text = phi4("status", store=store, check=0, extra_env=slurm.env).stdout
    assert "2.5" not in text


def test_a_submission_cancelled_before_it_started_is_not_the_attempt_that_succeeded(
        tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    folder = _folder(pipeline, store)
    folder.queue("slurm", force=True, command=["true"], reasons=["forced (--force)"], inputs={})
    folder.end(State.CANCELLED, error="cancelled by phi4 cancel (job 7)")
    row = _rows(store)["a"]
    assert (row["attempt"], row["state"]) == (2, "cancelled")
    said = phi4("plan", str(pipeline), store=store, check=0).stdout
    assert "attempt 2 cancelled" in said and "attempt 1 cancelled" not in said, said


def test_a_failed_stage_shows_its_error_line(tmp_path: Path) -> None:
    """Run by phi4 (local), recorded by a Slurm job's end hook (record_exit), or recorded by
    an older phi4 as just "exit code 2": the note is what the stage said last, never phi4's or
    Slurm's own lines around it."""
    root = tmp_path / "local"
    pipeline = make_pipeline(root, {"a": []})
    recipe = root / "recipes" / "a.yaml"
    code = ("import sys; print('loading shards'); "
            "print('error: shard 7 is missing', file=sys.stderr); sys.exit(2)")
    recipe.write_text(re.sub(r"cmd: .*", f"cmd: [{json.dumps(sys.executable)}, -c, "
                                         f"{json.dumps(code)}]", recipe.read_text()))
    store = root / "store"
    phi4("run", str(pipeline), store=store, check=1)
    assert _rows(store)["a"]["note"] == "exit code 2: error: shard 7 is missing"

    for recorded_by in ("hook", "older phi4"):
        folder = Store(tmp_path / recorded_by).stage_dir("a", "f" * 16)
        folder.begin("slurm", command=["true"], reasons=["new"], inputs={})
        folder.log_file.parent.mkdir(parents=True, exist_ok=True)
        folder.log_file.write_text("=== phi4 attempt 1 of a\nTraceback (most recent call "
                                   "last):\nValueError: lr must be finite\n\n"
                                   "srun: error: vm: task 0: Exited with exit code 2\n")
        if recorded_by == "hook":
            record_exit(folder, ["out"], 2)
        else:
            folder.end(State.FAILED, exit_code=2, error="exit code 2")
        note = _rows(tmp_path / recorded_by)["a"]["note"]
        assert note == "exit code 2: ValueError: lr must be finite", (recorded_by, note)


def test_counts_are_said_in_the_singular_for_one(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    said = [phi4("validate", str(pipeline), check=0),
            phi4("plan", str(pipeline), store=store, check=0),
            phi4("graph", str(pipeline), store=store, check=0),
            phi4("run", str(pipeline), store=store, check=0),
            phi4("run", str(pipeline), store=store, check=0)]
    text = "".join(p.stdout + p.stderr for p in said)
    assert "nothing to run: 1 stage up to date" in text and "running 1 of 1 stage " in text
    assert not re.search(r"\b1 (stages|levels|jobs|times)\b", text), text


def _checkpoint(folder: StageDir, step: int, *, mark: bool = True, truncated: bool = False):
    path = folder.checkpoints / f"step_{step}"
    path.mkdir(parents=True)
    (path / "model.distcp").write_bytes(b"x" * (10 if truncated else 100))
    if mark:
        files = {"model.distcp": {"bytes": 100, "sha256": "0" * 64}}
        (path / "meta.json").write_text(json.dumps({"step": step, "files": files}))


def test_the_resume_line_names_the_checkpoint_resumed_from(tmp_path: Path) -> None:
    """Cancelled at step 37: steps 20 and 10 were saved whole, 25 lost a file, 30 had no
    completeness mark yet and 40 was being written. The rerun resumes from step 20."""
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    folder = _folder(pipeline, store)
    _attempt(folder, *[1.0] * 37)
    _checkpoint(folder, 10)
    _checkpoint(folder, 20)
    _checkpoint(folder, 25, truncated=True)
    _checkpoint(folder, 30, mark=False)
    (folder.checkpoints / "tmp.step_40").mkdir()
    folder.end(State.CANCELLED, exit_code=-2)
    row = _rows(store)["a"]
    assert row["step"] == 37 and row["note"].endswith(
        "rerun will resume from the checkpoint at step 20"), row
    reasons = plan_json(pipeline, store)["a"]["reasons"]
    assert reasons[0] == "cancelled (attempt 1); will resume from the checkpoint at step 20"
