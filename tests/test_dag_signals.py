"""Runs that die, are stopped, are preempted, or race another run on the same store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dag_helpers import REPO, counts, make_pipeline, phi4, plan_json


def _start(*args: str) -> subprocess.Popen:
    """`phi4 ARGS` in its own session, as a terminal would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stage_dir(store: Path, name: str) -> Path:
    _wait_for(lambda: any((store / "stages" / name).glob("*/started")))
    return next((store / "stages" / name).glob("*/started")).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkilled_run_publishes_nothing_and_rerun_resumes(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path)
    store = tmp_path / "store"
    (tmp_path / "hold_b").touch()
    run = _start("run", str(pipeline), "--store", str(store))
    b_dir = _stage_dir(store, "b")
    child = json.loads((b_dir / "status.json").read_text())
    _wait_for(lambda: json.loads((b_dir / "status.json").read_text()).get("child_pid"))
    child_pid = json.loads((b_dir / "status.json").read_text())["child_pid"]
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    # The stage dies with the run (parent-death signal), leaving nothing published.
    _wait_for(lambda: not _alive(child_pid))
    assert child["state"] == "running"
    assert not (b_dir / "artifacts").exists() and not (b_dir / "manifest.json").exists()
    status = json.loads(phi4("status", "--format", "json", store=store, check=0).stdout)
    assert {r["stage"]: r["state"] for r in status["stages"]} == {"a": "succeeded",
                                                                  "b": "interrupted"}
    plan = plan_json(pipeline, store)
    assert plan["b"]["reasons"] == ["interrupted (attempt 1 died without finishing); will "
                                    "resume from checkpoints/"]
    (tmp_path / "hold_b").unlink()
    phi4("run", str(pipeline), store=store, check=0)
    assert counts(tmp_path) == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert (tmp_path / "resumed_b").exists()  # its checkpoints/ survived the rerun
    assert json.loads((b_dir / "status.json").read_text())["attempt"] == 2


def test_ctrl_c_stops_the_stage_and_marks_it_cancelled(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path)
    store = tmp_path / "store"
    (tmp_path / "hold_b").touch()
    run = _start("run", str(pipeline), "--store", str(store))
    b_dir = _stage_dir(store, "b")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGINT, err
    status = json.loads((b_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and status["exit_code"] == 75
    assert not _alive(status["child_pid"])
    assert counts(tmp_path) == {"a": 1, "b": 1}
    assert plan_json(pipeline, store)["b"]["reasons"] == [
        "cancelled (attempt 1); will resume from checkpoints/"]


def test_preempted_stage_is_resumable_and_run_exits_75(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    (tmp_path / "hold_a").touch()
    run = _start("run", str(pipeline), "--store", str(store))
    a_dir = _stage_dir(store, "a")
    _wait_for(lambda: json.loads((a_dir / "status.json").read_text()).get("child_pid"))
    os.kill(json.loads((a_dir / "status.json").read_text())["child_pid"], signal.SIGTERM)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 75, err
    status = json.loads((a_dir / "status.json").read_text())
    assert status["state"] == "preempted"
    assert plan_json(pipeline, store)["a"]["reasons"] == [
        "preempted (attempt 1, exit 75); will resume from checkpoints/"]
    (tmp_path / "hold_a").unlink()
    phi4("run", str(pipeline), store=store, check=0)
    assert (tmp_path / "resumed_a").exists()


def test_two_concurrent_runs_execute_each_stage_once(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, env={name: {"SLEEP": "0.4"} for name in "abcd"})
    store = tmp_path / "store"
    runs = [_start("run", str(pipeline), "--store", str(store), "--jobs", "2")
            for _ in range(2)]
    results = [r.communicate(timeout=60) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], results
    assert counts(tmp_path) == {"a": 1, "b": 1, "c": 1, "d": 1}
    both = results[0][0] + results[1][0]
    assert "done by another run" in both
    assert {s["verdict"] for s in plan_json(pipeline, store).values()} == {"up to date"}


def test_a_second_run_waits_for_the_stage_the_first_is_running(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    (tmp_path / "hold_a").touch()
    first = _start("run", str(pipeline), "--store", str(store))
    _stage_dir(store, "a")
    plan = plan_json(pipeline, store)
    assert plan["a"]["reasons"][0].startswith("running in another phi4 run (pid ")
    second = _start("run", str(pipeline), "--store", str(store))
    said = second.stdout.readline()  # its first event, however long its start-up takes
    assert "] a: waiting  locked by phi4 pid " in said and second.poll() is None
    (tmp_path / "hold_a").unlink()
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    assert "done by another run" in second.stdout.read()
    assert counts(tmp_path) == {"a": 1}
