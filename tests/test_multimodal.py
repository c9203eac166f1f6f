"""The multimodal model with stand-in towers: placeholder expansion and assembly, module groups,
gradients per stage's trainable groups, the zero-weighted pass (one process)."""

from __future__ import annotations

import pytest
import torch
from _mm_helpers import TOKENS_PER_CLIP, TOKENS_PER_IMAGE, TOWERS

from phi4core.config import preset

IMG, AUD = 10, 11  # placeholder ids of the tiny preset


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


def _model(**kw):
    from phi4core.models.multimodal import build_multimodal_model

    mc = preset("phi4_multimodal_tiny")
    return mc, build_multimodal_model(mc, towers=TOWERS, **kw)


def _batch(images_per_row=1, clips_per_row=1, rows=2, seed=0):
    """Token rows with placeholders expanded, and the stand-in processor outputs."""
    from phi4core.data.placeholders import expand_placeholders

    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(rows):
        row = [1] + [IMG] * images_per_row + [20, 21] + [AUD] * clips_per_row + [22, 2]
        row = expand_placeholders(row, {IMG: [TOKENS_PER_IMAGE] * images_per_row}).tolist()
        row = expand_placeholders(row, {AUD: [TOKENS_PER_CLIP] * clips_per_row}).tolist()
        ids.append(row)
    x = torch.tensor(ids)
    pix = torch.randn(rows * images_per_row, TOKENS_PER_IMAGE, 8, generator=g)
    aud = torch.randn(rows * clips_per_row, TOKENS_PER_CLIP, 8, generator=g)
    return x, pix, aud


def test_expand_placeholders():
    from phi4core.data.placeholders import expand_placeholders

    expanded = expand_placeholders([5, IMG, 6, IMG], {IMG: [2, 3]}).tolist()
    assert expanded == [5, IMG, IMG, 6, IMG, IMG, IMG]
    assert expand_placeholders([5, 6], {IMG: []}).tolist() == [5, 6]
    with pytest.raises(ValueError, match="2 placeholder"):
        expand_placeholders([IMG, IMG], {IMG: [3]}).tolist()
    with pytest.raises(ValueError, match="has no tokens"):
        expand_placeholders([IMG], {IMG: [0]}).tolist()


def test_parameter_groups_from_the_one_table(single):
    from phi4core.models.decoder import param_groups
    from phi4core.module_groups import ARTIFACT_GROUPS, GROUP_NAMES, group_of, groups_of

    mc, m = _model()
    groups = param_groups(m)
    # every group but the fine-tuning adapter, which the preset has not
    assert sorted(groups) == sorted(set(GROUP_NAMES) - {"lora.text"}) == sorted(groups_of(mc))
    assert "vision.sub_GN" in groups["vision.projector"]  # the tower's rest: separators
    assert all(n.startswith("audio.projector.") for n in groups["audio.projector"])
    assert group_of("module.module.decoder.layers.1.mlp.linear_fc2.lora_speech.B") == \
        "lora.speech"
    assert groups_of(preset("phi4_mini")) == ["backbone"]
    assert ARTIFACT_GROUPS["vision"] == ("lora.vision", "vision.encoder", "vision.projector")
    assert ARTIFACT_GROUPS["speech"] == ("lora.speech", "audio.encoder", "audio.projector")


def test_tower_rows_written_at_placeholders(single):
    from phi4core.models.lora import InputMode

    mc, m = _model()
    m.eval()
    x, pix, aud = _batch(images_per_row=2, clips_per_row=1)
    tower_inputs = {"vision": {"image_pixel_values": pix}, "audio": {"audio_input_features": aud}}
    with torch.no_grad():
        emb = m._embed(x, None, InputMode.VISION_SPEECH, tower_inputs)  # [s, b, h]
        plain = m.embedding(input_ids=x, position_ids=None)
        vis = m.vision(input_mode=3, image_pixel_values=pix)
        audio = m.audio(input_mode=3, audio_input_features=aud)
    assert emb.shape == plain.shape
    rows_img = (x == IMG).sum(1).tolist()
    assert rows_img == [2 * TOKENS_PER_IMAGE] * 2
    for b in range(x.shape[0]):
        img_pos = (x[b] == IMG).nonzero().flatten()
        aud_pos = (x[b] == AUD).nonzero().flatten()
        n_img, n_aud = len(img_pos), len(aud_pos)
        assert torch.equal(emb[img_pos, b], vis[b * n_img:(b + 1) * n_img])
        assert torch.equal(emb[aud_pos, b], audio[b * n_aud:(b + 1) * n_aud])
        text = (x[b] != IMG) & (x[b] != AUD)
        assert torch.equal(emb[text, b], plain[text, b])
    # the vision+speech audio projector, not the speech one
    assert not torch.allclose(audio, m.audio(input_mode=2, audio_input_features=aud))


def test_sequence_parallel_slices_write_their_own_rows(single):
    """Under sequence parallelism each TP rank holds a slice of the sequence: writing each
    slice with its offset gives the slices of the whole."""
    from phi4core.models.multimodal import write_at_placeholders

    x, _, _ = _batch(images_per_row=2, rows=3)
    mask = x == IMG
    s, b, h = x.shape[1], x.shape[0], 6
    emb = torch.randn(s, b, h)
    rows = torch.randn(int(mask.sum()), h)
    whole = write_at_placeholders(emb, mask, rows)
    half = s // 2
    parts = [write_at_placeholders(emb[:half], mask, rows, 0),
             write_at_placeholders(emb[half:], mask, rows, half)]
    assert torch.equal(torch.cat(parts), whole)


def test_bad_inputs_are_clear_errors(single):
    mc, m = _model()
    x, pix, aud = _batch()
    with pytest.raises(ValueError, match="placeholder.*id 10.*but no image_pixel_values"):
        m(x, None, None, input_mode=1)
    with pytest.raises(ValueError, match=r"shape \(5, 96\) for 10 placeholder"):
        m(x, None, None, input_mode=1, image_pixel_values=pix[:1], audio_input_features=aud)
    with pytest.raises(ValueError, match="image_sizes given without image_pixel_values"):
        m(x, None, None, input_mode=1, image_sizes=torch.ones(2, 2))
    with pytest.raises(ValueError, match="input_mode 9"):
        m(x, None, None, input_mode=9, image_pixel_values=pix, audio_input_features=aud)
    from phi4core.models.multimodal import build_multimodal_model

    text_only = build_multimodal_model(mc, towers={})
    with pytest.raises(ValueError, match="this model has no vision tower"):
        text_only(x, None, None, input_mode=1, image_pixel_values=pix)


def test_language_mode_equals_the_decoder_bit_for_bit(single):
    from phi4core.models.decoder import build_model

    mc, m = _model()
    base = build_model(mc)
    base.load_state_dict({k: v for k, v in m.state_dict().items() if k in base.state_dict()})
    with torch.no_grad():  # adapters with values, so a wrong route would show
        for name, p in m.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    x = torch.randint(30, mc.vocab_size, (2, 16))
    m.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(m(x, None, None, input_mode=0), base(x, None, None))
    # training, every group trainable: the zero-weighted pass leaves the values alone
    m.train()
    base.train()
    assert torch.equal(m(x, None, None, labels=x, input_mode=0), base(x, None, None, labels=x))


def _grads_after(m, trainable, **forward):
    from _mm_helpers import gradient_kinds

    x = forward.pop("x")
    return gradient_kinds(m, trainable, x, **forward)


def test_vision_backward_reaches_exactly_the_trainable_groups_of_vision_sft(single):
    import yaml

    trainable = yaml.safe_load(open("recipes/vision_sft.yaml"))["trainable"]
    assert sorted(trainable) == ["lora.vision", "vision.encoder", "vision.projector"]
    mc, m = _model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    x, pix, _ = _batch(clips_per_row=0)
    got = _grads_after(m, trainable, x=x, input_mode=1, image_pixel_values=pix)
    assert got == {"backbone": "none", "lora.vision": "some", "lora.speech": "none",
                   "vision.encoder": "some", "vision.projector": "some",
                   "audio.encoder": "none", "audio.projector": "none"}


def test_zero_weighted_pass_gives_every_trainable_parameter_a_gradient(single):
    """A text-only batch in language mode, every multimodal group trainable: the groups it
    leaves out get exact zero gradients (what each data-parallel rank must reduce), the
    frozen backbone none."""
    mc, m = _model()
    trainable = ["lora.vision", "lora.speech", "vision.encoder", "vision.projector",
                 "audio.encoder", "audio.projector"]
    x = torch.randint(30, mc.vocab_size, (2, 12))
    got = _grads_after(m, trainable, x=x, input_mode=0)
    assert got == {"backbone": "none", **{g: "zero" for g in trainable}}
    # speech mode with audio: the vision+speech audio projector is idle, so zero too
    x, _, aud = _batch(images_per_row=0)
    got = _grads_after(m, trainable, x=x, input_mode=2, audio_input_features=aud)
    assert got["audio.encoder"] == got["lora.speech"] == "some"
    assert got["lora.vision"] == got["vision.encoder"] == "zero"
    assert m.audio.projector["vision"].weight.grad is not None
    assert not m.audio.projector["vision"].weight.grad.any()
    assert m.audio.projector["speech"].weight.grad.any()
    # evaluation: no pass at all
    m.eval()
    m.zero_grad(set_to_none=True)
    m(x, None, None, labels=x, input_mode=2, audio_input_features=aud).float().mean().backward()
    assert m.vision.encoder.weight.grad is None


def test_router_reselected_before_recomputation(single):
    """A later micro-batch's forward switches the router; the earlier one's backward (where
    recomputation reruns its layers) switches it back first."""
    mc, m = _model()
    m.train()
    x = torch.randint(30, mc.vocab_size, (1, 8))
    out_vision = m(x, None, None, labels=x, input_mode=1)
    m(x, None, None, labels=x, input_mode=2)
    assert m.lora_router.adapter == "speech"
    out_vision.float().sum().backward()
    assert m.lora_router.adapter == "vision"


def test_model_info_counts_the_tower_modules(single):
    """Tower rows come from the tower modules: their own parameter_counts() where they have
    one (the stand-in audio tower), else their two groups."""
    from phi4core.info import model_info

    mc = preset("phi4_multimodal_tiny")
    info = model_info(mc, towers=TOWERS)
    assert info["not_built"] == []
    h = mc.hidden_size
    vision_enc, vision_rest = 8 * 16 + 16, 16 + (16 * h + h) + (h * h + h)
    assert info["groups"]["vision.encoder"] == vision_enc
    assert info["groups"]["vision.projector"] == vision_rest
    rows = {r["name"]: (r["group"], r["parameters"]) for r in info["rows"]}
    assert rows["vision.encoder"] == ("vision.encoder", vision_enc)
    assert rows["audio.encoder"] == ("audio", 8 * 16 + 16)
    assert rows["audio.projector_vision_speech"] == ("audio", 16 * h + h)
    assert sum(r["parameters"] for r in info["rows"]) == info["total"]
    r_v, r_a = mc.lora_vision.rank, mc.lora_speech.rank
    per_layer_io = (h + (mc.num_attention_heads + 2 * mc.num_query_groups) * mc.kv_channels
                    + mc.num_attention_heads * mc.kv_channels + h
                    + h + 2 * mc.ffn_hidden_size + mc.ffn_hidden_size + h)
    assert info["groups"]["lora.vision"] == r_v * mc.num_layers * per_layer_io
    assert info["groups"]["lora.speech"] == r_a * mc.num_layers * per_layer_io
