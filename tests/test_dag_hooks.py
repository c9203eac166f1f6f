"""`phi4 stage-hook begin` (what a Slurm or NeMo-Run job runs first), in-process."""

from __future__ import annotations

from pathlib import Path

from orchestrator.executors import hooks
from orchestrator.exitcodes import OK, SKIP
from orchestrator.launch import ResolvedInput
from orchestrator.records import InputRecord, State
from orchestrator.store import Store, write_json


def _publish(folder, text: str, inputs: dict[str, InputRecord] | None = None) -> None:
    folder.begin("slurm", command=[], reasons=[], inputs=inputs or {})
    (folder.staging / "out").mkdir()
    (folder.staging / "out" / "f").write_text(text)
    assert folder.publish(["out"]) is None
    folder.end(State.SUCCEEDED, exit_code=0)


def _submit(folder, force: bool, inputs: dict[str, InputRecord]) -> None:
    """What SlurmExecutor._submit_one records."""
    folder.queue("slurm", force=force, command=["true"], reasons=["test"], inputs=inputs)


def _lineage(store: Store, inputs: dict[str, ResolvedInput]) -> dict[str, InputRecord]:
    return store.with_digests({name: inp.lineage() for name, inp in inputs.items()})


def test_begin_skips_only_an_unforced_rerun_with_the_same_inputs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    up = store.stage_dir("a", "a" * 16)
    _publish(up, "v1")
    down = store.stage_dir("b", "b" * 16)
    down.path.mkdir(parents=True)
    write_json(down.spec_file, {"outputs": ["out"]})
    inputs = {"a": ResolvedInput("stage", str(up.artifacts / "out"), False, "out", "a",
                                 up.fingerprint)}
    _publish(down, "b", _lineage(store, inputs))

    _submit(down, force=False, inputs=_lineage(store, inputs))
    assert hooks.begin(down.path) == SKIP
    assert down.status().state == State.SUCCEEDED and down.status().attempt == 1
    _submit(down, force=True, inputs=_lineage(store, inputs))
    assert hooks.begin(down.path) == OK and down.status().state == State.RUNNING
    # what the submission recorded is kept by the attempt it starts
    assert (down.status().command, down.status().reasons) == (["true"], ["test"])
    _publish(down, "b", _lineage(store, inputs))

    _publish(up, "v2")  # a forced upstream rerun that came out different
    _submit(down, force=False, inputs=_lineage(store, inputs))
    assert hooks.begin(down.path) == OK and down.status().state == State.RUNNING


def test_hooks_report_a_damaged_record_in_one_line(tmp_path: Path) -> None:
    """A record the hook cannot use (a folder where status.json belongs) is one line in the
    job log and exit 2, never a traceback: begin and end alike."""
    from click.testing import CliRunner

    from orchestrator.cli import cli
    from orchestrator.exitcodes import BAD_INPUT

    folder = Store(tmp_path).stage_dir("a", "a" * 16)
    folder.path.mkdir(parents=True)
    write_json(folder.spec_file, {"outputs": ["out"]})
    folder.status_file.mkdir()
    for args in (["begin"], ["end", "--exit-code", "0"]):
        result = CliRunner().invoke(cli, ["stage-hook", *args, str(folder.path)])
        assert result.exit_code == BAD_INPUT, (args, result.output, result.exception)
        assert "Traceback" not in result.output and str(folder.status_file) in result.output
