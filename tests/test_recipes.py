"""Shipped recipes and pipelines: valid, frozen as the reference says, tiny under the profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_pipeline, load_recipe
from orchestrator.config.checks import expand_groups, model_of

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))

# The reference table: (trained, frozen) module groups of each stage.
FREEZING = {
    "text_pretrain": ({"backbone"}, set()),
    "text_post_train": ({"backbone"}, set()),
    "vision_projector_align": ({"vision.projector"}, {"backbone", "vision.encoder"}),
    "vision_joint_pretrain": ({"vision.encoder", "vision.projector"}, {"backbone"}),
    "vision_sft": ({"vision.encoder", "vision.projector", "lora.vision"}, {"backbone"}),
    "vision_multiframe": ({"vision.encoder", "vision.projector", "lora.vision"}, {"backbone"}),
    "speech_pretrain": ({"audio.encoder", "audio.projector"}, {"backbone"}),
    "speech_post_train": ({"lora.speech", "audio.projector"}, {"backbone", "audio.encoder"}),
    "vision_speech_joint": ({"vision.encoder", "vision.projector", "lora.vision"},
                            {"backbone", "audio.encoder", "audio.projector", "lora.speech"}),
}
# Fine-tuning the released models (issue 14): LoRA on a frozen model.
FINETUNE = {
    "text_sft_lora": ({"lora.text"}, {"backbone"}),
    "vision_sft_lora": ({"lora.vision"}, {"backbone", "vision.encoder", "vision.projector",
                                          "audio.encoder", "audio.projector", "lora.speech"}),
}
# Their evaluation and export stages: no training.
TOOL_STAGES = {"text_sft_lora_eval", "text_sft_lora_export", "vision_sft_lora_eval",
               "vision_sft_lora_export"}


def test_all_nine_stages_exist() -> None:
    assert {p.stem for p in RECIPES} == set(FREEZING) | set(FINETUNE) | TOOL_STAGES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", [None, "tiny"])
def test_recipe_valid(path: Path, profile: str | None) -> None:
    loaded = load_recipe(path, profile)
    assert loaded.recipe.name == path.stem


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_freezing_matches_reference(path: Path) -> None:
    recipe = load_recipe(path).recipe
    if recipe.name in TOOL_STAGES:
        assert recipe.kind in ("eval", "export") and not recipe.trainable
        return
    groups = model_of(recipe).module_groups
    trained, frozen = {**FREEZING, **FINETUNE}[recipe.name]
    assert expand_groups(recipe.trainable, groups) == trained
    assert frozen <= expand_groups(recipe.frozen, groups)


def test_seed_numbers() -> None:
    stage = {p.stem: load_recipe(p).recipe for p in RECIPES}
    assert stage["text_pretrain"].train.tokens == 5e12
    assert stage["text_pretrain"].train.seq_length == 131072
    assert stage["text_pretrain"].train.lr.scaling_law.exponent == -0.32
    assert stage["vision_joint_pretrain"].train.tokens == 5e11
    assert stage["vision_sft"].train.tokens == 3e11
    assert stage["vision_multiframe"].train.seq_length == 65536
    speech_pt, speech_post = stage["speech_pretrain"].train, stage["speech_post_train"].train
    assert (speech_pt.steps, speech_pt.lr) == (50000, 4e-5)
    assert (speech_post.steps, speech_post.lr) == (50000, 1e-4)
    mm = model_of(stage["vision_sft"])
    assert (mm.lora_vision.rank, mm.lora_speech.rank) == (256, 320)
    assert mm.vision.image_size == 448 and mm.vision.max_crops == 36  # the dynamic_hd released
    assert mm.rope_scaling.max_position_embeddings == 131072


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
@pytest.mark.parametrize("profile", [None, "tiny"])
def test_pipeline_valid(path: Path, profile: str | None) -> None:
    loaded = load_pipeline(path, profile)
    expected = {"phi4_mini": 2, "phi4_multimodal": 9, "phi4_multimodal_from_mini": 7,
                "finetune_phi4_mini": 3, "finetune_phi4_multimodal": 3}
    assert len(loaded.stages) == expected[path.stem]


def test_tiny_profile_makes_every_stage_one_cpu_process() -> None:
    loaded = load_pipeline(REPO / "pipelines/phi4_multimodal.yaml", "tiny")
    for stage in loaded.stages.values():
        r = stage.recipe
        assert r.resources.world_size == 1 and r.resources.gpus_per_node == 0
        assert r.model.size == "tiny" and r.precision.fp8 == "off"
        # an image takes 31-93 tokens (the tiny tower's 112-pixel crops), unpacked: 256 at
        # most; about a million tokens per stage, a minute of a laptop CPU at the tiny size
        assert r.train.seq_length <= 256
        assert r.train.total_steps * r.train.global_batch_size * r.train.seq_length <= 1_100_000
        assert all(s.kind == "synthetic" for s in r.data.sources)
    assert "vision_encoder" not in loaded.stages["vision_projector_align"].recipe.inputs


def test_from_mini_takes_the_backbone_from_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI4_MINI_HF", "/models/mini")
    loaded = load_pipeline(REPO / "pipelines/phi4_multimodal_from_mini.yaml")
    for stage in loaded.stages.values():
        backbone = stage.recipe.inputs["backbone"]
        assert backbone.hf == "/models/mini" and backbone.frozen and backbone.stage is None


def test_overrides_are_typed_and_targeted() -> None:
    loaded = load_pipeline(REPO / "pipelines/phi4_mini.yaml", "tiny",
                           ["train.steps=7", "text_post_train.train.lr=5e-4"])
    pre, post = loaded.stages["text_pretrain"].recipe, loaded.stages["text_post_train"].recipe
    assert pre.train.steps == post.train.steps == 7
    assert post.train.lr == 5e-4 and pre.train.lr == 3e-3
    assert str(loaded.stages["text_post_train"].origin(("train", "lr"))) == \
        "--set text_post_train.train.lr=5e-4"


def test_extends_chain_and_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base/root.yaml").write_text(
        "model: {preset: phi4_mini, size: tiny}\ntrainable: [backbone]\noutputs: [model]\n"
        "data: {sources: [{kind: text_jsonl, path: '${oc.env:DATA_ROOT,/d}/a.jsonl'}]}\n"
        "train: {steps: 10, seq_length: 64, global_batch_size: 4, lr: 1.0e-3}\n"
        "resources: {gpus_per_node: 0}\nprecision: {params: fp32, fp8: 'off'}\n")
    (tmp_path / "base/mid.yaml").write_text("extends: root.yaml\ntrain: {seq_length: 128}\n")
    (tmp_path / "leaf.yaml").write_text(
        "extends: base/mid.yaml\nname: leaf\ntokenizer: '/tok/${train.seq_length}'\n")
    monkeypatch.setenv("DATA_ROOT", "/data")
    recipe = load_recipe(tmp_path / "leaf.yaml").recipe
    assert recipe.train.seq_length == 128 and recipe.train.steps == 10
    assert recipe.tokenizer == "/tok/128"
    assert recipe.data.sources[0].path == "/data/a.jsonl"


def test_each_file_parsed_once_per_load_and_again_next_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stages extending one base parse it once within a load; the next load reads the
    file as it is then; every stage gets its own copy to change."""
    from orchestrator.config import loader

    base = REPO / "recipes/_base/multimodal.yaml"
    parsed: list[str] = []
    real = loader.read_yaml
    monkeypatch.setattr(loader, "read_yaml", lambda path: parsed.append(str(path)) or real(path))
    pipeline = load_pipeline(REPO / "pipelines/phi4_multimodal.yaml")
    assert len(parsed) == len(set(parsed)) and str(base) in {str(Path(p).resolve())
                                                              for p in parsed}
    docs = [s.document for s in pipeline.stages.values()]
    assert all(a is not b for a in docs for b in docs if a is not b)

    (tmp_path / "base.yaml").write_text("description: first\n")
    (tmp_path / "leaf.yaml").write_text("extends: base.yaml\nname: leaf\nkind: command\n"
                                        "cmd: [echo]\n")
    assert load_recipe(tmp_path / "leaf.yaml").recipe.description == "first"
    (tmp_path / "base.yaml").write_text("description: again\n")
    assert load_recipe(tmp_path / "leaf.yaml").recipe.description == "again"


def test_null_removes_keys_wherever_it_is_written(tmp_path: Path) -> None:
    """`null` removes a key from a profile overlay even where the base has no such mapping,
    and `--set KEY=null` removes it too."""
    profile = tmp_path / "p.yaml"
    profile.write_text(f"extends: {REPO / 'recipes/profiles/tiny.yaml'}\n"
                       "inputs: {backbone: null}\n")
    pre = load_recipe(REPO / "recipes/text_pretrain.yaml", str(profile)).recipe
    assert pre.inputs == {}
    post = load_recipe(REPO / "recipes/text_post_train.yaml", "tiny",
                       ["inputs.backbone=null", "trainable=[backbone]"]).recipe
    assert "backbone" not in post.inputs


def test_set_indexes_lists() -> None:
    loaded = load_recipe(REPO / "recipes/text_pretrain.yaml", None,
                         ["data.sources.1.weight=0.5"])
    assert loaded.recipe.data.sources[1].weight == 0.5
    assert loaded.recipe.data.sources[0].weight == 0.55


@pytest.mark.parametrize("name", ["phi4_mini", "phi4_mini_tiny", "phi4_multimodal",
                                  "phi4_multimodal_tiny"])
def test_presets_are_what_validation_gives(name: str) -> None:
    """Presets are assembled without validation (start-up): each must equal its validated
    self, value types and set fields included, and be one shared instance."""
    import json

    from phi4core.config import PRESETS, ModelConfig, preset

    built = PRESETS[name]
    validated = ModelConfig.model_validate(built.model_dump(exclude_unset=True))
    assert json.dumps(built.model_dump()) == json.dumps(validated.model_dump())
    for section in (None, "rope_scaling", "vision", "audio", "lora_vision", "lora_speech"):
        a = built if section is None else getattr(built, section)
        b = validated if section is None else getattr(validated, section)
        assert type(a) is type(b), section
        assert a is None or a.model_fields_set == b.model_fields_set, section
    assert PRESETS[name] is built and name in PRESETS and len(PRESETS) == 4
    assert preset(name.removesuffix("_tiny"), "tiny" if name.endswith("_tiny") else "full") \
        is built
    with pytest.raises(KeyError):
        PRESETS["phi4_nope"]
