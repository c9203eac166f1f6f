"""`phi4 stage-hook begin` (what a Slurm or NeMo-Run job runs first), in-process."""

from __future__ import annotations

from pathlib import Path

from orchestrator.executors import hooks
from orchestrator.executors.attempts import consumed
from orchestrator.launch import ResolvedInput
from orchestrator.store import Store, write_json


def _publish(attempt, text: str, inputs: dict | None = None) -> None:
    attempt.begin({}, executor="slurm", inputs=inputs or {})
    (attempt.staging / "out").mkdir()
    (attempt.staging / "out" / "f").write_text(text)
    assert attempt.publish(["out"]) is None
    attempt.update_status(state="succeeded")


def _submit(attempt, **status) -> None:
    """What SlurmExecutor._submit_one records."""
    attempt.update_status(state="pending", executor="slurm", **status)


def test_begin_skips_only_an_unforced_rerun_with_the_same_inputs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    up = store.attempt("a", "a" * 16)
    _publish(up, "v1")
    down = store.attempt("b", "b" * 16)
    down.dir.mkdir(parents=True)
    write_json(down.spec, {"outputs": ["out"]})
    inputs = {"a": ResolvedInput("stage", str(up.artifacts / "out"), False, "out", "a",
                                 up.fingerprint)}
    _publish(down, "b", consumed(store, inputs))

    _submit(down, force=False, inputs=consumed(store, inputs))
    assert hooks.begin(down.dir) == hooks.SKIP
    _submit(down, force=True, inputs=consumed(store, inputs))
    assert hooks.begin(down.dir) == 0 and down.status()["state"] == "running"
    _publish(down, "b", consumed(store, inputs))

    _publish(up, "v2")  # a forced upstream rerun that came out different
    _submit(down, force=False, inputs=consumed(store, inputs))
    assert hooks.begin(down.dir) == 0 and down.status()["state"] == "running"
