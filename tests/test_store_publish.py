"""Versioned publish: a publish killed (SIGKILL) at any of its steps leaves the previous
artifact published and valid, or the new one; the next attempt collects what it left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dag_helpers import REPO, make_pipeline, phi4, plan_json

from orchestrator.records import State
from orchestrator.store import KILL_AT_ENV, LEGACY_VERSION, PUBLISH_KILL_POINTS, Store

FP = "f" * 16

# Publish one attempt of stage s writing `text` into out/w, in a process of its own (so
# that the kill hook can SIGKILL it). argv: store, text, "force" to start over.
PUBLISH = r'''
import sys
from orchestrator.records import State
from orchestrator.store import Store
folder = Store(sys.argv[1]).stage_dir("s", "f" * 16)
folder.begin("local", command=[], reasons=[], inputs={})
(folder.staging / "out" / "sub").mkdir(parents=True)
(folder.staging / "out" / "w").write_text(sys.argv[2])
(folder.staging / "out" / "sub" / "x").write_text(sys.argv[2] * 2)
assert folder.publish(["out"]) is None
folder.end(State.SUCCEEDED, exit_code=0)
'''


def _publish(store: Path, text: str, kill_at: int | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_AT_ENV, None)
    if kill_at is not None:
        env[KILL_AT_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-c", PUBLISH, str(store), text], env=env,
                          timeout=60).returncode


def _published(store: Path) -> str | None:
    """The text of the valid published artifact, None when there is none."""
    folder = Store(store, read_only=True).stage_dir("s", FP)
    if folder.artifact_problem(["out"]) is not None:
        return None
    return (folder.published_version() / "out" / "w").read_text()


def _leftovers(store: Path) -> list[str]:
    path = store / "stages" / "s" / FP
    names = [p.name for p in path.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    versions = sorted(p.name for p in (path / "versions").iterdir())
    return names + (versions if len(versions) > 1 else [])


def _to_legacy(store: Path) -> None:
    """Rewrite the published version in the layout of a store from before versions."""
    folder = Store(store).stage_dir("s", FP)
    version = folder.published_version()
    folder.artifacts.unlink()
    os.rename(version / "manifest.json", folder.manifest_file)
    os.rename(version, folder.artifacts)
    os.rmdir(folder.versions)


@pytest.mark.parametrize("legacy", [False, True], ids=["versions", "pre-versions store"])
def test_publish_killed_at_every_step_leaves_a_valid_artifact(tmp_path: Path,
                                                              legacy: bool) -> None:
    store = tmp_path / "store"
    assert _publish(store, "old") == 0
    # Steps 2-4 move a pre-versions artifact into versions/: only such a store has them.
    for step in [k for k in range(1, PUBLISH_KILL_POINTS + 1) if legacy or k not in (2, 3, 4)]:
        if legacy:
            _to_legacy(store)
            assert _published(store) == "old"
        code = _publish(store, "new", kill_at=step)
        assert code == -9, f"step {step}: the hook did not fire"
        # Killed at any step: the old artifact, or (past the switch) the new one, verifies.
        seen = _published(store)
        assert seen == ("new" if step == PUBLISH_KILL_POINTS else "old"), (step, seen)
        # Whoever may write (a run) repairs the one gap: moved into versions/, not pointed at.
        Store(store).stage_dir("s", FP).artifact_problem(["out"])
        assert (store / "stages/s" / FP / "artifacts/out/w").read_text() == seen
        # The next publish collects every leftover and publishes.
        assert _publish(store, "old") == 0
        assert _published(store) == "old" and _leftovers(store) == [], step
        assert not (store / "stages" / "s" / FP / "versions" / LEGACY_VERSION).exists()
    folder = Store(store).stage_dir("s", FP)
    assert folder.artifacts.is_symlink() and not folder.manifest_file.exists()
    assert folder.status().state == State.SUCCEEDED


def test_published_files_are_read_only_and_the_old_version_is_removed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert _publish(store, "one") == 0
    folder = Store(store).stage_dir("s", FP)
    first = folder.published_version()
    for path in [first / "out", first / "out" / "w", first / "out" / "sub" / "x"]:
        assert os.stat(path).st_mode & 0o222 == 0, path
    assert _publish(store, "two") == 0
    assert not first.exists() and _published(store) == "two"
    assert [p.name for p in folder.versions.iterdir()] == [folder.published_version().name]


def test_forced_rerun_killed_in_publish_keeps_the_old_artifact_end_to_end(tmp_path: Path
                                                                          ) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    (tmp_path / "extra_a").write_text("v2")
    killed = phi4("run", str(pipeline), "--force", "a", store=store,
                  extra_env={KILL_AT_ENV: "7"})  # the new version complete, not switched
    assert killed.returncode == -9
    a_dir = next((store / "stages" / "a").glob("*/artifacts")).parent
    assert (a_dir / "artifacts" / "out" / "data.txt").read_text() == "a:"
    assert len(list((a_dir / "versions").iterdir())) == 2  # the unswitched one is left over
    plan = plan_json(pipeline, store)
    assert plan["a"]["verdict"] == plan["b"]["verdict"] == "up to date"
    # A plain run has nothing to do, yet collects the leftover.
    assert "nothing to run" in phi4("run", str(pipeline), store=store, check=0).stdout
    assert len(list((a_dir / "versions").iterdir())) == 1
    # The forced rerun, done this time, republishes.
    phi4("run", str(pipeline), "--force", "a", store=store, check=0)
    assert (a_dir / "artifacts" / "out" / "data.txt").read_text() == "a:v2"
    assert len(list((a_dir / "versions").iterdir())) == 1
    assert not [p for p in a_dir.iterdir() if p.name.startswith(".trash")]
    b_out = next((store / "stages" / "b").glob("*/artifacts/out/data.txt")).read_text()
    assert b_out == "b:[a:v2]"
    manifest = json.loads((a_dir / "artifacts" / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"out"}
