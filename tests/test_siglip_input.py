"""A transformers SigLIP folder as a stage's HF input: it provides the vision encoder (and the
tower's unused tail), tensor for tensor, and the tower then computes transformers' features."""

from __future__ import annotations

import pytest
import torch

from phi4core.config import preset
from phi4core.train.inputs import InputError, load_inputs, plan_inputs
from phi4core.train.testing import tiny_multimodal_spec

VISION = ["lora.vision", "vision.encoder", "vision.projector"]


def _siglip_config(vc, **changes):
    from transformers import SiglipVisionConfig

    fields = dict(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                  num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_heads,
                  patch_size=vc.patch_size, image_size=vc.image_size,
                  layer_norm_eps=vc.layer_norm_eps, hidden_act="gelu_pytorch_tanh")
    return SiglipVisionConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A random tiny SiglipVisionModel of the tiny preset's vision shape, saved."""
    import _mm_hf_helpers as H
    from transformers import SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(_siglip_config(preset("phi4_multimodal_tiny").vision)).eval()
    H.randomize(model, seed=3)
    folder = tmp_path_factory.mktemp("siglip") / "siglip"
    model.save_pretrained(folder)
    model.config._attn_implementation = "eager"
    return model, folder


def _spec(tmp_path, folder, frozen=True):
    return tiny_multimodal_spec(tmp_path, "align", "image", trainable=["vision.projector"],
                                outputs=["vision"],
                                inputs={"encoder": {"source": "hf", "path": str(folder),
                                                    "frozen": frozen}})


@pytest.fixture(scope="module")
def loaded(siglip, tmp_path_factory):
    from phi4core.models.multimodal import build_multimodal_chunks
    from phi4core.parallel import init_single_process

    _, folder = siglip
    spec = _spec(tmp_path_factory.mktemp("stage"), folder)
    chunks = build_multimodal_chunks(spec.model, init_single_process())
    assert load_inputs(spec, chunks) == {"encoder": ["vision.encoder"]}
    return chunks[0].vision.eval()


def test_plan_gives_the_encoder(siglip, tmp_path):
    assert plan_inputs(_spec(tmp_path, siglip[1])) == {"encoder": ["vision.encoder"]}


def test_every_encoder_tensor_is_the_siglip_one(siglip, loaded):
    hf = siglip[0].state_dict()
    tower, vc = loaded, preset("phi4_multimodal_tiny").vision
    heads, h = vc.num_heads, vc.hidden_size
    d = h // heads
    seen = set()

    def same(ours, name):
        seen.add(name)
        assert torch.equal(ours, hf[name]), name

    same(tower.embeddings.patch_embedding.weight, "embeddings.patch_embedding.weight")
    same(tower.embeddings.patch_embedding.bias, "embeddings.patch_embedding.bias")
    same(tower.embeddings.position_embedding.weight, "embeddings.position_embedding.weight")
    for i, layer in enumerate(tower.encoder.layers):
        p = f"encoder.layers.{i}."
        qkv = layer.self_attention.linear_qkv
        for kind in ("weight", "bias"):
            # megatron's fused qkv: per head [q_h; k_h; v_h]
            ours = getattr(qkv, kind).reshape(heads, 3, d, -1)
            for j, x in enumerate("qkv"):
                same(ours[:, j].reshape(h, -1).squeeze(-1), f"{p}self_attn.{x}_proj.{kind}")
            # LayerNorms: fused into the linears (Transformer Engine) or their own modules
            for fused, alone, hf_ln in ((qkv, layer.input_layernorm, "layer_norm1"),
                                        (layer.mlp.linear_fc1, layer.pre_mlp_layernorm,
                                         "layer_norm2")):
                ln = getattr(fused, f"layer_norm_{kind}", None)
                same(ln if ln is not None else getattr(alone, kind), f"{p}{hf_ln}.{kind}")
            same(getattr(layer.self_attention.linear_proj, kind), f"{p}self_attn.out_proj.{kind}")
            same(getattr(layer.mlp.linear_fc1, kind), f"{p}mlp.fc1.{kind}")
            same(getattr(layer.mlp.linear_fc2, kind), f"{p}mlp.fc2.{kind}")
    for name, buf in tower.unused_tail.named_buffers():  # kept under the HF names
        same(buf, name)
    assert seen == set(hf), sorted(set(hf) - seen)


def test_features_equal_transformers(siglip, loaded):
    """One unpadded 448 crop: the encoder's output is SigLIP's hidden_states[-2]."""
    model, _ = siglip
    vc = preset("phi4_multimodal_tiny").vision
    side = vc.image_size // vc.patch_size
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=torch.Generator()
                         .manual_seed(1))
    mask = torch.ones(1, side, side, dtype=torch.bool)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        x = loaded.embeddings(pixels, mask)
        x = loaded.encoder(x.transpose(0, 1).contiguous(), ~mask.reshape(1, 1, 1, -1))
        got = x.transpose(0, 1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5
    # Not vacuous: the last (unused) layer's output differs.
    assert not torch.allclose(got, model(pixel_values=pixels).last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=4), "num_layers 4 != 3"),
    (dict(hidden_size=64), "hidden_size 64 != 32"),
    (dict(patch_size=16), "patch_size 16 != 14"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(vision_use_head=False), "vision_use_head false"),
])
def test_a_mismatched_siglip_is_a_clear_error(tmp_path, change, message):
    vc = preset("phi4_multimodal_tiny").vision
    cfg = _siglip_config(vc, **change)
    folder = tmp_path / "other"
    cfg.save_pretrained(folder)  # the config alone: the check comes before any weights
    with pytest.raises(InputError, match=r"input 'encoder': SigLIP config of .* does not match "
                                         r"model phi4_multimodal_tiny's vision: .*" + message):
        plan_inputs(_spec(tmp_path, folder))


def test_a_whole_siglip_model_gives_its_vision_half(siglip, loaded, tmp_path):
    """A SiglipModel folder: vision_config nested, text_model.* and logit_scale/bias ignored."""
    from transformers import SiglipConfig, SiglipModel

    from phi4core.models.multimodal import build_multimodal_chunks
    from phi4core.parallel import init_single_process

    vision_model, _ = siglip
    cfg = SiglipConfig(vision_config=vision_model.config.to_dict(),
                       text_config=dict(hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        vocab_size=64, max_position_embeddings=16))
    whole = SiglipModel(cfg)
    whole.vision_model.load_state_dict(vision_model.state_dict())  # saved as vision_model.*
    folder = tmp_path / "siglip_whole"
    whole.save_pretrained(folder)
    spec = _spec(tmp_path, folder)
    chunks = build_multimodal_chunks(spec.model, init_single_process())
    assert load_inputs(spec, chunks) == {"encoder": ["vision.encoder"]}
    want = loaded.state_dict()
    got = chunks[0].vision.state_dict()
    for k in want:
        if k.startswith(("encoder.", "embeddings.", "unused_tail.")) and "_extra_state" not in k:
            assert torch.equal(got[k], want[k]), k


def test_a_text_model_has_no_place_for_siglip(siglip, tmp_path):
    spec = _spec(tmp_path, siglip[1])
    spec.model = preset("phi4_mini_tiny")
    with pytest.raises(InputError, match="holds the module groups vision.encoder, none of"):
        plan_inputs(spec)


@pytest.mark.slow
def test_projector_alignment_trains_from_a_siglip_folder(siglip, loaded, tmp_path):
    """vision_projector_align in small: the SigLIP encoder frozen, only the projector trains."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from phi4core.train.testing import write_spec

    repo = Path(__file__).resolve().parents[1]
    spec = tiny_multimodal_spec(tmp_path, "align", "image", trainable=["vision.projector"],
                                frozen=["backbone", "vision.encoder"], outputs=["vision"],
                                inputs={"vision_encoder": {"source": "hf",
                                                           "path": str(siglip[1]),
                                                           "frozen": True}}, steps=6)
    path = write_spec(spec, tmp_path / "align.json")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "phi4core", "train", str(path)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = Path(spec.output_dir) / "vision"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["inputs"] == {"vision_encoder": ["vision.encoder"]}
    sums = json.loads((out / "frozen_checksums.json").read_text())
    assert sums["before"] == sums["after"]
    assert "vision.encoder" in sums["after"]["groups"]
    # The artifact's encoder is the SigLIP folder's, bit for bit.
    saved = dist_checkpointing.load_plain_tensors(str(out))
    mine = loaded.state_dict()
    checked = 0
    for key, t in saved.items():
        if not key.startswith(("vision.encoder.", "vision.embeddings.")) or "_extra" in key:
            continue
        name = key.removeprefix("vision.")
        if name.startswith("encoder.layers."):  # saved stacked: [layer, ...]
            rest = name.removeprefix("encoder.layers.")
            pairs = [(t[i], mine[f"encoder.layers.{i}.{rest}"]) for i in range(t.shape[0])]
        else:
            pairs = [(t, mine[name])]
        for a, b in pairs:
            assert torch.equal(a, b), key
            checked += 1
    assert checked > 0


@pytest.mark.slow
@pytest.mark.cpu_only
def test_the_encoder_loads_alike_at_every_layout(siglip, tmp_path):
    """TP=2 and PP=2 (gloo, torchrun) hold the same encoder as TP=1, saved whole."""
    from test_artifacts_mp import _run, _tensors

    from phi4core.module_groups import group_of

    def encoder(tp: int, pp: int) -> dict:
        out = tmp_path / f"tp{tp}pp{pp}"
        _run(tp * pp, "siglip", str(siglip[1]), str(out), str(tp), str(pp))
        return {k: v for k, v in _tensors(out / "model").items()
                if group_of(k) == "vision.encoder" or k.startswith("vision.unused_tail.")}

    want = encoder(1, 1)
    assert want
    for tp, pp in ((2, 1), (1, 2)):
        got = encoder(tp, pp)
        assert sorted(got) == sorted(want)
        for k, t in want.items():
            assert got[k].equal(t), (tp, pp, k)
