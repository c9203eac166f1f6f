"""`phi4 run` stopped while the trainer writes a checkpoint (megatron's writer held mid-write by
tests/writer_hold): Ctrl-C at a terminal (SIGINT to the run's whole process group), SIGTERM to
the run alone, and a second Ctrl-C (no more grace: SIGKILL). Every rerun resumes from the newest
complete checkpoint and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tracker_files
from interrupt_helpers import REPO, hold_env, pending, wait_until, writer_pid

pytestmark = pytest.mark.slow
# `make test` installs the trackers extra (in CI it must be there).
HAVE_MLFLOW = os.environ.get("CI") == "true" or importlib.util.find_spec("mlflow") is not None
RECIPE = str(REPO / "recipes" / "text_pretrain.yaml")
# Checkpoints at steps 10, 20, 30 and 40: there is always one on disk when the next is written.
# 40 steps whatever the tiny profile gives the demo (its text stages run longer)
TINY = ("--profile", "tiny", "--set", "train.steps=40", "--set", "train.save_interval=10")


def _env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": str(cache), **(extra or {})}
    env.pop("PHI4_STORE", None)
    return env


def _run(store: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", RECIPE, *TINY, *extra,
                           "--store", str(store)], capture_output=True, text=True,
                          env=_env(cache), timeout=600)


def _start(store: Path, cache: Path, hold: Path, step: int, *extra: str) -> subprocess.Popen:
    """A run in its own session (as a terminal starts it) whose checkpoint `step` is held."""
    out = open(store.parent / f"run.{step}.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", RECIPE, *TINY, *extra,
                             "--store", str(store)], stdout=out, stderr=subprocess.STDOUT,
                            env=_env(cache, hold_env(hold, step)), start_new_session=True)
    out.close()
    return proc


def _stage(store: Path) -> Path:
    (folder,) = (store / "stages" / "text_pretrain").glob("*/spec.json")
    return folder.parent


def _summary(store: Path) -> dict:
    return json.loads((_stage(store) / "artifacts" / "model" / "train_summary.json").read_text())


def _complete(store: Path) -> list[str]:
    """The checkpoints a rerun may trust: complete (meta.json, written last)."""
    return sorted(p.name for p in (_stage(store) / "checkpoints").iterdir()
                  if (p / "meta.json").is_file())


def _stop_while_writing(store: Path, cache: Path, step: int, stop, *extra: str,
                        sig: int = signal.SIGTERM) -> subprocess.Popen:
    """Start a run, wait until checkpoint `step` is being written, `stop(run)`, and wait until
    the stage's processes have `sig` (what phi4 run sends them: SIGTERM), held off by the
    writer."""
    hold = store.parent / f"hold.{step}"
    run = _start(store, cache, hold, step, *extra)
    alive = lambda: run.poll() is None  # noqa: E731
    writer = writer_pid(hold, alive)
    stop(run)
    wait_until(lambda: sig in pending(writer), f"{signal.Signals(sig).name} held off by the "
               "writer", alive)
    run.hold, run.writer = hold, writer
    return run


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> dict:
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    out = _run(store, cache)
    assert out.returncode == 0, out.stdout + out.stderr
    return _summary(store)


def test_ctrl_c_while_a_checkpoint_is_written_then_the_rerun_is_bit_identical(
        tmp_path: Path, cache: Path, uninterrupted: dict) -> None:
    """The attempt logs to MLflow (a local file store; logging is not fingerprinted): the
    resumed attempt appends to the run the stopped one began."""
    store = tmp_path / "store"
    mlruns = tmp_path / "mlruns"
    tracker = ("--set", f"logging.mlflow.tracking_uri=file:{mlruns}") if HAVE_MLFLOW else ()
    run = _stop_while_writing(store, cache, 20, lambda r: os.killpg(r.pid, signal.SIGINT),
                              *tracker)
    (run.hold / "hold").unlink()  # the writer finishes step 20
    assert run.wait(timeout=300) == 128 + signal.SIGINT, (tmp_path / "run.20.out").read_text()
    status = json.loads((_stage(store) / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("cancelled", 75)
    log = (_stage(store) / "logs" / "stdout.log").read_text()
    assert "preempted (signal 15): checkpoint at step 20" in log and "Error" not in log
    assert sorted(p.name for p in (_stage(store) / "checkpoints").iterdir()) == \
        ["step_10", "step_20"] == _complete(store)
    wait_until(lambda: _group_gone(status["child_pid"]), "the stage's helpers to end")

    again = _run(store, cache, *tracker)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(store)["resumed_from_step"] == 20
    assert _summary(store)["weights_sha256"] == uninterrupted["weights_sha256"]
    if tracker:
        (run_id,) = tracker_files.mlflow_runs(mlruns)
        logged = tracker_files.mlflow_run(mlruns, run_id)
        assert [step for step, _ in logged["metrics"]["loss"]] == list(range(40))
        assert logged["status"] == "FINISHED"


def test_sigterm_to_the_run_then_a_second_ctrl_c_leave_no_trusted_half_checkpoint(
        tmp_path: Path, cache: Path, uninterrupted: dict) -> None:
    store = tmp_path / "store"
    # SIGTERM to phi4 run alone (not its group): it stops the stage the same way.
    run = _stop_while_writing(store, cache, 20, lambda r: r.send_signal(signal.SIGTERM))
    (run.hold / "hold").unlink()
    assert run.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "run.20.out").read_text()
    assert _complete(store) == ["step_10", "step_20"]

    # The rerun resumes from step 20; Ctrl-C while step 30 is written, then Ctrl-C again:
    # no more grace, the stage is killed in the middle of writing it.
    run = _stop_while_writing(store, cache, 30, lambda r: os.killpg(r.pid, signal.SIGINT))
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=300) == 128 + signal.SIGINT, (tmp_path / "run.30.out").read_text()
    status = json.loads((_stage(store) / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("cancelled", -signal.SIGKILL)
    wait_until(lambda: _group_gone(status["child_pid"]), "the stage's processes to be killed")
    checkpoints = _stage(store) / "checkpoints"
    assert (checkpoints / "tmp.step_30").is_dir()  # half written, never trusted
    assert _complete(store) == ["step_10", "step_20"]
    assert not (_stage(store) / "artifacts").exists()

    again = _run(store, cache)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (_stage(store) / "logs" / "stdout.log").read_text()
    assert f"resumed from {checkpoints / 'step_20'}" in log
    assert _summary(store)["weights_sha256"] == uninterrupted["weights_sha256"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_30", "step_40"]


TWO = ("--set", "resources.procs_per_node=2")  # under torchrun (phi4core.elastic), dp=2


@pytest.fixture(scope="module")
def uninterrupted_two(tmp_path_factory, cache) -> dict:
    store = tmp_path_factory.mktemp("uninterrupted_two") / "store"
    out = _run(store, cache, *TWO)
    assert out.returncode == 0, out.stdout + out.stderr
    return _summary(store)


def test_torchrun_stage_preempted_then_killed_by_a_second_ctrl_c(
        tmp_path: Path, cache: Path, uninterrupted_two: dict) -> None:
    """Two processes under torchrun: SIGUSR1 to the launcher (as srun passes Slurm's
    pre-timeout signal to a task) reaches the workers, which checkpoint; the launch exits 75
    (preempted). Then a second Ctrl-C kills the launcher mid-checkpoint: its workers die with
    it, before the run has ended, and the rerun resumes from the newest complete checkpoint."""
    store = tmp_path / "store"

    def usr1_to_the_launcher(run):
        os.kill(json.loads((_stage(store) / "status.json").read_text())["child_pid"],
                signal.SIGUSR1)

    run = _stop_while_writing(store, cache, 20, usr1_to_the_launcher, *TWO, sig=signal.SIGUSR1)
    (run.hold / "hold").unlink()
    assert run.wait(timeout=300) == 75, (tmp_path / "run.20.out").read_text()
    status = json.loads((_stage(store) / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("preempted", 75)
    assert _complete(store) == ["step_10", "step_20"]

    run = _stop_while_writing(store, cache, 30, lambda r: os.killpg(r.pid, signal.SIGINT), *TWO)
    worker = os.getpgid(run.writer)  # a torchrun worker leads its own process group
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=300) == 128 + signal.SIGINT, (tmp_path / "run.30.out").read_text()
    wait_until(lambda: _group_gone(worker), "the workers to die with their launcher")
    assert _complete(store) == ["step_10", "step_20"]

    again = _run(store, cache, *TWO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(store)["resumed_from_step"] == 20
    assert _summary(store)["weights_sha256"] == uninterrupted_two["weights_sha256"]
