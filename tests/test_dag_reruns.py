"""Reruns of finished stages: forced, or because an input was republished with other files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dag_helpers import REPO, counts, make_pipeline, phi4, plan_json

START_OVER = "will start over (not from the finished attempt's checkpoints/)"


def _out(store: Path, name: str) -> str:
    return next((store / "stages" / name).glob("*/artifacts/out/data.txt")).read_text()


def test_forced_rerun_of_a_finished_stage_starts_over(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    plan = plan_json(pipeline, store, "--force")
    assert plan["a"]["reasons"] == ["forced (--force)", START_OVER]
    phi4("run", str(pipeline), "--force", store=store, check=0)
    assert counts(tmp_path) == {"a": 2}
    # The finished attempt's checkpoint was discarded, not resumed from.
    assert not (tmp_path / "resumed_a").exists()


def test_rerun_after_republished_input_starts_over(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    (tmp_path / "extra_a").write_text("v2")  # a's files change, its fingerprint does not
    phi4("run", str(pipeline), "--force", "a", store=store, check=0)
    assert counts(tmp_path) == {"a": 2, "b": 2}
    assert not (tmp_path / "resumed_b").exists()  # b trained afresh on the new a
    assert _out(store, "b") == "b:[a:v2]"


def test_interrupted_stage_still_resumes(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    (tmp_path / "fail_a").touch()
    phi4("run", str(pipeline), store=store, check=1)
    (tmp_path / "fail_a").unlink()
    assert plan_json(pipeline, store)["a"]["reasons"] == [
        "last attempt failed (exit code 3); will resume from checkpoints/"]
    phi4("run", str(pipeline), store=store, check=0)
    assert (tmp_path / "resumed_a").exists()


def test_failed_forced_rerun_keeps_the_published_artifact(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    before = _out(store, "a")
    (tmp_path / "hold_a").touch()
    (tmp_path / "fail_a").touch()
    run = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(pipeline),
                            "--force", "a", "--store", str(store)],
                           env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a_dir = next((store / "stages" / "a").glob("*/artifacts/manifest.json")).parent.parent
    deadline = time.monotonic() + 30
    while not (a_dir / "started").exists() or counts(tmp_path).get("a") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Mid-run, the previous artifact is still there for whoever reads it.
    assert _out(store, "a") == before and (a_dir / "artifacts" / "manifest.json").exists()
    (tmp_path / "hold_a").unlink()
    assert run.wait(timeout=30) == 1
    assert _out(store, "a") == before  # the failure took nothing away
    plan = plan_json(pipeline, store)
    assert plan["a"]["verdict"] == plan["b"]["verdict"] == "up to date"
    assert plan["a"]["reasons"] == ["attempt 2 failed (exit code 3); the artifact published "
                                    "before it still verifies and is used"]
    # A single recipe still finds it.
    phi4("plan", str(tmp_path / "recipes" / "b.yaml"), store=store, check=0)
    (tmp_path / "fail_a").unlink()
    (tmp_path / "extra_a").write_text("v2")
    phi4("run", str(pipeline), "--force", "a", store=store, check=0)
    assert _out(store, "a") == "a:v2" and _out(store, "b") == "b:[a:v2]"
    assert not list(a_dir.glob(".trash.*")) and not list(a_dir.glob(".manifest.next.*"))
