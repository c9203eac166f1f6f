"""Multimodal stages through `python -m phi4core train SPEC.json` (tiny preset, CPU): a vision
and a speech stage from a text artifact, each artifact holding exactly its module groups, a
joint stage assembling its model from backbone + both artifacts, and resuming."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _vision_helpers import packed

from phi4core.module_groups import group_of
from phi4core.train.testing import (
    synthetic_speech_corpus,
    tiny_multimodal_spec,
    tiny_spec,
    write_spec,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

VISION = ["lora.vision", "vision.encoder", "vision.projector"]
SPEECH = ["audio.encoder", "audio.projector", "lora.speech"]


def _train(spec, work: Path) -> str:
    path = write_spec(spec, work / f"{spec.name}.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": str(work / "cache")}
    proc = subprocess.run([sys.executable, "-m", "phi4core", "train", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _artifact(spec, name: str) -> Path:
    return Path(spec.output_dir) / name


def _summary(spec, artifact: str) -> dict:
    return json.loads((_artifact(spec, artifact) / "train_summary.json").read_text())


def _tensors(folder: Path) -> dict:
    """Every tensor of a weights folder, by key (megatron's plain-tensor reader; it needs a
    process group)."""
    from megatron.core import dist_checkpointing

    from phi4core.parallel import init_single_process

    init_single_process()

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(folder)).items()
            if not k.endswith("_extra_state")}


def _losses(spec) -> list[float]:
    lines = (Path(spec.stage_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mm_train")


@pytest.fixture(scope="module")
def text(work):
    spec = tiny_spec(work, "text", steps=10, save_interval=100)
    _train(spec, work)
    return spec


def _backbone(text) -> dict:
    return {"backbone": {"source": "path", "path": str(_artifact(text, "model")),
                         "frozen": True}}


def _vision_spec(work: Path, name: str, inputs: dict):
    """A vision stage over a mixture of three families: synthetic images, an energon dataset
    (pack-images) and text-only chat, whose micro-batches run in language mode; one loader
    worker each, so the loader position crosses process boundaries."""
    dataset = work / "vision_data" / "ds"
    if not dataset.is_dir():
        packed(work / "vision_data", 16, shard_size=6)
    spec = tiny_multimodal_spec(work, name, "image", trainable=VISION, outputs=["vision"],
                                frozen=["backbone"], inputs=inputs, steps=12, save_interval=6)
    sources = [{"kind": "synthetic", "modality": "image", "samples": 60, "weight": 2.0},
               {"kind": "webdataset", "path": str(dataset), "weight": 1.0},
               {"kind": "synthetic", "modality": "chat", "samples": 40, "weight": 1.0}]
    data = spec.data.model_validate({"sources": sources, "num_workers": 1})
    return spec.model_copy(update={"data": data})


@pytest.fixture(scope="module")
def vision(work, text):
    spec = _vision_spec(work, "vision", _backbone(text))
    _train(spec, work)
    return spec


@pytest.fixture(scope="module")
def speech(work, text):
    """The speech stage reads its clips as a lhotse corpus (the synthetic audio, prepared),
    in 2 loader workers: the trainer's path for `{kind: lhotse}` sources."""
    corpus = synthetic_speech_corpus(work / "speech_corpus", 60, seed=3)
    data = {"sources": [{"kind": "lhotse", "path": str(corpus), "task": "qa"}],
            "num_workers": 2}
    spec = tiny_multimodal_spec(work, "speech", "audio", trainable=SPEECH, outputs=["speech"],
                                frozen=["backbone"], inputs=_backbone(text), steps=12,
                                data=data)
    out = _train(spec, work)
    assert "speech " in out and "read 60, kept 60" in out  # the corpus's report
    return spec


@pytest.mark.parametrize("stage, groups", [("vision", VISION), ("speech", SPEECH)])
def test_artifact_holds_exactly_its_groups(request, stage, groups):
    spec = request.getfixturevalue(stage)
    folder = _artifact(spec, stage)
    meta = json.loads((folder / "phi4_model.json").read_text())
    assert sorted(meta["groups"]) == groups
    assert sorted({group_of(k) for k in _tensors(folder)}) == groups
    s = _summary(spec, stage)
    assert s["inputs"] == {"backbone": ["backbone"]}
    # frozen checksums over every frozen group, unchanged by training
    sums = json.loads((folder / "frozen_checksums.json").read_text())
    assert sums["before"] == sums["after"]
    frozen_groups = {"backbone", "lora.vision", "lora.speech", "vision.encoder",
                     "vision.projector", "audio.encoder", "audio.projector"} - set(groups)
    assert set(sums["after"]["groups"]) == frozen_groups
    losses = _losses(spec)
    assert sum(losses[-4:]) < sum(losses[:4]), losses


def test_frozen_backbone_is_the_text_artifact(text, vision):
    """The backbone a multimodal stage trained against is the text stage's, bit for bit."""
    from phi4core.train.freezing import tensor_bytes

    text_tensors = _tensors(_artifact(text, "model"))
    sums = json.loads((_artifact(vision, "vision") / "frozen_checksums.json").read_text())
    import hashlib

    for key, digest in sums["after"]["tensors"].items():
        name = key.split("[", 1)[0]
        if group_of(name) == "backbone" and name in text_tensors:
            assert hashlib.sha256(tensor_bytes(text_tensors[name])).hexdigest() == digest, key


def test_joint_stage_assembles_backbone_and_both_artifacts(work, text, vision, speech):
    """The backbone + vision + speech artifacts -> the whole model; the frozen speech path and
    backbone come out bit-identical to their inputs, the vision path trained further."""
    inputs = {**_backbone(text),
              "vision": {"source": "stage", "path": str(_artifact(vision, "vision")),
                         "artifact": "vision"},
              "speech": {"source": "stage", "path": str(_artifact(speech, "speech")),
                         "artifact": "speech", "frozen": True}}
    spec = tiny_multimodal_spec(work, "joint", "image_audio", trainable=VISION,
                                outputs=["model"], inputs=inputs, steps=4,
                                frozen=["backbone", *SPEECH])
    _train(spec, work)
    s = _summary(spec, "model")
    assert s["inputs"] == {"backbone": ["backbone"], "vision": VISION_ORDER,
                           "speech": SPEECH_ORDER}
    out = _tensors(_artifact(spec, "model"))
    assert {group_of(k) for k in out} == {"backbone", *VISION, *SPEECH}
    for source, groups in ((_artifact(text, "model"), {"backbone"}),
                           (_artifact(speech, "speech"), set(SPEECH))):
        for k, t in _tensors(source).items():
            if group_of(k) in groups:
                assert out[k].equal(t), k
    vis = _tensors(_artifact(vision, "vision"))
    changed = [k for k, t in vis.items() if group_of(k) == "vision.projector"
               and k.endswith("weight") and not out[k].equal(t)]
    assert changed


# the groups in table order (phi4core.module_groups), as inputs report them
VISION_ORDER = ["lora.vision", "vision.encoder", "vision.projector"]
SPEECH_ORDER = ["lora.speech", "audio.encoder", "audio.projector"]


def test_resume_is_bit_identical(work, vision):
    """A vision stage stopped after its step-6 checkpoint resumes to the same weights as the
    uninterrupted run: its mixture and energon loader continue exactly where they were."""
    spec = _vision_spec(work, "vision_resumed",
                        {k: v.model_dump() for k, v in vision.inputs.items()})
    ckpts = Path(spec.stage_dir) / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(Path(vision.stage_dir) / "checkpoints" / "step_6", ckpts / "step_6")
    _train(spec, work)
    s = _summary(spec, "vision")
    assert s["resumed_from_step"] == 6
    assert s["weights_sha256"] == _summary(vision, "vision")["weights_sha256"]
    reports = s["data_reports"]
    assert reports == _summary(vision, "vision")["data_reports"]
    assert reports[0]["records_kept"] == 12 and not reports[0]["skipped_by_reason"]  # 48 / 4
