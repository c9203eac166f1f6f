"""Which module groups each input of a stage provides, and the inputs that cannot go together
(no weights needed: the groups are read from each folder's phi4_model.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi4core.config import PRESETS
from phi4core.train.inputs import InputError, load_inputs, plan_inputs
from phi4core.train.testing import tiny_multimodal_spec

VISION = ["lora.vision", "vision.encoder", "vision.projector"]


def _folder(root: Path, name: str, preset: str, groups: list[str] | None) -> str:
    folder = root / name
    folder.mkdir()
    meta = {"format": "phi4core.decoder/1", "model_config": PRESETS[preset].model_dump()}
    if groups is not None:
        meta["groups"] = groups
    (folder / "phi4_model.json").write_text(json.dumps(meta))
    return str(folder)


def _spec(tmp_path: Path, inputs: dict, trainable=VISION):
    return tiny_multimodal_spec(tmp_path, "s", "image", trainable=trainable, outputs=["vision"],
                                inputs=inputs)


def test_groups_come_from_each_folder(tmp_path):
    text = _folder(tmp_path, "text", "phi4_mini_tiny", None)  # older: no record, its config's
    vision = _folder(tmp_path, "vision", "phi4_multimodal_tiny", VISION)
    spec = _spec(tmp_path, {"backbone": {"source": "stage", "path": text, "frozen": True},
                            "vision": {"source": "stage", "path": vision}})
    assert plan_inputs(spec) == {"backbone": ["backbone"], "vision": VISION}


def test_inputs_that_cannot_go_together(tmp_path):
    whole = _folder(tmp_path, "whole", "phi4_multimodal_tiny", None)
    vision = _folder(tmp_path, "vision", "phi4_multimodal_tiny", VISION)
    speech = _folder(tmp_path, "speech", "phi4_multimodal_tiny",
                     ["lora.speech", "audio.encoder", "audio.projector"])
    with pytest.raises(InputError, match="inputs 'whole' and 'vision' both provide lora.vision"):
        plan_inputs(_spec(tmp_path, {"whole": {"source": "path", "path": whole},
                                     "vision": {"source": "path", "path": vision}}))
    with pytest.raises(InputError, match="'vision' is frozen but provides lora.vision"):
        plan_inputs(_spec(tmp_path, {"vision": {"source": "path", "path": vision,
                                                "frozen": True}}))
    spec = _spec(tmp_path, {"speech": {"source": "path", "path": speech}})
    spec.model = PRESETS["phi4_mini_tiny"]
    with pytest.raises(InputError, match="none of model phi4_mini_tiny's"):
        plan_inputs(spec)
    with pytest.raises(InputError, match="is not a folder"):
        plan_inputs(_spec(tmp_path, {"x": {"source": "path", "path": str(tmp_path / "nope")}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a phi4 checkpoint"):
        plan_inputs(_spec(tmp_path, {"x": {"source": "path", "path": str(tmp_path / "empty")}}))


def test_a_multimodal_hf_folder_provides_every_group_it_holds(tmp_path):
    """A Phi4MultimodalForCausalLM folder (with its PEFT adapter folders) is planned as the
    groups it really holds, so the one-input-per-group and frozen checks apply to all of them;
    a Phi-3 folder stays the backbone."""
    import torch

    from phi4core.interop.hf import save_hf
    from phi4core.models.multimodal import build_multimodal_model
    from phi4core.module_groups import groups_of
    from phi4core.parallel import init_single_process

    init_single_process()
    mc = PRESETS["phi4_multimodal_tiny"]
    torch.manual_seed(0)
    source = build_multimodal_model(mc)
    with torch.no_grad():  # adapters start with B = 0: give them values to carry
        for n, p in source.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.05)
    save_hf(source, tmp_path / "mm")
    mm = {"source": "hf", "path": str(tmp_path / "mm")}
    assert plan_inputs(_spec(tmp_path, {"mm": mm})) == {"mm": groups_of(mc)}
    torch.manual_seed(1)
    target = build_multimodal_model(mc)
    assert load_inputs(_spec(tmp_path, {"mm": mm}), [target]) == {"mm": groups_of(mc)}
    want = source.state_dict()
    for name, value in target.state_dict().items():
        if "_extra_state" not in name:
            assert torch.equal(value, want[name]), name
    vision = _folder(tmp_path, "vision", "phi4_multimodal_tiny", VISION)
    with pytest.raises(InputError, match="inputs 'mm' and 'vision' both provide"):
        plan_inputs(_spec(tmp_path, {"mm": mm, "vision": {"source": "path", "path": vision}}))
    with pytest.raises(InputError, match="'mm' is frozen but provides"):
        plan_inputs(_spec(tmp_path, {"mm": {**mm, "frozen": True}}))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="input 'odd': .*model_type"):
        plan_inputs(_spec(tmp_path, {"odd": {"source": "hf", "path": str(tmp_path / "odd")}}))
