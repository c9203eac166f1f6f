"""`make demo`'s training part: the tiny phi4_mini pipeline trains both stages, then skips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def phi4(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def losses(store: Path, stage: str) -> list[float]:
    (metrics,) = (store / "stages" / stage).glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_phi4_mini_pipeline_trains_then_is_up_to_date(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(tmp_path / "cache")}
    store = tmp_path / "store"
    first = phi4("run", "pipelines/phi4_mini.yaml", "--profile", "tiny", "--store", str(store),
                 env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("text_pretrain", "text_post_train"):
        curve = losses(store, stage)
        (spec,) = (store / "stages" / stage).glob("*/spec.json")
        assert len(curve) == json.loads(spec.read_text())["train"]["steps"]
        start, end = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert end < 0.7 * start, (stage, start, end)
        (artifact,) = (store / "stages" / stage).glob("*/artifacts/model")
        assert (artifact / "phi4_model.json").is_file()
        assert (artifact.parent / "manifest.json").is_file()

    second = phi4("run", "pipelines/phi4_mini.yaml", "--profile", "tiny", "--store", str(store),
                  env=env)
    assert second.returncode == 0
    assert "nothing to run: 2 stages up to date" in second.stdout
    status = json.loads(phi4("status", "--store", str(store), "--format", "json", env=env).stdout)
    assert {row["stage"]: row["state"] for row in status["stages"]} == {
        "text_pretrain": "succeeded", "text_post_train": "succeeded"}


# What each stage's artifact holds (phi4core.module_groups), and the nine stages' outputs.
VISION = {"vision.encoder", "vision.projector", "lora.vision"}
SPEECH = {"audio.encoder", "audio.projector", "lora.speech"}
ARTIFACT_GROUPS = {"model": {"backbone"} | VISION | SPEECH, "vision": VISION, "speech": SPEECH}
MULTIMODAL_OUTPUTS = {
    "vision_projector_align": "vision", "vision_joint_pretrain": "vision",
    "vision_sft": "vision", "vision_multiframe": "vision", "speech_pretrain": "speech",
    "speech_post_train": "speech", "vision_speech_joint": "model",
}


# The held-out evaluations each stage writes (phi4core.evaluation.stage): every stage the text
# perplexity, the media stages their modality's answers.
MEDIA_EVALUATIONS = {
    "vision_projector_align": "caption", "vision_joint_pretrain": "caption",
    "vision_sft": "caption", "vision_multiframe": "caption",
    "speech_pretrain": "transcription", "speech_post_train": "transcription",
    "vision_speech_joint": "joint_caption",
}
MARGIN = 0.05  # at least this far above chance (48 held-out answers: ~0.02 of noise)


def check_evaluations(store: Path) -> None:
    """Each stage's evaluation.json: the text perplexity far below chance after the text
    stages and exactly unchanged by every multimodal stage (language mode is the frozen
    backbone); each media stage's answers `MARGIN` above what a media-blind guess scores."""
    from orchestrator.store import Store

    records = {}
    for stage in ("text_pretrain", "text_post_train", *MULTIMODAL_OUTPUTS):
        record = Store(store, read_only=True).latest(stage).evaluation()
        assert record is not None and record.stage == stage, stage
        records[stage] = record
        ppl = record.result("heldout_perplexity")
        assert ppl.value < ppl.chance / 10 and not ppl.higher_is_better, (stage, ppl)
    backbone = records["text_post_train"].result("heldout_perplexity").value
    for stage, task in MEDIA_EVALUATIONS.items():
        record = records[stage]
        assert record.result("heldout_perplexity").value == backbone, stage
        accuracy, exact = (record.result(f"{task}_{m}") for m in ("accuracy", "exact_match"))
        for r in (accuracy, exact):
            assert r.samples >= 32 and 0 <= r.value <= 1 and 0 <= r.chance <= 1, (stage, r)
        assert accuracy.value >= accuracy.chance + MARGIN, (
            f"{stage} {task}_accuracy {accuracy.value:.3f} (chance {accuracy.chance:.3f})")


@pytest.mark.slow
def test_tiny_multimodal_pipeline_trains_all_nine_stages(tmp_path: Path) -> None:
    """`make demo`: every stage trains from the synthetic sources, its loss falling, its frozen
    weights unchanged, its artifact holding exactly its module groups, its held-out
    evaluations beating chance; a second run skips every stage."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(tmp_path / "cache")}
    store = tmp_path / "store"
    run = phi4("run", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store",
               str(store), env=env, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "9 succeeded" in run.stdout + run.stderr
    for stage, artifact in MULTIMODAL_OUTPUTS.items():
        curve = losses(store, stage)
        n = max(5, len(curve) // 10)  # a tenth of the steps: one batch of 8 is noisy
        assert sum(curve[-n:]) < sum(curve[:n]), (stage, curve)
        (folder,) = (store / "stages" / stage).glob(f"*/artifacts/{artifact}")
        sums = json.loads((folder / "frozen_checksums.json").read_text())
        assert sums["before"] == sums["after"] and "backbone" in sums["after"]["groups"]
        groups = set(json.loads((folder / "phi4_model.json").read_text())["groups"])
        assert groups == ARTIFACT_GROUPS[artifact], stage
    (joint,) = (store / "stages" / "vision_speech_joint").glob("*/artifacts/model")
    summary = json.loads((joint / "train_summary.json").read_text())
    assert summary["inputs"] == {"backbone": ["backbone"],
                                 "vision": ["lora.vision", "vision.encoder", "vision.projector"],
                                 "speech": ["lora.speech", "audio.encoder", "audio.projector"]}
    check_evaluations(store)
    assert "vision_sft: succeeded" in run.stdout and "caption_accuracy" in run.stdout
    again = phi4("run", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store",
                 str(store), env=env)
    assert again.returncode == 0 and "nothing to run: 9 stages up to date" in again.stdout
    report_in_browser(store, env, tmp_path)  # skips where there is no chromium (never in CI)


def report_in_browser(store: Path, env: dict, tmp_path: Path) -> None:
    """The nine stages' HTML lineage report, read in headless Chromium: every stage with its
    loss curve, every edge, every evaluation the store holds; no overlap, no console error."""
    from report_browser import check_layout, chromium_or_skip, read_report

    from orchestrator.store import Store

    executable = chromium_or_skip()
    report = tmp_path / "report.html"
    out = phi4("graph", "pipelines/phi4_multimodal.yaml", "--profile", "tiny", "--store",
               str(store), "--format", "html", "-o", str(report), env=env)
    assert out.returncode == 0, out.stderr
    seen, errors = read_report(report, executable)
    assert errors == []
    stages = {"text_pretrain", "text_post_train", *MULTIMODAL_OUTPUTS}
    assert {g["stage"] for g in seen["nodes"]} == set(seen["sections"]) == stages
    assert all(lines == 1 for _, lines in seen["curves"]), seen["curves"]  # one loss curve each
    assert len(seen["edges"]) == len(seen["labels"]) == 14
    assert ["speech_post_train", "vision_speech_joint"] in seen["edges"]
    check_layout(seen)
    for stage in stages:
        folder = Store(store).latest(stage)
        record = folder.evaluation() if folder else None
        for result in record.results if record else []:
            assert result.name in seen["text"], (stage, result.name)
