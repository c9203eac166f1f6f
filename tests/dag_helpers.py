"""Command-stage pipelines in a temporary folder, and the CLI as a subprocess.

Every stage runs `stage.py`, which appends its name to counter.txt (how often each stage
really ran) and writes its one output from its inputs' contents. Files in the root steer it
without touching fingerprints: `hold_<name>` keeps it waiting, `fail_<name>` makes it exit 3,
`extra_<name>`'s text goes into its output;
on SIGTERM it exits 75 like the trainer; it leaves `resumed_<name>` when it found its own
checkpoint from an earlier attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGE_SCRIPT = r'''
import os, signal, sys, time
name = sys.argv[1]
stage_dir = os.environ["PHI4_STAGE_DIR"]
control = os.environ["CONTROL"]


def preempted(signum, frame):  # like the trainer: checkpoint, then ask to be requeued
    sys.exit(75)


signal.signal(signal.SIGTERM, preempted)
with open(os.path.join(control, "counter.txt"), "a") as f:
    f.write(name + "\n")
resumed = os.path.exists(os.path.join(stage_dir, "checkpoints", "ckpt"))
open(os.path.join(stage_dir, "checkpoints", "ckpt"), "w").close()
open(os.path.join(stage_dir, "started"), "w").close()
with open(os.path.join(stage_dir, "metrics.jsonl"), "a") as f:  # as the trainer does
    f.write('{"step": 0, "loss": 2.5}\n{"step": 1, "loss": 1.25}\n')
while os.path.exists(os.path.join(control, "hold_" + name)):
    time.sleep(0.05)
time.sleep(float(os.environ.get("SLEEP", "0")))
if os.path.exists(os.path.join(control, "fail_" + name)):
    sys.exit(3)
inputs = sorted((k, v) for k, v in os.environ.items() if k.startswith("PHI4_INPUT_"))
extra = os.path.join(control, "extra_" + name)
text = name + ":" + os.environ.get("SALT", "") + (open(extra).read() if os.path.exists(extra)
                                                  else "") + "".join(
    "[" + open(os.path.join(v, "data.txt")).read() + "]" for _, v in inputs)
out = os.path.join(os.environ["PHI4_OUTPUT_DIR"], "out")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "data.txt"), "w") as f:
    f.write(text)
if resumed:
    open(os.path.join(control, "resumed_" + name), "w").close()
'''

DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def write_stage(root: Path, name: str, upstream: list[str], env: dict[str, str] | None = None
                ) -> Path:
    lines = [f"name: {name}", "kind: command",
             f"cmd: [{json.dumps(sys.executable)}, {json.dumps(str(root / 'stage.py'))}, {name}]",
             "outputs: [out]",
             "resources: {gpus_per_node: 0}"]
    if upstream:
        lines.append("inputs:")
        lines += [f"  {u}: {{stage: {u}, artifact: out}}" for u in upstream]
    environment = {"CONTROL": str(root), **(env or {})}
    lines.append("env:")
    lines += [f"  {k}: {json.dumps(v)}" for k, v in environment.items()]
    path = root / "recipes" / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_pipeline(root: Path, stages: dict[str, list[str]] = DIAMOND,
                  env: dict[str, dict[str, str]] | None = None) -> Path:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    for name, upstream in stages.items():
        write_stage(root, name, upstream, (env or {}).get(name))
    pipeline = root / "pipeline.yaml"
    pipeline.write_text("name: test\nstages:\n" +
                        "".join(f"  - recipes/{n}.yaml\n" for n in stages))
    return pipeline


def phi4(*args: str, store: Path | None = None, check: int | None = None, timeout: float = 60,
         extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "orchestrator.cli", *args]
    if store is not None:
        argv += ["--store", str(store)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    env.pop("PHI4_STORE", None)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          **kwargs)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def counts(root: Path) -> dict[str, int]:
    try:
        names = (root / "counter.txt").read_text().split()
    except FileNotFoundError:
        return {}
    return {n: names.count(n) for n in sorted(set(names))}


def plan_json(pipeline: Path, store: Path, *args: str, extra_env: dict[str, str] | None = None
              ) -> dict[str, dict]:
    out = phi4("plan", str(pipeline), "--format", "json", *args, store=store, check=0,
               extra_env=extra_env)
    return {s["name"]: s for s in json.loads(out.stdout)["stages"]}
