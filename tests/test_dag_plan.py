"""`phi4 plan` on the shipped pipelines, and the planner's light start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dag_helpers import REPO, make_pipeline, phi4, plan_json


def test_multimodal_tiny_plan_lists_nine_commands_and_runs_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = phi4("plan", str(REPO / "pipelines/phi4_multimodal.yaml"), "--profile", "tiny",
               "--format", "json", store=store, check=0)
    plan = json.loads(out.stdout)
    stages = plan["stages"]
    assert len(stages) == 9 and plan["summary"]["run"] == 9
    assert stages[0]["name"] == "text_pretrain" and stages[-1]["name"] == "vision_speech_joint"
    for stage in stages:
        assert stage["verdict"] == "run" and stage["reasons"]
        assert stage["command"][1:4] == ["-m", "phi4core", "train"]
        assert stage["command"][-1] == f"{stage['stage_dir']}/spec.json"
    joint = stages[-1]
    assert joint["inputs"]["speech"]["frozen"] is True
    assert joint["inputs"]["vision"]["path"].endswith("/artifacts/vision")
    assert not store.exists()  # planning writes nothing
    text = phi4("plan", str(REPO / "pipelines/phi4_multimodal.yaml"), "--profile", "tiny",
                store=store, check=0).stdout
    assert text.count(" -m phi4core train ") == 9 and "9 run, 0 up to date, 0 blocked" in text


def test_full_size_stages_launch_under_torchrun(tmp_path: Path) -> None:
    plan = plan_json(REPO / "recipes/text_pretrain.yaml", tmp_path / "store",
                     "--set", "data.sources=[{kind: synthetic, modality: text}]",
                     "--set", "tokenizer=demo")
    command = plan["text_pretrain"]["command"]
    assert command[1:5] == ["-m", "phi4core.elastic", "--standalone", "--nproc-per-node=512"]


def test_missing_local_inputs_block_the_plan_and_refuse_the_run(tmp_path: Path) -> None:
    """Without --profile tiny the recipes name data and a SigLIP folder that are not here."""
    env = {"PHI4_DATA": str(tmp_path / "nodata"), "PHI4_SIGLIP": str(tmp_path / "nosig")}
    pipeline = REPO / "pipelines/phi4_multimodal_from_mini.yaml"
    plan = plan_json(pipeline, tmp_path / "store", extra_env=env)
    run = phi4("run", str(pipeline), store=tmp_path / "store", extra_env=env)
    align = plan["vision_projector_align"]
    assert align["verdict"] == "blocked" and align["fingerprint"] is None
    assert f"no file or folder at {tmp_path}/nosig" in align["reasons"]
    assert f"no data at {tmp_path}/nodata/captions" in align["reasons"]
    assert plan["vision_sft"]["reasons"][0] == "upstream vision_joint_pretrain is blocked"
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "recipes/vision_projector_align.yaml:" in run.stderr


def test_data_files_are_fingerprinted_by_content(tmp_path: Path) -> None:
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "hello"}\n')
    recipe = REPO / "recipes/text_pretrain.yaml"
    args = ("--profile", "tiny", "--set",
            f"data.sources=[{{kind: text_jsonl, path: {data}}}]")
    first = plan_json(recipe, tmp_path / "store", *args)["text_pretrain"]["fingerprint"]
    moved = tmp_path / "elsewhere.jsonl"
    data.rename(moved)
    args_moved = (*args[:-1], f"data.sources=[{{kind: text_jsonl, path: {moved}}}]")
    assert plan_json(recipe, tmp_path / "store", *args_moved)["text_pretrain"][
        "fingerprint"] == first  # where data lies is not what it is
    moved.write_text('{"text": "hellO"}\n')
    assert plan_json(recipe, tmp_path / "store", *args_moved)["text_pretrain"][
        "fingerprint"] != first


def test_knobs_that_change_no_result_keep_the_fingerprint(tmp_path: Path) -> None:
    """Loader processes and the skipped-step limit never change what a stage produces."""
    def fingerprint(*sets: str) -> str:
        args = [a for kv in sets for a in ("--set", kv)]
        return plan_json(REPO / "recipes/text_pretrain.yaml", tmp_path / "store", "--profile",
                         "tiny", *args)["text_pretrain"]["fingerprint"]

    base = fingerprint()
    assert fingerprint("data.num_workers=3", "train.max_skipped_steps=2") == base
    assert fingerprint("train.steps=41") != base


def test_plan_text_shows_verdicts_reasons_inputs_and_commands(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path)
    store = tmp_path / "store"
    phi4("run", str(pipeline), "--until", "b", store=store, check=0)
    text = phi4("plan", str(pipeline), store=store, check=0).stdout
    assert "  up to date  a " in text and "         run  c " in text
    assert "why: new" in text
    assert f"input a <- a.out: {store}/stages/a/" in text
    assert "2 run, 2 up to date, 0 blocked" in text


PROBE = """
import json, sys
from click.testing import CliRunner
from orchestrator.cli import cli
runner = CliRunner()
store = sys.argv[1]
codes = [runner.invoke(cli, args).exit_code for args in (
    ["plan", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store", store],
    ["plan", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store", store,
     "--format", "json"],
    ["graph", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store", store,
     "--format", "svg"],
    ["run", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store", store,
     "--dry-run"],
)]
import orchestrator.executors.local, orchestrator.status, orchestrator.render
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "megatron",
                                                             "transformer_engine"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_planning_never_imports_torch(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "store")], cwd=REPO,
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0], "heavy": []}


def test_train_stage_spec_is_the_trainer_contract(tmp_path: Path) -> None:
    from orchestrator.config import load_pipeline
    from orchestrator.graph import build_graph
    from orchestrator.launch import environment, spec
    from orchestrator.plan import make_plan
    from orchestrator.store import Store
    from phi4core.config import StageSpec

    loaded = load_pipeline(REPO / "pipelines/phi4_multimodal.yaml", "tiny")
    plan = make_plan(build_graph(loaded.stages), Store(tmp_path))
    sp = plan.stages["vision_speech_joint"]
    resolved = StageSpec.model_validate(spec(sp.loaded, sp.stage_dir, sp.inputs)
                                        .model_dump(mode="json"))
    assert resolved.fingerprint == sp.fingerprint and resolved.world_size == 1
    assert resolved.model.name == "phi4_multimodal_tiny"
    assert resolved.trainable == ["lora.vision", "vision.encoder", "vision.projector"]
    assert resolved.frozen == ["audio.encoder", "audio.projector", "backbone", "lora.speech"]
    assert resolved.inputs["speech"].frozen and resolved.inputs["speech"].source == "stage"
    assert resolved.output_dir == str(sp.stage_dir.staging)
    env = environment(sp.loaded, sp.stage_dir, sp.inputs)
    assert env["PHI4_INPUT_SPEECH"] == resolved.inputs["speech"].path
    assert env["PHI4_SPEC"] == str(sp.stage_dir.spec_file)


def test_plan_writes_nothing_into_the_store(tmp_path: Path) -> None:
    """The hash cache is read by plan, never written (run writes it)."""
    pipeline = make_pipeline(tmp_path, {"a": []})
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.txt").write_text("x")
    recipe = tmp_path / "recipes" / "a.yaml"
    recipe.write_text(recipe.read_text() + f"inputs:\n  d: {{path: {data}}}\n")
    time.sleep(2.2)  # older than manifest.RACY_SECONDS: its hash would be cached
    store = tmp_path / "store"
    phi4("plan", str(pipeline), store=store, check=0)
    phi4("graph", str(pipeline), store=store, check=0)
    phi4("run", str(pipeline), "--dry-run", store=store, check=0)
    assert not store.exists()
    phi4("run", str(pipeline), store=store, check=0)
    assert any((store / "cache" / "sha256").rglob("*"))
