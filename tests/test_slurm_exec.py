"""`phi4 run --executor slurm` against the real local controller, with command stages.

Skipped (with the reason) when the controller is down. Each test uses its own store; jobs
left queued by a failing test are cancelled at the end of the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dag_helpers import counts, make_pipeline
from slurm_helpers import (
    LOCAL_CLUSTER,
    job_ended,
    job_info,
    phi4,
    recorded,
    status,
    wait_status,
    why_not_up,
)

pytestmark = pytest.mark.slurm
SLURM = ("--executor", "slurm", "--cluster", str(LOCAL_CLUSTER))
CHAIN = {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}


@pytest.fixture(scope="module")
def slurm():
    reason = why_not_up()
    if reason:
        pytest.skip(reason)
    stores: list[Path] = []
    yield stores
    for store in stores:  # whatever a failed test left queued
        phi4("cancel", str(store / "pipeline.yaml"), "--store", str(store / "store"))


def _run(pipeline: Path, store: Path, *args: str, check: int | None = 0):
    return phi4("run", str(pipeline), "--store", str(store), *SLURM, *args, check=check)


def test_pipeline_runs_to_success_and_publishes(slurm, tmp_path: Path) -> None:
    root = tmp_path / "with space"  # the store path is quoted in #SBATCH lines and the body
    pipeline = make_pipeline(root)
    store = root / "store"
    slurm.append(root)
    t0 = time.monotonic()
    out = _run(pipeline, store, "--wait", "--poll", "0.2")
    elapsed = time.monotonic() - t0
    assert "4 succeeded" in out.stderr, out.stdout + out.stderr
    assert counts(root) == {"a": 1, "b": 1, "c": 1, "d": 1}
    rows = status(store)
    assert {r["state"] for r in rows.values()} == {"succeeded"}
    assert all(r["executor"] == "slurm" and r["job"].isdigit() for r in rows.values())
    # Published and verified: the plan finds every stage up to date.
    plan = json.loads(phi4("plan", str(pipeline), "--store", str(store), "--format", "json",
                           check=0).stdout)
    assert {s["verdict"] for s in plan["stages"]} == {"up to date"}
    data = next((store / "stages" / "d").glob("*/artifacts/out/data.txt")).read_text()
    assert data == "d:[b:[a:]][c:[a:]]"
    d = recorded(store, "d")
    assert set(d["depends_on"]) == {"b", "c"} and d["dependency"].startswith("afterok:")
    assert d["inputs"]["b"]["digest"]  # lineage: filled in when the job started
    script = Path(d["script"]).read_text()
    assert "#SBATCH --job-name=test.d\n" in script and "#SBATCH --requeue\n" in script
    assert f'#SBATCH --output="{Path(d["script"]).parent}/logs/stdout.log"' in script
    log = (Path(d["script"]).parent / "logs" / "stdout.log").read_text()
    assert log.startswith("=== phi4 attempt 1 of d") and "=== phi4: d succeeded" in log
    again = _run(pipeline, store)
    assert "nothing to run: 4 stages up to date" in again.stdout
    print(f"4-stage diamond through Slurm with --wait: {elapsed:.1f} s")


def test_failure_blocks_descendants_and_a_rerun_resubmits_only_them(slurm, tmp_path) -> None:
    pipeline = make_pipeline(tmp_path, {**CHAIN, "e": ["a"]})
    store = tmp_path / "store"
    slurm.append(tmp_path)
    (tmp_path / "fail_b").touch()
    out = _run(pipeline, store, "--wait", "--poll", "0.2", check=1)
    rows = status(store)
    assert {n: r["state"] for n, r in rows.items()} == {
        "a": "succeeded", "b": "failed", "c": "blocked", "d": "blocked", "e": "succeeded"}, out
    assert rows["b"]["note"] == "exit code 3"
    for name in ("c", "d"):  # d waits on c, which waits on b: both name the root cause
        assert rows[name]["note"].startswith("never ran: upstream b failed"), rows[name]
    # Nothing of the run is left queued: Slurm removed c and d (--kill-on-invalid-dep=yes),
    # or --wait cancelled them when it saw they could never start.
    jobs = [recorded(store, n)["job_id"] for n in rows]
    left = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T %r"],
                          capture_output=True, text=True, timeout=30)
    assert left.stdout.strip() == "", left.stdout
    c_job = recorded(store, "c")["job_id"]
    assert job_info(c_job)["JobState"] == "CANCELLED"
    assert counts(tmp_path) == {"a": 1, "b": 1, "e": 1}

    (tmp_path / "fail_b").unlink()
    out = _run(pipeline, store, "--wait", "--poll", "0.2")
    submitted = [ln.split()[1].rstrip(":") for ln in out.stdout.splitlines()
                 if ln.startswith("submitted")]
    assert submitted == ["b", "c", "d"], out.stdout
    assert counts(tmp_path) == {"a": 1, "b": 2, "c": 1, "d": 1, "e": 1}
    assert {r["state"] for r in status(store).values()} == {"succeeded"}


def test_cancel_stops_a_stage_and_its_queued_descendants(slurm, tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, CHAIN)
    store = tmp_path / "store"
    slurm.append(tmp_path)
    (tmp_path / "hold_b").touch()  # b runs until cancelled; c and d wait on it
    _run(pipeline, store)
    wait_status(store, lambda r: "b" in r and r["b"]["state"] == "running"
                and counts(tmp_path) == {"a": 1, "b": 1}, "b running")
    jobs = {n: recorded(store, n)["job_id"] for n in ("b", "c", "d")}
    again = _run(pipeline, store)  # queued or running jobs are never submitted twice
    assert [ln.split()[0] for ln in again.stdout.splitlines()] == ["kept"] * 3, again.stdout
    assert {n: recorded(store, n)["job_id"] for n in ("b", "c", "d")} == jobs
    out = phi4("cancel", "b", "--store", str(store), check=0)
    assert out.stdout.splitlines() == [f"cancelled  {n}: job {jobs[n]}" for n in "bcd"]
    rows = status(store)
    assert [rows[n]["state"] for n in "abcd"] == ["succeeded", "cancelled", "cancelled",
                                                 "cancelled"]
    assert rows["c"]["note"] == f"cancelled by phi4 cancel (job {jobs['c']})"
    deadline = time.monotonic() + 30
    while any(job_info(j)["JobState"] != "CANCELLED" for j in jobs.values()):
        assert time.monotonic() < deadline, {j: job_info(j)["JobState"] for j in jobs.values()}
        time.sleep(0.2)
    assert recorded(store, "b")["state"] == "cancelled"  # b's end hook left it so
    assert counts(tmp_path) == {"a": 1, "b": 1}
    out = phi4("cancel", str(pipeline), "--store", str(store), check=0)
    assert out.stdout.startswith("nothing to cancel")

    # A job cancelled behind phi4's back, before it started: status learns it from Slurm.
    _run(pipeline, store)
    d_job = recorded(store, "d")["job_id"]
    subprocess.run(["scancel", d_job], check=True, timeout=30)
    rows = wait_status(store, lambda r: r["d"]["state"] == "cancelled", "d cancelled")
    assert rows["d"]["note"] == f"Slurm job {d_job} was cancelled"
    assert rows["c"]["state"] == "pending" and rows["c"]["note"].startswith(
        f"job {recorded(store, 'c')['job_id']} pending (Dependency")
    phi4("cancel", str(pipeline), "--store", str(store), check=0)


PREEMPTIBLE = r'''
import os, signal, sys, time
stage_dir = os.environ["PHI4_STAGE_DIR"]
ckpt = os.path.join(stage_dir, "checkpoints", "step.txt")
step = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
print("starting at step", step, flush=True)
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))  # like the trainer
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
if step == 0:
    open(os.path.join(stage_dir, "ready"), "w").close()
while step < 20:
    if stop:
        with open(ckpt, "w") as f:
            f.write(str(step))
        print("checkpointed at step", step, flush=True)
        sys.exit(75)
    if step == 10 and not os.path.exists(ckpt):  # the first attempt waits for the signal here
        time.sleep(0.05)
        continue
    step += 1
out = os.path.join(os.environ["PHI4_OUTPUT_DIR"], "out")
os.makedirs(out)
with open(os.path.join(out, "resumed_from.txt"), "w") as f:
    f.write(open(ckpt).read() if os.path.exists(ckpt) else "nothing")
'''


def test_preempted_stage_checkpoints_is_requeued_and_resumes(slurm, tmp_path: Path) -> None:
    (tmp_path / "stage.py").write_text(PREEMPTIBLE)
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"name: p\nkind: command\ncmd: [{json.dumps(sys.executable)}, "
                      f"{json.dumps(str(tmp_path / 'stage.py'))}]\noutputs: [out]\n"
                      "resources: {gpus_per_node: 0}\n")
    store = tmp_path / "store"
    _run(recipe, store)
    job = recorded(store, "p")["job_id"]
    stage_dir = Path(recorded(store, "p")["script"]).parent
    deadline = time.monotonic() + 30
    while not (stage_dir / "ready").exists():
        assert time.monotonic() < deadline, (stage_dir / "logs" / "stdout.log").read_text()
        time.sleep(0.1)
    # What slurmctld sends signal_lead_s before the time limit (--signal=B:USR1@60).
    t0 = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    rows = wait_status(store, lambda r: r["p"]["state"] == "succeeded", "p succeeded",
                       timeout=90)
    took = time.monotonic() - t0
    info = job_ended(job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), info
    assert rows["p"]["attempt"] == 2 and rows["p"]["job"] == job
    assert (stage_dir / "artifacts" / "out" / "resumed_from.txt").read_text() == "10"
    log = (stage_dir / "logs" / "stdout.log").read_text()
    assert "checkpointed at step 10" in log and "starting at step 10" in log
    assert "requeued as job" in log and log.count("=== phi4 attempt") == 2, log
    print(f"USR1 to resumed and published: {took:.1f} s")


def test_hostile_values_are_quoted_or_refused(slurm, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = [f"$(touch {marker})", f"`touch {marker}`", f"'; touch {marker}; '",
               f'"; touch {marker}; "', f"a\nb; touch {marker}"]
    (tmp_path / "echo.py").write_text(
        "import json, os, sys\n"
        "out = os.path.join(os.environ['PHI4_OUTPUT_DIR'], 'out')\n"
        "os.makedirs(out)\n"
        "json.dump({'argv': sys.argv[1:], 'X': os.environ['X'], 'Z': os.environ['Z']},\n"
        "          open(os.path.join(out, 'seen.json'), 'w'))\n")
    recipe = tmp_path / "h.yaml"
    recipe.write_text(f"name: h\nkind: command\noutputs: [out]\n"
                      "resources: {gpus_per_node: 0}\n"
                      f"cmd: {json.dumps([sys.executable, str(tmp_path / 'echo.py'), *hostile])}\n"
                      f"env: {{X: {json.dumps(hostile[0] + hostile[4])}}}\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(LOCAL_CLUSTER.read_text().replace(
        'OMP_NUM_THREADS: "1"', f'OMP_NUM_THREADS: "1"\n  Z: {json.dumps(hostile[2])}'))
    store = tmp_path / "store"
    out = phi4("run", str(recipe), "--store", str(store), "--executor", "slurm",
               "--cluster", str(cluster), "--wait", "--poll", "0.2", check=0)
    assert "1 succeeded" in out.stderr
    seen = json.loads(next(store.glob("stages/h/*/artifacts/out/seen.json")).read_text())
    assert seen == {"argv": hostile, "X": hostile[0] + hostile[4], "Z": hostile[2]}

    # Refused before anything is submitted, each at its file:line.
    bad_cluster = tmp_path / "bad_cluster.yaml"
    bad_cluster.write_text(f"name: bad\naccount: '`touch {marker}`'\n"
                           f"time_limit: '1:00:00; touch {marker}'\n")
    out = phi4("run", str(recipe), "--store", str(store), "--force", "--executor", "slurm",
               "--cluster", str(bad_cluster), check=2)
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        f"{bad_cluster}:2: account: must be a Slurm name: letters, digits and _ . + - ")
    assert lines[1].startswith(f"{bad_cluster}:3: time_limit: time must look like HH:MM:SS")
    newline_name = tmp_path / "n.yaml"
    newline_name.write_text(recipe.read_text().replace("name: h", 'name: "h\\n$(touch x)"'))
    out = phi4("run", str(newline_name), "--store", str(store), *SLURM, check=2)
    assert out.stderr.startswith(f"{newline_name}:1: name: a stage name must be an identifier")
    quoted_store = tmp_path / 'st"ore'
    out = phi4("run", str(recipe), "--store", str(quoted_store), *SLURM, check=2)
    assert "cannot be used with Slurm" in out.stderr
    assert not marker.exists()


def test_forced_and_republished_reruns_really_run(slurm, tmp_path: Path) -> None:
    """The job's begin hook skipped any stage whose artifact verified, so `--force` and a
    rerun for an input republished with other files ended at once, and the next plan said
    `run` again."""
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    slurm.append(tmp_path)
    _run(pipeline, store, "--wait", "--poll", "0.2")
    _run(pipeline, store, "--force", "b", "--wait", "--poll", "0.2")
    assert counts(tmp_path) == {"a": 1, "b": 2}
    assert not (tmp_path / "resumed_b").exists()  # started over
    (tmp_path / "extra_a").write_text("v2")  # a's files change, its fingerprint does not
    _run(pipeline, store, "--force", "a", "--wait", "--poll", "0.2")
    assert counts(tmp_path) == {"a": 2, "b": 3}
    data = next((store / "stages" / "b").glob("*/artifacts/out/data.txt")).read_text()
    assert data == "b:[a:v2]"
    plan = json.loads(phi4("plan", str(pipeline), "--store", str(store), "--format", "json",
                           check=0).stdout)
    assert {s["verdict"] for s in plan["stages"]} == {"up to date"}
