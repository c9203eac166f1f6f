"""`phi4 diff`, `phi4 metrics`, `phi4 gc` and the W&B / MLflow trackers on a store with several
attempts of a tiny stage: text_pretrain trained 4 steps at two learning rates (A, B), then B
forced once more (a second attempt in the same folder). B logs to W&B (offline) and MLflow (a
local file store)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tracker_files
from test_cli_light import PROBE

REPO = Path(__file__).resolve().parents[1]
# `make test` installs the trackers extra; elsewhere their tests skip, saying so (in CI they run).
USE_TRACKERS = os.environ.get("CI") == "true" or all(
    importlib.util.find_spec(m) is not None for m in ("wandb", "mlflow"))
needs_trackers = pytest.mark.skipif(
    not USE_TRACKERS,
    reason="wandb / mlflow not installed: pip install 'phi4[trackers]' (make test does)")
STEPS = ["--set", "train.steps=4", "--set", "train.warmup_steps=1"]
LR_B = ["--set", "train.lr=1.0e-3"]


def phi4(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(root / "cache"),
           "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wd")}
    store = root / "store"
    mlruns = root / "mlruns"
    trackers = ["--set", "logging.wandb.mode=offline", "--set", "logging.wandb.project=tests",
                "--set", f"logging.mlflow.tracking_uri=file:{mlruns}"] \
        if USE_TRACKERS else []
    base = ["run", "recipes/text_pretrain.yaml", "--profile", "tiny", "--store", str(store),
            *STEPS]
    for extra in ([], [*LR_B, *trackers], [*LR_B, *trackers, "--force"]):
        done = phi4(*base, *extra, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    return {"store": store, "env": env, "mlruns": mlruns, "rerun_b": [*base, *LR_B, *trackers]}


def cli(trained: dict, *args: str, store: Path | None = None):
    """The command in this process (they are torch-free): .returncode, .stdout, .stderr."""
    from click.testing import CliRunner

    from orchestrator.cli import cli as phi4_cli

    result = CliRunner().invoke(phi4_cli, [*args, "--store", str(store or trained["store"])],
                                catch_exceptions=False)
    result.returncode = result.exit_code
    return result


def folders(store: Path) -> dict[str, Path]:
    """The stage folder trained with each learning rate."""
    out = {}
    for folder in (store / "stages" / "text_pretrain").glob("*/spec.json"):
        out[json.loads(folder.read_text())["train"]["lr"]] = folder.parent
    return out


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_diff_names_exactly_the_changed_fields_and_the_results(trained: dict) -> None:
    by_lr = folders(trained["store"])
    a, b = by_lr[3.0e-3], by_lr[1.0e-3]
    done = cli(trained, "diff", "text_pretrain@1", "text_pretrain", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["a"]["fingerprint"], report["b"]["fingerprint"]) == (a.name, b.name)
    assert report["b"]["attempt"] == 2
    changed = {c["key"]: (c["a"], c["b"]) for c in report["changes"] if c["group"] != "setting"}
    assert changed == {"train.lr": (3.0e-3, 1.0e-3)}
    settings = {c["key"] for c in report["changes"] if c["group"] == "setting"}
    assert settings == ({"logging.wandb.mode", "logging.wandb.project", "logging.wandb.entity",
                         "logging.mlflow.tracking_uri", "logging.mlflow.experiment"}
                        if USE_TRACKERS else set())
    results = report["results"]
    assert results["a"]["final_loss"] == losses(a / "metrics.jsonl")[-1]
    assert results["b"]["best_loss"] == min(losses(b / "metrics.jsonl"))
    assert results["a"]["steps"] == results["b"]["steps"] == 4
    assert results["b"]["state"] == "succeeded" and results["b"]["duration_s"] > 0

    (lr,) = [c for c in report["changes"] if c["key"] == "train.lr"]
    assert re.fullmatch(r"recipes/profiles/tiny\.yaml:\d+", lr["source_a"]), lr
    assert lr["source_b"] == "--set train.lr=1.0e-3"

    text = cli(trained, "diff", a.name[:8], "text_pretrain").stdout
    assert "train.lr: 0.003 -> 0.001   (A: recipes/profiles/tiny.yaml:" in text
    assert "B: --set train.lr=1.0e-3)" in text and "final loss" in text


@pytest.mark.slow
def test_attempt_references_and_a_same_fingerprint_diff(trained: dict) -> None:
    b = folders(trained["store"])[1.0e-3]
    done = cli(trained, "diff", "text_pretrain@2", f"{b.name}@2", "--format", "json")
    report = json.loads(done.stdout)
    assert report["same_fingerprint"] and report["changes"] == []
    assert (report["a"]["attempt"], report["b"]["attempt"]) == (1, 2)
    # The first attempt's curve was kept aside when the forced one started over.
    first = losses(b / "metrics.attempt1.jsonl")
    assert report["results"]["a"]["final_loss"] == first[-1]
    for bad, said in (("text_pretrain@9", "has 3 attempt(s)"), ("nosuch", "no stage or "),
                      ("text_pretrain@0", "counted from 1"), ("text_pretrain@x", "after @")):
        refused = cli(trained, "diff", bad, "text_pretrain")
        assert refused.returncode == 2 and said in refused.stderr, (bad, refused.stderr)
        assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_metrics_table_formats_and_terminal_curves(trained: dict) -> None:
    rows = json.loads(cli(trained, "metrics", "--format", "json").stdout)["attempts"]
    assert [(r["attempt"], r["final_loss"] is not None) for r in rows].count((1, True)) == 2
    assert len(rows) == 3
    table = list(csv.DictReader(io.StringIO(cli(trained, "metrics", "text_pretrain",
                                                "--format", "csv").stdout)))
    assert sorted(float(r["final_loss"]) for r in table) == sorted(r["final_loss"] for r in rows)
    latest = json.loads(cli(trained, "metrics", "--latest", "--format", "json").stdout)
    assert [r["attempt"] for r in latest["attempts"]] == [2]
    text = cli(trained, "metrics").stdout
    assert text.count("text_pretrain@") == 3 and "loss:" in text
    # Like status, these read the store without torch, numpy or matplotlib.
    for args in (["metrics"], ["diff", "text_pretrain@1", "text_pretrain"]):
        probe = subprocess.run([sys.executable, "-c", PROBE,
                                json.dumps([*args, "--store", str(trained["store"])])],
                               cwd=REPO, capture_output=True, text=True, check=True)
        report = json.loads(probe.stdout.strip().splitlines()[-1])
        assert report["code"] == 0 and report["heavy"] == [], report


@pytest.mark.slow
def test_plot_draws_the_curves_of_the_metrics_files(trained: dict, tmp_path: Path) -> None:
    from orchestrator.curves import CURVES, figure
    from orchestrator.runs import stage_attempts
    from orchestrator.store import Store

    attempts = stage_attempts(Store(trained["store"]), "text_pretrain")
    fig = figure(attempts)
    panels = {ax.get_title(): ax for ax in fig.axes}
    labels = {a.label for a in attempts}
    for key, title, _ in CURVES:
        lines = {line.get_label().split(" ")[0]: line for line in panels[title].get_lines()}
        assert set(lines) == set(labels)
        for attempt in attempts:
            records = [json.loads(x) for x in attempt.metrics_file.read_text().splitlines()]
            line = lines[attempt.label]
            lr = json.loads((attempt.folder.spec_file).read_text())["train"]["lr"]
            assert line.get_label() == f"{attempt.label} train.lr={lr}"
            assert list(line.get_xdata()) == [r["step"] for r in records]
            assert list(line.get_ydata()) == [r[key] for r in records]
    out = tmp_path / "curves.svg"
    done = cli(trained, "metrics", "text_pretrain", "--plot", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text().count("<path") > 12  # 4 panels of 3 curves, axes and ticks
    refused = cli(trained, "metrics", "--plot", str(tmp_path / "curves.gif"))
    assert refused.returncode == 2 and ".png, .svg or .pdf" in refused.stderr


@pytest.mark.slow
@needs_trackers
def test_trackers_hold_every_step_under_the_lineage_name(trained: dict) -> None:
    b = folders(trained["store"])[1.0e-3]
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    ids = json.loads((b / "trackers.json").read_text())
    name = f"phi4.text_pretrain.{b.name}"
    runs = tracker_files.wandb_runs(b / "wandb", ids["wandb"])
    assert runs and all(r["name"] == name for r in runs)
    assert f"fingerprint={b.name}" in runs[-1]["tags"]
    assert [h["_step"] for h in runs[-1]["history"]] == steps
    assert [h["loss"] for h in runs[-1]["history"]] == losses(b / "metrics.jsonl")
    run = tracker_files.mlflow_run(trained["mlruns"], ids["mlflow"])
    assert run["name"] == name and run["tags"]["stage"] == "text_pretrain"
    assert [s for s, _ in run["metrics"]["loss"]] == steps
    assert [v for _, v in run["metrics"]["loss"]] == losses(b / "metrics.jsonl")
    # The forced attempt started over: a new tracker run, not the first attempt's.
    assert len(tracker_files.mlflow_runs(trained["mlruns"])) == 2


@pytest.mark.slow
def test_gc_frees_the_rest_and_a_rerun_has_nothing_to_do(trained: dict, tmp_path: Path) -> None:
    from orchestrator.gc import size_text

    store = tmp_path / "store"
    shutil.copytree(trained["store"], store, symlinks=True)
    env = trained["env"]
    by_lr = folders(store)
    a, b = by_lr[3.0e-3], by_lr[1.0e-3]
    look = cli(trained, "gc", "--dry-run", store=store)
    assert look.returncode == 0, look.stderr
    assert f"would remove  text_pretrain {a.name}: stage folder" in look.stdout
    assert f"would remove  text_pretrain {b.name}: checkpoints" in look.stdout
    assert a.is_dir() and any((b / "checkpoints").iterdir())
    expected = size_text(sum(f.stat().st_size for root in (a, b / "checkpoints")
                             for f in root.rglob("*") if f.is_file() and not f.is_symlink()))
    done = cli(trained, "gc", store=store)
    assert done.returncode == 0, done.stderr
    assert not a.exists() and not (b / "checkpoints").exists()
    assert done.stdout.splitlines()[-1] == f"freed {expected}; kept 1 stage folder(s)"
    assert look.stdout.splitlines()[-1] == f"would free {expected}; kept 1 stage folder(s)"
    assert (b / "metrics.attempt1.jsonl").is_file()  # the kept folder's history stays
    rerun = phi4(*[x if x != str(trained["store"]) else str(store)
                   for x in trained["rerun_b"]], env=env)
    assert rerun.returncode == 0 and "nothing to run" in rerun.stdout, rerun.stdout


def _attempt(store, name: str, fp: str, inputs: dict, started: float, state: str = "succeeded",
             checkpoint: bool = True):
    """A stage folder with a published artifact, as a run leaves it (no training)."""
    from orchestrator.records import InputRecord, State

    folder = store.stage_dir(name, fp)
    folder.prepare({"outputs": ["model"]}, {"train.lr": started})
    records = {k: InputRecord(source="stage", path="-", stage=s, fingerprint=f, artifact="model")
               for k, (s, f) in inputs.items()}
    folder.begin("local", command=[], reasons=[], inputs=records)
    (folder.staging / "model").mkdir(parents=True)
    (folder.staging / "model" / "weights.bin").write_bytes(b"w" * 1000)
    if checkpoint:
        (folder.checkpoints / "step_4").mkdir(parents=True)
        (folder.checkpoints / "step_4" / "model.pt").write_bytes(b"c" * 500)
    if state == "succeeded":
        assert folder.publish(["model"]) is None
        folder.end(State.SUCCEEDED, ended=started + 1)
    elif state == "failed":
        folder.end(State.FAILED, exit_code=1, ended=started + 1)
    status = folder.status()
    folder._write(status, started=started)  # the order the attempts began in
    return folder


def test_gc_keeps_what_kept_stages_were_made_from_and_running_stages(tmp_path: Path) -> None:
    """up: u1 (old), u2 (latest); down: d1 (latest) made from u1, so u1 stays; other: o1 runs
    now (its lock held) and o2 is latest; o0 is old and nothing refers to it: it goes."""
    from orchestrator.gc import collect, plan_gc
    from orchestrator.store import Store

    store = Store(tmp_path / "store")
    fp = {k: f"{i:016x}" for i, k in enumerate(["u1", "u2", "d1", "o0", "o1", "o2", "f1"])}
    u1 = _attempt(store, "up", fp["u1"], {}, 1.0)
    u2 = _attempt(store, "up", fp["u2"], {}, 2.0)
    d1 = _attempt(store, "down", fp["d1"], {"backbone": ("up", fp["u1"])}, 3.0)
    o0 = _attempt(store, "other", fp["o0"], {}, 1.0)
    o1 = _attempt(store, "other", fp["o1"], {}, 2.0, state="running")
    o2 = _attempt(store, "other", fp["o2"], {}, 3.0)
    f1 = _attempt(store, "failing", fp["f1"], {}, 1.0, state="failed")
    lock = o1.lock()
    assert lock.try_acquire()
    try:
        planned = plan_gc(store)
        removals = {(r.folder.fingerprint, r.what) for r in planned.removals}
        assert removals == {(fp["o0"], "folder"), (fp["u1"], "checkpoints"),
                            (fp["u2"], "checkpoints"), (fp["d1"], "checkpoints"),
                            (fp["o2"], "checkpoints")}
        assert planned.kept[("up", fp["u1"])] == "an input of down"
        assert planned.kept[("other", fp["o1"])] == "running or queued"
        assert all(done for _, done in collect(store, planned))
    finally:
        lock.release()
    assert not o0.path.exists() and o1.path.is_dir() and (o1.checkpoints / "step_4").is_dir()
    assert (f1.checkpoints / "step_4").is_dir()  # a failed stage resumes from them
    for folder in (u1, u2, d1, o2):
        assert folder.artifact_problem(["model"]) is None and not folder.checkpoints.exists()
    # Once nobody holds its lock, o1 is an interrupted attempt nothing refers to; --keep-last 2
    # keeps it (one of other's two most recent). A stage that starts meanwhile is never removed.
    assert {r.folder.fingerprint for r in plan_gc(store).removals} == {fp["o1"]}
    assert plan_gc(store, keep_last=2).removals == []
    assert lock.try_acquire()
    try:
        assert not o1.remove() and o1.path.is_dir()
    finally:
        lock.release()


@pytest.mark.slow
@needs_trackers
def test_a_resumed_attempt_appends_to_the_same_tracker_runs(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The writer as the trainer drives it: steps 0-2, stopped; resumed from a checkpoint,
    steps 3-5 go to the same W&B and MLflow runs; a start from step 0 opens new ones."""
    from phi4core.config import Logging, TrackerRun
    from phi4core.train.metrics import MetricsWriter

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_SILENT", "true")
    stage = tmp_path / "stage"
    mlruns = tmp_path / "mlruns"
    logging = Logging.model_validate({"tensorboard": False, "wandb": {"mode": "offline"},
                                      "mlflow": {"tracking_uri": f"file:{mlruns}"}})
    run = TrackerRun(name="p.s.0123456789abcdef", tags={"stage": "s"})
    for steps, resumed, ok in ((range(0, 3), False, False), (range(3, 6), True, True)):
        if resumed:
            # W&B names an offline attempt's folder by the second it started: a resume within
            # the same second (never, outside a test) would write over the first attempt's file
            time.sleep(1.1)
        writer = MetricsWriter(stage, 6, logging, True, run, resumed=resumed)
        for step in steps:
            writer.log(step, {"loss": 6.0 - step, "lr": 0.1, "skipped": False, "x": None})
        writer.close(ok=ok)
    ids = json.loads((stage / "trackers.json").read_text())
    runs = tracker_files.wandb_runs(stage / "wandb", ids["wandb"])
    assert [[h["_step"] for h in r["history"]] for r in runs] == [[0, 1, 2], [3, 4, 5]]
    assert [h["loss"] for r in runs for h in r["history"]] == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    logged = tracker_files.mlflow_run(mlruns, ids["mlflow"])
    assert logged["metrics"]["loss"] == [(s, 6.0 - s) for s in range(6)]
    assert set(logged["metrics"]) == {"loss", "lr"} and logged["status"] == "FINISHED"
    writer = MetricsWriter(stage, 6, logging, True, run, resumed=False)
    writer.close()
    assert json.loads((stage / "trackers.json").read_text()).keys() == ids.keys()
    assert json.loads((stage / "trackers.json").read_text()) != ids
    assert len(tracker_files.mlflow_runs(mlruns)) == 2


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from phi4core.config import Logging, TrackerRun
    from phi4core.train.trackers import TrackerMissing, open_trackers

    run = TrackerRun(name="p.s.f")
    for module, section in (("wandb", {"wandb": {}}), ("mlflow.tracking", {"mlflow": {}})):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as when absent
        with pytest.raises(TrackerMissing, match=r"pip install 'phi4\[trackers\]'"):
            open_trackers(tmp_path, Logging.model_validate(section), run, resumed=False)


def test_field_changes_carry_each_sides_source() -> None:
    from orchestrator.compare import MISSING, field_changes

    a = {"train.lr": 0.003, "train.steps": 40, "inputs.backbone.fingerprint": "aa",
         "logging.interval": 5, "data.sources[0].weight": 1.0}
    b = {"train.lr": 0.001, "train.steps": 40, "inputs.backbone.fingerprint": "bb",
         "logging.interval": 5, "data.sources[0].weight": 0.5, "train.min_lr": 1e-5}
    sources_a = {"train": "base.yaml:3", "data.sources[0]": "a.yaml:9"}
    sources_b = {"train.lr": "--set train.lr=0.001", "data.sources": "b.yaml:2"}
    changes = {c.key: c for c in field_changes(a, b, sources_a, sources_b)}
    assert list(changes) == ["train.lr", "train.min_lr", "inputs.backbone.fingerprint",
                             "data.sources[0].weight"]
    assert (changes["train.lr"].source_a, changes["train.lr"].source_b) == \
        ("base.yaml:3", "--set train.lr=0.001")
    assert changes["train.min_lr"].a is MISSING and changes["train.min_lr"].source_b == "default"
    assert (changes["data.sources[0].weight"].source_a,
            changes["data.sources[0].weight"].source_b) == ("a.yaml:9", "b.yaml:2")
    assert [c.group for c in changes.values()] == ["field", "field", "input", "data"]
    assert field_changes(a, a) == []


def test_cluster_tracker_settings_under_the_recipes_and_the_run_name(tmp_path: Path) -> None:
    from orchestrator.config import load_any
    from orchestrator.config.cluster import load_cluster
    from orchestrator.launch import spec
    from orchestrator.store import Store

    cluster = tmp_path / "c.yaml"
    cluster.write_text("name: c\npartition: gpu\nlogging:\n  wandb: {entity: team, project: "
                       "shared}\n  mlflow: {tracking_uri: 'https://mlflow.example'}\n")
    loaded = load_any(str(REPO / "recipes/text_pretrain.yaml"), "tiny",
                      ["logging.wandb.project=mine", "logging.wandb.mode=offline"])
    folder = Store(tmp_path / "store").stage_dir("text_pretrain", "0123456789abcdef")
    built = spec(loaded, folder, {}, load_cluster(cluster).cluster, "phi4_mini")
    assert built.logging.wandb.model_dump() == {"project": "mine", "entity": "team",
                                                "mode": "offline"}
    assert built.logging.mlflow.tracking_uri == "https://mlflow.example"
    assert built.run.name == "phi4_mini.text_pretrain.0123456789abcdef"
    assert built.run.tags == {"pipeline": "phi4_mini", "stage": "text_pretrain",
                              "fingerprint": "0123456789abcdef"}
    alone = spec(loaded, folder, {}, None, "phi4_mini")
    assert alone.logging.mlflow is None and alone.logging.wandb.entity is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: c\nlogging:\n  wandb: {projct: x}\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "bad.yaml:3" in done.stderr and "projct" in done.stderr


def test_each_attempt_of_a_folder_keeps_its_own_metrics_and_evaluations(tmp_path: Path) -> None:
    """A finished attempt rerun (forced): begin() keeps its metrics and evaluation aside as
    metrics.attempt1.jsonl / evaluation.attempt1.json; both attempts are read, each its own."""
    from orchestrator.compare import result_rows
    from orchestrator.records import EvaluationRecord, EvaluationResult, State
    from orchestrator.runs import attempts_of, resolve, summarize
    from orchestrator.store import Store, write_json

    store = Store(tmp_path / "store")
    folder = _attempt(store, "s", "00000000000000aa", {}, 10.0, checkpoint=False)
    for attempt, (losses_, accuracy) in enumerate((([3.0, None, 2.0], 0.5),
                                                   ([3.0, 1.5, 1.75], 0.75)), start=1):
        if attempt == 2:
            folder.begin("local", command=[], reasons=["forced"], inputs={})
            folder.end(State.SUCCEEDED)
        lines = [json.dumps({"step": i, "time": 5.0 + i, "loss": v, "tokens_per_s": 100.0 * i,
                             "peak_mem_mb": 10.0 + i}) for i, v in enumerate(losses_)]
        folder.metrics.write_text("\n".join(lines) + "\n")
        record = EvaluationRecord(stage="s", fingerprint=folder.fingerprint, results=[
            EvaluationResult(name="accuracy", value=accuracy, chance=0.25, samples=40)])
        write_json(folder.evaluation_file, record.model_dump(mode="json"))
    first, latest = attempts_of(folder)
    assert (first.number, first.current, latest.number, latest.current) == (1, False, 2, True)
    one, two = summarize(first), summarize(latest)
    assert (one.final_loss, one.best_loss, one.steps) == (2.0, 2.0, 3)
    assert (two.final_loss, two.best_loss, two.state) == (1.75, 1.5, "succeeded")
    assert (one.tokens_per_s, two.peak_mem_mb) == (150.0, 12.0)  # median after step 0; max
    assert (one.evaluations, two.evaluations) == ({"accuracy": 0.5}, {"accuracy": 0.75})
    assert ("eval accuracy", 0.5, 0.75) in result_rows(one, two)
    assert resolve(store, f"{folder.fingerprint}@-1") == latest
    assert resolve(store, "s@1") == first and resolve(store, "s") == latest
