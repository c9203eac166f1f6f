"""Published artifacts are immutable to the stages that read them: read-only on publish, and
(since permissions do not stop root) verified against their manifests before a consumer
starts and after it ends, locally under -j 2 and in a Slurm job's stage hooks. A consumer that
read a changed input fails and is never up to date; the changed upstream is rebuilt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dag_helpers import phi4, plan_json

from orchestrator.executors import hooks
from orchestrator.exitcodes import FAILURE, OK
from orchestrator.launch import ResolvedInput
from orchestrator.records import State
from orchestrator.store import Store, write_json

# Every stage writes out/data.txt from its inputs; a file `tamper_<name>` in the root makes
# it write into its first input first (what the issue saw: `$PHI4_INPUT_UP/w`).
STAGE = r'''
import os, sys, time
name, root = sys.argv[1], sys.argv[2]
open(os.path.join(root, "ran.txt"), "a").write(name + "\n")
inputs = sorted(v for k, v in os.environ.items() if k.startswith("PHI4_INPUT_"))
if os.path.exists(os.path.join(root, "tamper_" + name)):
    open(os.path.join(inputs[0], "w"), "w").write("tampered")
time.sleep(float(os.environ.get("SLEEP", "0")))
text = name + "".join("[" + open(os.path.join(v, "data.txt")).read() + "]" for v in inputs)
out = os.path.join(os.environ["PHI4_OUTPUT_DIR"], "out")
os.makedirs(out)
open(os.path.join(out, "data.txt"), "w").write(text)
'''


def _pipeline(root: Path, stages: dict[str, list[str]], frozen: bool = False,
              sleep: dict[str, float] | None = None) -> Path:
    (root / "stage.py").write_text(STAGE)
    for name, ups in stages.items():
        lines = [f"name: {name}", "kind: command", "outputs: [out]",
                 "resources: {gpus_per_node: 0}",
                 f"cmd: [{json.dumps(sys.executable)}, {json.dumps(str(root / 'stage.py'))}, "
                 f"{name}, {json.dumps(str(root))}]",
                 f"env: {{SLEEP: '{(sleep or {}).get(name, 0)}'}}"]
        if ups:
            lines.append("inputs:")
            lines += [f"  {u}: {{stage: {u}, artifact: out, frozen: {str(frozen).lower()}}}"
                      for u in ups]
        (root / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    pipeline = root / "p.yaml"
    pipeline.write_text("name: p\nstages: [" + ", ".join(f"{n}.yaml" for n in stages) + "]\n")
    return pipeline


def _ran(root: Path) -> list[str]:
    path = root / "ran.txt"
    return path.read_text().split() if path.exists() else []


def _out(store: Path, name: str) -> str:
    return next((store / "stages" / name).glob("*/artifacts/out/data.txt")).read_text()


@pytest.mark.parametrize("frozen", [False, True], ids=["input", "frozen input"])
def test_a_consumer_that_wrote_into_its_input_fails_and_both_rerun(tmp_path: Path,
                                                                  frozen: bool) -> None:
    pipeline = _pipeline(tmp_path, {"a": [], "b": ["a"]}, frozen=frozen)
    store = tmp_path / "store"
    (tmp_path / "tamper_b").touch()
    done = phi4("run", str(pipeline), store=store)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    rows = {r["stage"]: r for r in json.loads(
        phi4("status", "--format", "json", store=store, check=0).stdout)["stages"]}
    assert rows["b"]["state"] == State.FAILED and rows["b"]["artifacts"] == []
    assert "input a (stage a): artifact corrupt: out/w not in the manifest" in rows["b"]["note"]
    assert "nothing published" in rows["b"]["note"]
    # The upstream is reported corrupt; both are planned to run again.
    plan = plan_json(pipeline, store)
    assert plan["a"]["verdict"] == plan["b"]["verdict"] == "run"
    assert plan["a"]["reasons"][0] == "artifact corrupt: out/w not in the manifest"
    (tmp_path / "tamper_b").unlink()
    phi4("run", str(pipeline), store=store, check=0)
    assert _ran(tmp_path) == ["a", "b", "a", "b"]  # b never counted up to date
    assert _out(store, "b") == "b[a]"
    plan = plan_json(pipeline, store)
    assert plan["a"]["verdict"] == plan["b"]["verdict"] == "up to date"


def test_under_j2_a_reader_of_an_input_changed_meanwhile_fails_too(tmp_path: Path) -> None:
    # b changes a's artifact while c, reading it at the same time, runs longer.
    pipeline = _pipeline(tmp_path, {"a": [], "b": ["a"], "c": ["a"]}, sleep={"c": 1.5})
    store = tmp_path / "store"
    (tmp_path / "tamper_b").touch()
    done = phi4("run", str(pipeline), "-j", "2", "--keep-going", store=store)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    rows = {r["stage"]: r for r in json.loads(
        phi4("status", "--format", "json", store=store, check=0).stdout)["stages"]}
    assert rows["b"]["state"] == rows["c"]["state"] == State.FAILED, rows
    assert "input a (stage a): artifact corrupt" in rows["c"]["note"]


def test_a_consumer_does_not_start_on_an_input_changed_before(tmp_path: Path) -> None:
    # -j 1: b (first) changes a's artifact; c is checked before it starts and never runs.
    pipeline = _pipeline(tmp_path, {"a": [], "b": ["a"], "c": ["a"]})
    store = tmp_path / "store"
    (tmp_path / "tamper_b").touch()
    done = phi4("run", str(pipeline), "--keep-going", store=store)
    assert done.returncode == 1
    assert _ran(tmp_path) == ["a", "b"]
    assert "c: blocked  input a (stage a): artifact corrupt" in done.stdout, done.stdout


def test_stage_hooks_verify_inputs_before_and_after(tmp_path: Path) -> None:
    store = Store(tmp_path)
    up = store.stage_dir("a", "a" * 16)
    up.begin("slurm", command=[], reasons=[], inputs={})
    (up.staging / "out").mkdir()
    (up.staging / "out" / "f").write_text("v1")
    assert up.publish(["out"]) is None
    up.end(State.SUCCEEDED, exit_code=0)
    down = store.stage_dir("b", "b" * 16)
    down.path.mkdir(parents=True)
    write_json(down.spec_file, {"outputs": ["out"]})
    inputs = store.with_digests({"a": ResolvedInput(
        "stage", str(up.artifacts / "out"), True, "out", "a", up.fingerprint).lineage()})
    down.queue("slurm", force=False, command=["true"], reasons=["new"], inputs=inputs)
    assert hooks.begin(down.path) == OK
    # The job's step writes into its input, then its own output, and exits 0.
    (up.artifacts / "out" / "f").write_text("changed")
    (down.staging / "out").mkdir()
    (down.staging / "out" / "f").write_text("b")
    assert hooks.end(down.path, 0) == FAILURE
    assert down.status().state == State.FAILED and down.published_version() is None
    assert "input a (stage a): artifact corrupt: out/f" in down.status().error
    # A job starting on it now is refused before its step runs: blocked by the upstream.
    down.queue("slurm", force=False, command=["true"], reasons=["new"], inputs=inputs)
    assert hooks.begin(down.path) == FAILURE
    assert (down.status().state, down.status().blocked_by) == (State.BLOCKED, "a")
    assert "input a (stage a): artifact corrupt: out/f" in down.status().error
