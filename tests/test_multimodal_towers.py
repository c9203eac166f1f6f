"""The multimodal model with its real (tiny) towers: the default builders, routing of the audio
projector by input_mode, gradients per stage's trainable groups, language mode = the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phi4core.config import preset

IMG, AUD = 10, 11  # placeholder ids of the tiny preset


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


@pytest.fixture(scope="module")
def model(single):
    from phi4core.models.multimodal import build_multimodal_model

    mc = preset("phi4_multimodal_tiny")
    m = build_multimodal_model(mc)  # the default builders: the real towers
    with torch.no_grad():  # adapters with values, so a wrong route would show
        for name, p in m.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    return mc, m


def _image_batch(seed=0):
    """Two token rows, each with one image (448 x 448 and 600 x 300) expanded to its count."""
    from phi4core.data.placeholders import expand_placeholders
    from phi4core.models.vision import process_images

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((448, 448),
                                                                           (300, 600))]
    inputs = process_images(images, preset("phi4_multimodal_tiny").vision.image_size)
    counts = inputs.pop("num_img_tokens").tolist()
    rows = [expand_placeholders([1, 20, IMG, 21, 22, 2], {IMG: [n]}).tolist() for n in counts]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return x, inputs


def _audio_batch(seed=0):
    from phi4core.data.placeholders import expand_placeholders
    from phi4core.models.audio import extract_features

    rng = np.random.default_rng(seed)
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 9000)]
    inputs = extract_features(clips)
    counts = inputs["audio_embed_sizes"].tolist()
    rows = [expand_placeholders([1, 30, AUD, 31, 2], {AUD: [n]}).tolist() for n in counts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows]), inputs


def _grad_state(m, trainable, x, **forward):
    from _mm_helpers import gradient_kinds

    return gradient_kinds(m, trainable, x, **forward)


def test_default_builders_are_the_real_towers(model):
    from phi4core.models.audio import AudioTower
    from phi4core.models.multimodal import default_tower_builders
    from phi4core.models.vision import VisionTower

    mc, m = model
    assert set(default_tower_builders(mc)) == {"vision", "audio"}
    assert isinstance(m.vision, VisionTower) and isinstance(m.audio, AudioTower)


def test_vision_backward_reaches_exactly_the_trainable_groups_of_vision_sft(model):
    """Through the real towers: the recipe's trainable groups get gradients, every parameter
    of each (the unused SigLIP tail is buffers, never a parameter), the others none."""
    import yaml

    trainable = yaml.safe_load(open("recipes/vision_sft.yaml"))["trainable"]
    mc, m = model
    x, inputs = _image_batch()
    got = _grad_state(m, trainable, x, input_mode=1, **inputs)
    assert got == {"backbone": "none", "lora.vision": "some", "lora.speech": "none",
                   "vision.encoder": "some", "vision.projector": "some",
                   "audio.encoder": "none", "audio.projector": "none"}


def test_audio_projector_follows_input_mode(model):
    """SPEECH runs the speech projector, VISION_SPEECH the vision+speech one; in training the
    other one gets an exact zero gradient (unused_parameters)."""
    mc, m = model
    x, inputs = _audio_batch()
    trainable = ["audio.encoder", "audio.projector", "lora.speech"]
    got = _grad_state(m, trainable, x, input_mode=2, **inputs)
    assert got["audio.encoder"] == got["lora.speech"] == "some"
    assert got["audio.projector"] == "some"  # both have a gradient: one of them zeros
    speech = [p.grad for p in m.audio.projector_speech.parameters()]
    other = [p.grad for p in m.audio.projector_vision_speech.parameters()]
    assert all(g is not None and g.any() for g in speech)
    assert all(g is not None and not g.any() for g in other)
    m.eval()
    with torch.no_grad():
        a = m.audio(input_mode=2, **inputs)
        b = m.audio(input_mode=3, **inputs)
        assert torch.equal(a, m.audio(mode="speech", **inputs))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="input_mode VISION"):
        m.audio(input_mode=1, **inputs)


def test_language_mode_equals_the_decoder_bit_for_bit(model):
    from phi4core.models.decoder import build_model

    mc, m = model
    base = build_model(mc)
    base.load_state_dict({k: v for k, v in m.state_dict().items() if k in base.state_dict()})
    x = torch.randint(30, mc.vocab_size, (2, 16))
    m.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(m(x, None, None, input_mode=0), base(x, None, None))
    m.train()
    base.train()
    assert torch.equal(m(x, None, None, labels=x, input_mode=0), base(x, None, None, labels=x))


def test_image_sizes_are_required(model):
    mc, m = model
    x, inputs = _image_batch()
    inputs.pop("image_sizes")
    with pytest.raises(ValueError, match="image_sizes is required"):
        m(x, None, None, input_mode=1, **inputs)


def test_towers_follow_the_decoder_dtype(single):
    """bf16 parameters: the towers are built in the decoder's dtype and cast their own float32
    processor outputs (a wrapper converts only positional inputs)."""
    from phi4core.config import Precision
    from phi4core.models.multimodal import build_multimodal_model

    mc = preset("phi4_multimodal_tiny")
    m = build_multimodal_model(mc, precision=Precision(params="bf16", fp8="off"))
    assert {p.dtype for p in m.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.audio.parameters()} == {torch.bfloat16}
    x, inputs = _image_batch()
    assert inputs["image_pixel_values"].dtype == torch.float32
    m.train()
    loss = m(x, None, None, labels=x, input_mode=1, **inputs).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and m.vision.projector.linear_fc1.weight.grad is not None
    x, inputs = _audio_batch()
    out = m(x, None, None, labels=x, input_mode=2, **inputs)
    assert torch.isfinite(out.float()).all()
