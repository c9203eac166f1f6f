"""`phi4 run` on command-stage pipelines: order, skipping, reruns, failures, selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dag_helpers import counts, make_pipeline, phi4, plan_json, write_stage


@pytest.fixture
def diamond(tmp_path: Path) -> tuple[Path, Path]:
    return make_pipeline(tmp_path), tmp_path / "store"


def _order(root: Path) -> list[str]:
    return (root / "counter.txt").read_text().split()


def _status(store: Path) -> dict[str, dict]:
    out = phi4("status", "--format", "json", store=store, check=0)
    return {row["stage"]: row for row in json.loads(out.stdout)["stages"]}


def test_diamond_runs_in_order_then_nothing(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    phi4("run", str(pipeline), store=store, check=0)
    order = _order(root)
    assert order[0] == "a" and order[-1] == "d" and sorted(order[1:3]) == ["b", "c"]
    published = next((store / "stages" / "d").glob("*/artifacts/out/data.txt")).read_text()
    assert published == "d:[b:[a:]][c:[a:]]"
    again = phi4("run", str(pipeline), store=store, check=0)
    assert "nothing to run: 4 stages up to date" in again.stdout
    assert counts(root) == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert {s["verdict"] for s in plan_json(pipeline, store).values()} == {"up to date"}
    status = _status(store)
    assert (status["d"]["state"], status["d"]["step"], status["d"]["loss"]) == (
        "succeeded", 2, 1.25)
    assert status["d"]["artifacts"] == ["out"] and status["d"]["duration"] > 0
    stage_dir = Path(status["d"]["path"])
    assert (stage_dir / "logs" / "stdout.log").read_text().startswith("=== phi4 attempt 1 of d")
    spec = json.loads((stage_dir / "spec.json").read_text())
    assert spec["kind"] == "command" and spec["inputs"]["b"]["path"].endswith("/artifacts/out")
    fields = json.loads((stage_dir / "fields.json").read_text())
    assert fields["cmd"] == spec["cmd"] and fields["inputs.c.stage"] == "c"


def test_status_without_a_store_is_a_one_line_error(tmp_path: Path) -> None:
    out = phi4("status", store=tmp_path / "none")
    assert out.returncode == 2 and out.stderr == f"phi4: no store at {tmp_path}/none " \
        "(use --store or $PHI4_STORE)\n"


def test_changing_a_field_reruns_it_and_its_descendants(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    phi4("run", str(pipeline), store=store, check=0)
    write_stage(root, "c", ["a"], env={"SALT": "x"})
    plan = plan_json(pipeline, store)
    assert [n for n, s in plan.items() if s["verdict"] == "run"] == ["c", "d"]
    assert plan["c"]["reasons"] == ['env.SALT: (unset) -> "x"']
    assert plan["d"]["reasons"][0].startswith("input c changed (c fingerprint ")
    phi4("run", str(pipeline), store=store, check=0)
    assert counts(root) == {"a": 1, "b": 1, "c": 2, "d": 2}
    # A --set override is a change like any other, and going back finds the old result.
    plan = plan_json(pipeline, store, "--set", "b.env.SALT=y")
    assert [n for n, s in plan.items() if s["verdict"] == "run"] == ["b", "d"]


def test_corrupt_artifact_is_detected_and_rerun(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    phi4("run", str(pipeline), store=store, check=0)
    target = next((store / "stages" / "b").glob("*/artifacts/out/data.txt"))
    target.write_text(target.read_text().upper())  # same size, different bytes
    plan = plan_json(pipeline, store)
    assert plan["b"]["verdict"] == "run"
    assert plan["b"]["reasons"] == ["artifact corrupt: out/data.txt sha256 mismatch",
                                    "will start over (not from the finished attempt's "
                                    "checkpoints/)"]
    assert plan["d"]["verdict"] == "run" and "upstream b will run" in plan["d"]["reasons"][0]
    out = phi4("run", str(pipeline), store=store, check=0)
    # b comes out identical, so d (which read the same files) stays up to date.
    assert counts(root) == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert "d: up to date" in out.stdout
    assert target.read_text() == "b:[a:]"


def test_missing_artifact_reruns(diamond) -> None:
    pipeline, store = diamond
    phi4("run", str(pipeline), store=store, check=0)
    next((store / "stages" / "a").glob("*/artifacts/out/data.txt")).unlink()
    assert plan_json(pipeline, store)["a"]["reasons"] == [
        "artifact corrupt: out/data.txt missing",
        "will start over (not from the finished attempt's checkpoints/)"]


def test_failure_blocks_descendants_and_status_names_it(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    (root / "fail_b").touch()
    out = phi4("run", str(pipeline), store=store)
    assert out.returncode == 1
    assert counts(root) == {"a": 1, "b": 1}  # c never started: no --keep-going
    status = _status(store)
    assert status["b"]["state"] == "failed" and status["b"]["exit_code"] == 3
    assert status["d"]["state"] == "blocked" and status["d"]["note"] == "upstream b failed"
    assert "c" not in status
    text = phi4("status", store=store, check=0).stdout
    assert any(line.startswith("d ") and "blocked" in line and "upstream b failed" in line
               for line in text.splitlines())
    plan = plan_json(pipeline, store)
    assert plan["b"]["reasons"] == [
        "last attempt failed (exit code 3); will resume from checkpoints/"
    ]
    assert plan["d"]["reasons"] == ["was blocked: upstream b failed"]


def test_keep_going_finishes_independent_branch(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    (root / "fail_b").touch()
    out = phi4("run", str(pipeline), "--keep-going", store=store)
    assert out.returncode == 1
    assert counts(root) == {"a": 1, "b": 1, "c": 1}
    status = _status(store)
    assert (status["c"]["state"], status["d"]["state"]) == ("succeeded", "blocked")
    (root / "fail_b").unlink()
    phi4("run", str(pipeline), store=store, check=0)
    assert counts(root) == {"a": 1, "b": 2, "c": 1, "d": 1}


def test_dry_run_runs_nothing(diamond) -> None:
    pipeline, store = diamond
    out = phi4("run", str(pipeline), "--dry-run", store=store, check=0)
    assert out.stdout.count("         run  ") == 4 and "$ " in out.stdout
    assert counts(pipeline.parent) == {} and not (store / "stages").exists()


def test_until_only_from_force(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    phi4("run", str(pipeline), "--until", "b", store=store, check=0)
    assert counts(root) == {"a": 1, "b": 1}
    phi4("run", str(pipeline), "--only", "c", store=store, check=0)
    assert counts(root) == {"a": 1, "b": 1, "c": 1}
    phi4("run", str(pipeline), "--from", "c", store=store, check=0)  # d; c is up to date
    assert counts(root) == {"a": 1, "b": 1, "c": 1, "d": 1}
    phi4("run", str(pipeline), "--from", "b", "--force", store=store, check=0)
    assert counts(root) == {"a": 1, "b": 2, "c": 1, "d": 2}
    # Forcing one stage reruns it; d stays up to date as c republishes the same files.
    out = phi4("run", str(pipeline), "--force", "c", store=store, check=0)
    assert counts(root) == {"a": 1, "b": 2, "c": 2, "d": 2}
    assert "d: up to date" in out.stdout


def test_selection_cannot_skip_a_stale_upstream(diamond) -> None:
    pipeline, store = diamond
    out = phi4("run", str(pipeline), "--only", "b", store=store)
    assert out.returncode == 2
    assert "inputs.a.stage: upstream a must run first but is not selected" in out.stderr
    assert counts(pipeline.parent) == {}
    bad = phi4("run", str(pipeline), "--only", "bb", store=store)
    assert bad.returncode == 2 and "did you mean 'b'?" in bad.stderr


def test_single_recipe_takes_inputs_from_the_store(diamond) -> None:
    pipeline, store = diamond
    root = pipeline.parent
    recipe_b = root / "recipes" / "b.yaml"
    out = phi4("run", str(recipe_b), store=store)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no verified artifact 'out' of stage 'a'" in out.stderr
    assert f"phi4 run {root}/recipes/a.yaml --store {store}" in out.stderr
    phi4("run", str(recipe_b), "--with-deps", store=store, check=0)
    assert counts(root) == {"a": 1, "b": 1}
    phi4("run", str(root / "recipes" / "c.yaml"), store=store, check=0)
    assert counts(root) == {"a": 1, "b": 1, "c": 1}
    # The pipeline computes the same fingerprints: nothing left but d.
    plan = plan_json(pipeline, store)
    assert [n for n, s in plan.items() if s["verdict"] == "run"] == ["d"]


def test_stage_that_writes_no_output_fails(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    recipe = tmp_path / "recipes" / "a.yaml"
    recipe.write_text(recipe.read_text().replace("outputs: [out]", "outputs: [out, extra]"))
    out = phi4("run", str(pipeline), store=tmp_path / "store")
    assert out.returncode == 1
    status = json.loads(phi4("status", "--format", "json", store=tmp_path / "store",
                             check=0).stdout)["stages"][0]
    assert status["state"] == "failed" and "$PHI4_OUTPUT_DIR/extra/" in status["note"]
    assert status["artifacts"] == []


def test_jobs_run_independent_stages_side_by_side(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": [], "c": ["a", "b"]},
                             env={"a": {"SLEEP": "1"}, "b": {"SLEEP": "1"}})
    out = phi4("run", str(pipeline), "--jobs", "2", store=tmp_path / "store", check=0)
    rows = {r["stage"]: r for r in _status(tmp_path / "store").values()}
    a, b = rows["a"], rows["b"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"], out.stdout
