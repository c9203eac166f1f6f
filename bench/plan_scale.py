"""Planning and `phi4 status` at scale: a generated 1,000-stage pipeline against a 10-stage
one, and a store of 10,000 attempts against one of 100. Growth should be near linear, so the
per-stage (per-attempt) ratios should stay near 1.

    PYTHONPATH=. python bench/plan_scale.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator import launch  # noqa: E402
from orchestrator.config import load_pipeline  # noqa: E402
from orchestrator.graph import build_graph  # noqa: E402
from orchestrator.plan import RUN, UP_TO_DATE, make_plan  # noqa: E402
from orchestrator.records import State  # noqa: E402
from orchestrator.status import collect  # noqa: E402
from orchestrator.store import Store, write_json  # noqa: E402


def generate(root: Path, n: int) -> Path:
    """Stage i reads stage i-1 and stage i//2: long chains and wide fan-out both."""
    (root / "recipes").mkdir(parents=True)
    for i in range(n):
        ups = sorted({j for j in (i - 1, i // 2) if 0 <= j < i})
        lines = [f"name: s{i}", "kind: command", f"cmd: [echo, s{i}]", "outputs: [out]",
                 f"env: {{STEP: '{i}'}}"]
        if ups:
            lines.append("inputs:")
            lines += [f"  in{j}: {{stage: s{j}, artifact: out}}" for j in ups]
        (root / "recipes" / f"s{i}.yaml").write_text("\n".join(lines) + "\n")
    pipeline = root / "pipeline.yaml"
    pipeline.write_text("name: bench\nstages:\n" +
                        "".join(f"  - recipes/s{i}.yaml\n" for i in range(n)))
    return pipeline


def publish_all(plan) -> None:
    """Fill the store as if every stage had run, so the next plan verifies every artifact."""
    for sp in plan.stages.values():
        folder = sp.stage_dir
        folder.prepare(launch.spec_document(sp.loaded, folder, sp.inputs), sp.fields)
        folder.begin("bench", command=sp.command, reasons=sp.reasons,
                     inputs=sp.lineage_records())
        (folder.staging / "out").mkdir()
        (folder.staging / "out" / "data.txt").write_text(sp.name)
        folder.publish(["out"])
        folder.end(State.SUCCEEDED, exit_code=0)


def cli_seconds(*args: str) -> float:
    """Wall time of one `phi4 ...` in a fresh interpreter, start-up included."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed(fn, *args, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_plan(tmp: Path) -> None:
    rows = {}
    for n in (10, 1000):
        pipeline = generate(tmp / f"p{n}", n)
        store = Store(tmp / f"store{n}")
        repeat = 10 if n < 100 else 3  # best of several: small runs are the noisy ones
        load_s, loaded = timed(load_pipeline, pipeline, repeat=repeat)
        graph = build_graph(loaded.stages)
        empty_s, plan = timed(make_plan, graph, store, repeat=repeat)
        assert plan.count(RUN) == n
        publish_all(plan)
        full_s, again = timed(make_plan, graph, store, repeat=repeat)
        assert again.count(UP_TO_DATE) == n
        rows[n] = (load_s, empty_s, full_s, cli_seconds("plan", str(pipeline), "--store",
                                                         str(store.root)))
    print(f"{'stages':>7} {'load':>9} {'plan(empty store)':>18} {'plan(all up to date)':>21} "
          f"{'CLI phi4 plan':>14}")
    for n, (load_s, empty_s, full_s, cli_s) in rows.items():
        print(f"{n:>7} {load_s:>8.3f}s {empty_s:>17.3f}s {full_s:>20.3f}s {cli_s:>13.3f}s")
    for label, k in (("load", 0), ("plan, empty store", 1), ("plan, all up to date", 2)):
        per_small, per_big = rows[10][k] / 10, rows[1000][k] / 1000
        print(f"per-stage time 1000 vs 10 stages, {label}: {per_big * 1e3:.2f} ms vs "
              f"{per_small * 1e3:.2f} ms, ratio {per_big / per_small:.2f}")


def fake_store(root: Path, stages: int, per_stage: int) -> Store:
    store = Store(root)
    now = time.time()
    for s in range(stages):
        for a in range(per_stage):
            fp = f"{s:08x}{a:08x}"
            folder = root / "stages" / f"stage{s}" / fp
            (folder / "artifacts" / "model").mkdir(parents=True)
            write_json(folder / "status.json", {
                "stage": f"stage{s}", "fingerprint": fp, "state": State.SUCCEEDED, "attempt": 1,
                "started": now - 100 + a, "ended": now - 50 + a, "exit_code": 0})
            (folder / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": i, "loss": 5.0 / (i + 1)}) + "\n"
                        for i in range(20)))
        store.set_latest(f"stage{s}", fp)
    return store


def bench_status(tmp: Path) -> None:
    rows = {}
    for stages, per_stage in ((10, 10), (100, 100)):
        attempts = stages * per_stage
        store = fake_store(tmp / f"status{attempts}", stages, per_stage)
        all_s, found = timed(collect, store, True)
        assert len(found) == attempts
        latest_s, _ = timed(collect, store)
        cli_s = cli_seconds("status", "--all", "--store", str(store.root))
        rows[attempts] = (all_s, latest_s, cli_s, stages)
    print(f"{'attempts':>9} {'status --all':>13} {'status (latest)':>16} {'CLI status --all':>17}")
    for attempts, (all_s, latest_s, cli_s, _) in rows.items():
        print(f"{attempts:>9} {all_s:>12.3f}s {latest_s:>15.3f}s {cli_s:>16.3f}s")
    (small_all, small_latest, _, small_stages), (big_all, big_latest, _, big_stages) = \
        rows[100], rows[10000]
    print(f"per-attempt time 10,000 vs 100 attempts (--all): {big_all / 10000 * 1e6:.0f} us vs "
          f"{small_all / 100 * 1e6:.0f} us, ratio {(big_all / 10000) / (small_all / 100):.2f}")
    print(f"per-stage time {big_stages} vs {small_stages} stages (latest only): "
          f"ratio {(big_latest / big_stages) / (small_latest / small_stages):.2f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bench_plan(Path(tmp))
        print(f"(plan bench took {time.perf_counter() - start:.1f}s)\n")
        start = time.perf_counter()
        bench_status(Path(tmp))
        print(f"(status bench took {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
