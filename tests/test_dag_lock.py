"""The stage lock belongs to phi4: held while the stage's own process lives (even when the run
that started it was SIGKILLed), never by what the stage leaves running in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dag_helpers import REPO, phi4

from orchestrator.store import StageLock

# Appends "start"/"end <code>" to events.txt; holds while `hold` exists; on SIGTERM (the
# parent-death signal of a killed run) lingers while `linger` exists, as a trainer finishing a
# checkpoint does, then exits 75.
LINGERING_STAGE = r'''
import os, sys, time
control = os.environ["CONTROL"]
def note(text):
    with open(os.path.join(control, "events.txt"), "a") as f:
        f.write(text + "\n")
def stop(signum, frame):
    while os.path.exists(os.path.join(control, "linger")):
        time.sleep(0.05)
    note("end 75")
    sys.exit(75)
import signal
signal.signal(signal.SIGTERM, stop)
note("start")
open(os.path.join(os.environ["PHI4_STAGE_DIR"], "started"), "w").close()
while os.path.exists(os.path.join(control, "hold")):
    time.sleep(0.05)
out = os.path.join(os.environ["PHI4_OUTPUT_DIR"], "out")
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "data.txt"), "w").write("done")
note("end 0")
'''


def _recipe(root: Path, cmd: list[str]) -> Path:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    path = root / "recipes" / "a.yaml"
    path.write_text("name: a\nkind: command\n"
                    f"cmd: {json.dumps(cmd)}\n"
                    "outputs: [out]\nresources: {gpus_per_node: 0}\n"
                    f"env: {{CONTROL: {json.dumps(str(root))}}}\n")
    return path


def _start(args: list[str], out: Path) -> subprocess.Popen:
    """`phi4 ARGS` in its own session, output to a file."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PHI4_STORE", None)
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stage_dir(store: Path) -> Path:
    _wait_for(lambda: any((store / "stages" / "a").glob("*/started")), "the stage to start")
    return next((store / "stages" / "a").glob("*/started")).parent


try:  # the import itself is what can break (a leptonai release it cannot import)
    import nemo_run  # noqa: F401
    HAVE_NEMO_RUN = True
except ImportError:
    HAVE_NEMO_RUN = False


@pytest.mark.parametrize("executor", [
    "local", pytest.param("nemo_run", marks=pytest.mark.skipif(
        not HAVE_NEMO_RUN, reason="nemo_run is not importable: pip install 'phi4[nemo-run]'"))])
def test_a_daemon_left_by_a_stage_does_not_keep_the_lock(
        tmp_path: Path, executor: str) -> None:
    # A daemon (its own session: what runs the task, NeMo-Run's included, does not stop it).
    script = ("setsid -f sh -c 'echo $$ >> \"$CONTROL/bg.pids\"; exec sleep 1000' "
              '</dev/null >/dev/null 2>&1; until [ -s "$CONTROL/bg.pids" ]; do sleep 0.05; done; '
              'mkdir -p "$PHI4_OUTPUT_DIR/out"; echo x > "$PHI4_OUTPUT_DIR/out/data.txt"; '
              'touch "$PHI4_STAGE_DIR/started"')
    recipe = _recipe(tmp_path, ["bash", "-c", script])
    store = tmp_path / "store"
    try:
        phi4("run", str(recipe), "--executor", executor, store=store, check=0, timeout=300)
        stage_dir = _stage_dir(store)
        os.kill(int((tmp_path / "bg.pids").read_text()), 0)  # still running
        lock = StageLock(stage_dir / ".lock")
        assert lock.try_acquire(), "the stage's background process holds the stage lock"
        lock.release()
        again = phi4("run", str(recipe), "--force", store=store, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "a: succeeded" in again.stdout
    finally:
        for pid in (tmp_path / "bg.pids").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_stage_outliving_a_killed_run_keeps_its_stage_locked(tmp_path: Path) -> None:
    (tmp_path / "stage.py").write_text(LINGERING_STAGE)
    recipe = _recipe(tmp_path, [sys.executable, str(tmp_path / "stage.py")])
    store = tmp_path / "store"
    (tmp_path / "hold").touch()
    (tmp_path / "linger").touch()
    first = _start(["run", str(recipe), "--store", str(store)], tmp_path / "first.out")
    stage_dir = _stage_dir(store)
    os.killpg(first.pid, signal.SIGKILL)  # the run and everything in its process group
    first.wait()
    # The stage got SIGTERM from its parent's death and is still finishing up: locked.
    assert StageLock(stage_dir / ".lock").is_held_elsewhere()
    status = json.loads(phi4("status", "--format", "json", store=store, check=0).stdout)
    assert status["stages"][0]["state"] == "running"
    second = _start(["run", str(recipe), "--store", str(store)], tmp_path / "second.out")
    _wait_for(lambda: "a: waiting" in (tmp_path / "second.out").read_text(),
              "the second run to wait for the lock")
    assert (tmp_path / "events.txt").read_text().split("\n") == ["start", ""]
    (tmp_path / "hold").unlink()
    (tmp_path / "linger").unlink()
    assert second.wait(timeout=60) == 0, (tmp_path / "second.out").read_text()
    # The second attempt started only once the first had ended.
    assert (tmp_path / "events.txt").read_text().split() == ["start", "end", "75", "start",
                                                             "end", "0"]
