"""The image and speech towers of Phi-4-Multimodal: parameter counts, the HD transform and token
counts, log-Mel features, and outputs against transformers' own towers (one process, one
megatron import)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phi4core.config import preset

torchvision_ok = True
try:
    import torchvision  # noqa: F401  (made importable by phi4core.torchvision_compat)
except Exception:  # pragma: no cover - where it is not installed
    torchvision_ok = False
needs_torchvision = pytest.mark.skipif(not torchvision_ok, reason="torchvision not importable")

# Sizes (width, height) for the token counts: the reference's examples, padded images, tiny
# and extreme aspect ratios, and images needing more than 36 crops (aspect-ratio search).
SIZES = [
    (448, 448), (1344, 1344), (896, 448), (448, 896), (500, 300), (640, 480), (449, 449),
    (20, 20), (37, 1000), (1000, 37), (3000, 200), (200, 3000), (5000, 5000), (4000, 3000),
    (2688, 3136), (16000, 300), (1920, 1080), (1, 1),
]


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


@pytest.fixture(scope="module")
def tiny():
    return preset("phi4_multimodal_tiny")


def _image(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed + w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _clip(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed + n).standard_normal(n) * 0.1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Parameter counts (the reference table, full config, meta device)
# ---------------------------------------------------------------------------------------------


def test_tower_parameter_counts_match_reference(single):
    from phi4core.models.audio import AudioTower
    from phi4core.models.vision import VisionTower

    mc = preset("phi4_multimodal")
    with torch.device("meta"):
        vision = VisionTower(mc.vision, mc.hidden_size, perform_initialization=False)
        audio = AudioTower(mc.audio, mc.hidden_size, perform_initialization=False)
    assert vision.parameter_counts() == {
        "encoder_used": 398_085_280, "encoder_unused_tail": 30_480_160,
        "separators": 2_304, "projector": 12_982_272,
    }
    assert audio.parameter_counts() == {
        "conv_subsampling": 12_616_704, "relative_bias": 16_000,
        "conformer_blocks": 428_605_440, "projector_speech": 12_589_056,
        "projector_vision_speech": 12_589_056,
    }
    assert len(audio.encoder.encoders) == 24
    assert count_params(audio.encoder.encoders[0]) == 17_858_560
    # the tail is buffers (never trained), the 80-value normalisation buffers are carried
    assert not any(n.startswith("unused_tail") for n, _ in vision.named_parameters())
    buffers = dict(audio.named_buffers())
    assert buffers["encoder.encoder_embedding.global_mean"].shape == (80,)
    assert buffers["encoder.encoder_embedding.global_invstd"].shape == (80,)
    assert len(vision.encoder.layers) == 26  # layers 0-25 run; layer 26 is in the tail
    assert "encoder.layers.26.self_attn.q_proj.weight" in dict(vision.unused_tail.named_buffers())


def count_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_tiny_preset_keeps_the_released_transform_on_smaller_crops(tiny):
    """The tiny tower: the released patches, pooling and crop limit on 112-pixel crops (4x4
    tokens a crop), so an image is tens of tokens where the released model takes hundreds."""
    from phi4core.models.hd_transform import ImageGeometry, num_image_tokens

    vc = tiny.vision
    assert (vc.image_size, vc.patch_size, vc.pool, vc.max_crops) == (112, 14, 2, 36)
    assert vc.used_layers == vc.num_layers - 1 and vc.num_layers <= 4
    assert tiny.audio.num_blocks <= 4 and tiny.audio.time_reduction == 8
    # global view 4x4 + a separator a row, the global separator, one crop: 16 + 4 + 1 + 20
    assert ImageGeometry.of(vc).tokens(112, 112) == 41 == num_image_tokens(112, 112, crop=112)
    assert ImageGeometry.of(vc).tokens(224, 224) == 93  # 2x2 crops: 21 + 8x8 + 8
    assert ImageGeometry().tokens(448, 448) == 545


# ---------------------------------------------------------------------------------------------
# Image tokens and the HD transform
# ---------------------------------------------------------------------------------------------


def _reference_count(width: int, height: int, max_crops: int = 36) -> int:
    """The reference's rules, written out plainly (independent of phi4core's code)."""
    w, h = -(-width // 448), -(-height // 448)
    if w * h > max_crops:
        best, best_diff = None, None
        for n in range(1, max_crops + 1):  # in order of i*j
            for i in range(1, n + 1):
                if n % i:
                    continue
                j = n // i
                diff = abs(width / height - i / j)
                if best is None or diff < best_diff:
                    best, best_diff = (i, j), diff
                elif diff == best_diff and width * height > 0.5 * 448 * 448 * i * j:
                    best = (i, j)
        w, h = best
    # aspect-preserving fit into 448w x 448h, then white padding right or bottom
    if 448 * w / width < 448 * h / height:
        pad_w, pad_h = 0, 448 * h - int(height * (448 * w / width))
    else:
        pad_w, pad_h = 448 * w - int(width * (448 * h / height)), 0
    rows, cols = 32 * h - pad_h // 14, 32 * w - pad_w // 14  # unmasked patch rows/columns
    useful_h, useful_w = -(-rows // 2), -(-cols // 2)  # pooled 2x2: every other patch
    return 256 + 1 + 16 + useful_h * useful_w + useful_h


def test_num_image_tokens_reference_examples():
    from phi4core.models.vision import num_image_tokens

    assert num_image_tokens(448, 448) == 545
    assert num_image_tokens(1344, 1344) == 2625
    assert num_image_tokens(896, 448) == 801
    assert num_image_tokens(448, 896) == 817
    for w, h in [(1, 1), (2, 3), (3, 2), (4, 4), (6, 6), (1, 36), (36, 1)]:  # no padding
        assert num_image_tokens(448 * w, 448 * h) == 256 * w * h + 16 * h + 273
    # padding counts fewer tokens than the closed form, from the mask
    assert num_image_tokens(500, 300) < 256 * 2 * 1 + 16 + 273


@pytest.mark.parametrize("max_crops", [36, 9, 4])
def test_num_image_tokens_equals_rederivation(max_crops):
    from phi4core.models.vision import num_image_tokens

    sizes = SIZES + [(w, h) for w in (300, 700, 1500, 2900) for h in (250, 999, 2100)]
    for w, h in sizes:
        if w == h == 1:
            continue
        assert num_image_tokens(w, h, max_crops) == _reference_count(w, h, max_crops), (w, h)


def test_extreme_aspect_ratio_is_a_clear_error():
    from phi4core.models.hd_transform import num_image_tokens, plan

    with pytest.raises(ValueError, match="too extreme an aspect ratio"):
        num_image_tokens(100_000, 10)
    with pytest.raises(ValueError, match="must be positive"):
        plan(0, 10)


@needs_torchvision
def test_hd_transform_equals_the_processor():
    """Every output of transformers' Phi4MultimodalImageProcessor, bit for bit, per image and
    for a batch (zero crops pad the shorter image, their mask is 1)."""
    from transformers import Phi4MultimodalImageProcessor

    from phi4core.models.hd_transform import process_images
    from phi4core.models.vision import num_image_tokens

    proc = Phi4MultimodalImageProcessor()
    checked = 0
    for w, h in SIZES:
        img = _image(w, h)
        ref = proc(images=[img], return_tensors="pt")
        assert num_image_tokens(w, h) == int(ref["num_img_tokens"][0]), (w, h)
        if w * h > 3000 * 3000:
            continue  # counts only: the pixels of huge images are slow on 2 cores
        ours = process_images([img])
        for key in ("image_pixel_values", "image_sizes", "image_attention_mask",
                    "num_img_tokens"):
            assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), (w, h, key)
        checked += 1
    assert checked >= 12
    imgs = [_image(500, 300), _image(1344, 900), _image(448, 448)]
    ref = proc(images=imgs, return_tensors="pt")
    ours = process_images(imgs)
    for key in ("image_pixel_values", "image_sizes", "image_attention_mask", "num_img_tokens"):
        assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key


# ---------------------------------------------------------------------------------------------
# Speech features and tokens
# ---------------------------------------------------------------------------------------------


def test_num_audio_tokens_reference_examples():
    from phi4core.models.audio import num_audio_tokens
    from phi4core.models.audio_features import num_frames

    assert (num_frames(16000), num_audio_tokens(16000)) == (98, 13)
    assert (num_frames(480000), num_audio_tokens(480000)) == (2998, 375)
    assert num_audio_tokens(400) == 1 and num_audio_tokens(399) == 0


def test_log_mel_matches_feature_extractor():
    from transformers import Phi4MultimodalFeatureExtractor

    from phi4core.models.audio import extract_features, num_audio_tokens

    fe = Phi4MultimodalFeatureExtractor()
    for n in (400, 559, 16000, 37_920, 96_123, 160_000):
        clip = _clip(n)
        ref = fe(clip, sampling_rate=16000, return_tensors="pt")
        ours = extract_features([clip])
        assert ours["audio_input_features"].shape == ref["audio_input_features"].shape
        diff = (ours["audio_input_features"] - ref["audio_input_features"]).abs().max()
        assert diff <= 1e-4, (n, float(diff))
        assert num_audio_tokens(n) == int(ref["audio_embed_sizes"][0]) == math.ceil(
            ((n - 400) // 160 + 1) / 8)
    # digital silence sits on the log floor: log(max(0, 1)) = 0
    assert extract_features([np.zeros(16000, np.float32)])["audio_input_features"].abs().max() == 0
    # a batch: the same features on every real frame, the same mask and token counts
    clips = [_clip(16000, 1), _clip(23_456, 2), _clip(8000, 3)]
    ref = fe(clips, sampling_rate=16000, return_tensors="pt")
    ours = extract_features(clips)
    mask = ours["audio_attention_mask"]
    assert torch.equal(mask, ref["audio_attention_mask"])
    assert torch.equal(ours["audio_embed_sizes"], ref["audio_embed_sizes"])
    diff = (ours["audio_input_features"] - ref["audio_input_features"])[mask].abs().max()
    assert diff <= 1e-4
    # past a clip's end our frames are 0, as when each clip is featurised alone and padded
    assert ours["audio_input_features"][~mask].abs().max() == 0


def test_log_mel_rejects_bad_input():
    from phi4core.models.audio import extract_features, log_mel

    with pytest.raises(ValueError, match="16000 Hz"):
        extract_features([_clip(16000)], sampling_rate=8000)
    with pytest.raises(ValueError, match="at least 400 samples"):
        log_mel(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, 1000), np.float32))


# ---------------------------------------------------------------------------------------------
# The towers against transformers' (same random weights, eager attention, single clips)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_pair(single, tiny):
    import _mm_hf_helpers as H

    from phi4core.models.vision import VisionTower

    hf = H.hf_image_embedding(tiny)
    ours = VisionTower(tiny.vision, tiny.hidden_size).eval()
    H.load_exact(ours, H.vision_state_from_hf(hf.state_dict(), tiny, ours))
    return hf, ours


def _hf_image_embeds(hf, inputs, hidden, image_token_id):
    n = int(inputs["num_img_tokens"].sum())
    ids = torch.full((1, n), image_token_id)
    return hf(ids, torch.zeros(1, n, hidden), inputs["image_pixel_values"],
              inputs["image_sizes"], inputs["image_attention_mask"])[0]


def test_vision_tower_matches_transformers(vision_pair, tiny):
    from phi4core.models.hd_transform import process_images

    hf, ours = vision_pair
    cases = [[_image(448, 448)], [_image(500, 300)], [_image(900, 200)],
             [_image(700, 1000), _image(448, 448)]]  # padded crops, a batch of two
    with torch.no_grad():
        for images in cases:
            inputs = process_images(images, tiny.vision.image_size)
            ref = _hf_image_embeds(hf, inputs, tiny.hidden_size, tiny.image_token_id)
            got = ours(inputs["image_pixel_values"], inputs["image_sizes"],
                       inputs["image_attention_mask"])
            assert got.shape == (int(inputs["num_img_tokens"].sum()), tiny.hidden_size)
            assert (got - ref).abs().max() <= 1e-5, [im.size for im in images]


def test_vision_tower_runs_only_the_used_layers(vision_pair, tiny):
    """The comparison can fail: a used layer's weight changes the output, the tail's does not."""
    from phi4core.models.hd_transform import process_images

    _, ours = vision_pair
    inputs = process_images([_image(500, 300)], tiny.vision.image_size)
    args = (inputs["image_pixel_values"], inputs["image_sizes"], inputs["image_attention_mask"])
    with torch.no_grad():
        base = ours(*args)
        tail = dict(ours.unused_tail.named_buffers())
        saved = {k: v.clone() for k, v in tail.items()}
        for v in tail.values():
            v.add_(1.0)
        assert torch.equal(ours(*args), base)
        for k, v in tail.items():
            v.copy_(saved[k])
        w = ours.encoder.layers[-1].mlp.linear_fc2.bias
        w.add_(0.5)
        assert not torch.allclose(ours(*args), base)
        w.sub_(0.5)
        ours.sub_GN.add_(1.0)  # the separators sit between rows
        assert not torch.allclose(ours(*args), base)
        ours.sub_GN.sub_(1.0)


@pytest.fixture(scope="module")
def audio_pair(single, tiny):
    import _mm_hf_helpers as H

    from phi4core.models.audio import AudioTower

    hf = H.hf_audio_embedding(tiny)
    ours = AudioTower(tiny.audio, tiny.hidden_size).eval()
    H.load_exact(ours, H.audio_state_from_hf(hf.state_dict(), tiny, ours))
    return hf, ours


def test_audio_tower_matches_transformers(audio_pair, tiny):
    """Single clips (transformers only down-weights padded frames of a batch): short ones, and
    one of exactly ten 500-frame chunks after subsampling (400 s), in both projection modes."""
    from phi4core.models.audio import extract_features

    hf, ours = audio_pair
    with torch.no_grad():
        for n in (16000, 40_000, 400 * 16000):
            f = extract_features([_clip(n)])
            k = int(f["audio_embed_sizes"].sum())
            ids = torch.full((1, k), tiny.audio_token_id)
            for mode in ("speech", "vision_speech"):
                ref = hf(ids, torch.zeros(1, k, tiny.hidden_size), f["audio_input_features"],
                         f["audio_embed_sizes"], None, audio_projection_mode=mode)[0]
                got = ours(f["audio_input_features"], f["audio_embed_sizes"], None, mode=mode)
                assert got.shape == (k, tiny.hidden_size)
                assert (got - ref).abs().max() <= 1e-5, (n, mode)
    with pytest.raises(ValueError, match="projection mode"):
        ours(f["audio_input_features"], mode="vision")


# ---------------------------------------------------------------------------------------------
# Conformer behaviour
# ---------------------------------------------------------------------------------------------


def test_relative_bias_is_clipped_and_shifted(single, tiny):
    from phi4core.models.conformer import RelativeAttentionBias

    ac = tiny.audio
    rb = RelativeAttentionBias(ac)
    torch.nn.init.normal_(rb.bias_values.weight)
    m, length = ac.relative_attention_max_distance, 3 * ac.relative_attention_max_distance
    bias = rb(length)
    assert bias.shape == (1, ac.num_heads, length, length)
    w = rb.bias_values.weight
    for i, j in [(0, 0), (5, 2), (2, 5), (0, length - 1), (length - 1, 0), (10, 10 + m - 1),
                 (10 + m, 10)]:
        rel = min(max(j - i, -m), m - 1)
        assert torch.equal(bias[0, :, i, j], w[rel + m]), (i, j)
    assert rb.bias_values.num_embeddings == 2 * m


def test_conformer_convolution_is_causal(single, tiny):
    from phi4core.models.conformer import ConvModule

    torch.manual_seed(0)
    conv = ConvModule(tiny.audio)
    x = torch.randn(1, 20, tiny.audio.attention_dim)
    y = conv(x)
    x2 = x.clone()
    x2[:, 12] += torch.randn(tiny.audio.attention_dim)  # (a constant would vanish in LayerNorm)
    y2 = conv(x2)
    assert torch.equal(y[:, :12], y2[:, :12])  # the past does not see the future
    assert not torch.allclose(y[:, 12:15], y2[:, 12:15])  # kernel 3: t .. t+2 see t
    assert torch.equal(y[:, 15:], y2[:, 15:])


def test_padded_frames_are_masked_out(audio_pair):
    """A clip batched with a longer one gives what it gives alone: its padded frames are -inf
    keys (its frame count a multiple of 8, so the subsampling never reads padding)."""
    from phi4core.models.audio import extract_features

    _, ours = audio_pair
    short, long_ = _clip(400 + 159 * 160, 5), _clip(60_000, 6)  # 160 frames, 20 tokens
    with torch.no_grad():
        alone = extract_features([short])
        assert alone["audio_input_features"].shape[1] == 160
        a = ours(alone["audio_input_features"], alone["audio_embed_sizes"])
        both = extract_features([short, long_])
        b = ours(both["audio_input_features"], both["audio_embed_sizes"],
                 both["audio_attention_mask"])
        assert (b[:20] - a).abs().max() <= 1e-5
        # without the mask the padding leaks in: the check above can fail
        c = ours(both["audio_input_features"], both["audio_embed_sizes"], None)
        assert (c[:20] - a).abs().max() > 1e-3
        bias = ours.encoder.attention_bias(torch.tensor([[True, True, False]]))
        assert torch.isinf(bias[0, :, :, 2]).all() and torch.isfinite(bias[0, :, :, :2]).all()


def test_long_inputs_run_as_independent_chunks(audio_pair, tiny):
    _, ours = audio_pair
    enc = ours.encoder
    chunk = tiny.audio.chunk_frames
    frames = 8 * (chunk + 130)  # 630 subsampled frames: a full chunk and a padded one
    torch.manual_seed(1)
    x = torch.randn(1, frames, tiny.audio.num_mel_bins)
    with torch.no_grad():
        y, lengths = enc(x)
        assert y.shape[1] == chunk + 130 and int(lengths[0]) == chunk + 130
        x2 = x.clone()
        x2[:, 8 * chunk + 8:] *= 2.0  # only the second chunk's input changes
        y2, _ = enc(x2)
        assert torch.equal(y[:, : chunk - 1], y2[:, : chunk - 1])
        assert not torch.allclose(y[:, chunk + 2:], y2[:, chunk + 2:])
        # the first chunk equals the encoder run on its own frames
        y3, _ = enc(x[:, : 8 * chunk])
        assert (y3[:, : chunk - 1] - y[:, : chunk - 1]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (2 gloo processes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cpu_only  # full CPU initialisation split over ranks, gloo
def test_towers_tp2_match_tp1(tmp_path, tiny):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(root / "tests" / "mp_towers_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    # really split over the two ranks
    assert res["qkv_shard_rows"] == 3 * tiny.vision.hidden_size // 2
    assert res["projector_fc1_shard_rows"] == tiny.hidden_size // 2
    for key in ("vision", "audio", "grad_sub_GN", "grad_patch", "grad_rel_bias"):
        assert res[f"{key}_scale"] > 0  # a real output / gradient
        assert res[key] <= 1e-5 * max(1.0, res[f"{key}_scale"]), (key, res)  # float32 sums


def test_hd_transform_accepts_tensors_arrays_and_pil():
    from phi4core.models.hd_transform import hd_transform

    img = _image(500, 300)
    hwc = np.asarray(img)
    ref = hd_transform(img)["pixel_values"]
    assert torch.equal(hd_transform(hwc)["pixel_values"], ref)
    assert torch.equal(hd_transform(torch.from_numpy(hwc).permute(2, 0, 1).contiguous())
                       ["pixel_values"], ref)
    assert torch.equal(hd_transform(img.convert("L"))["pixel_values"][:, 0],
                       hd_transform(img.convert("L").convert("RGB"))["pixel_values"][:, 0])
    with pytest.raises(TypeError, match="uint8"):
        hd_transform(torch.zeros(3, 10, 10))


def test_towers_run_in_bf16(vision_pair, audio_pair, tiny):
    """Built in bf16 (the training precision) from the same weights, both towers stay close
    to fp32 and return bf16."""
    from phi4core.models.audio import AudioTower, extract_features
    from phi4core.models.hd_transform import process_images
    from phi4core.models.vision import VisionTower

    img = process_images([_image(500, 300)], tiny.vision.image_size)
    aud = extract_features([_clip(30_000)])
    v32, a32 = vision_pair[1], audio_pair[1]
    v16 = VisionTower(tiny.vision, tiny.hidden_size, dtype=torch.bfloat16).eval()
    a16 = AudioTower(tiny.audio, tiny.hidden_size, dtype=torch.bfloat16).eval()
    v16.load_state_dict(v32.state_dict())
    a16.load_state_dict(a32.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in list(v16.parameters()) + list(a16.parameters()))
    with torch.no_grad():
        for m32, m16, args in (
            (v32, v16, (img["image_pixel_values"], img["image_sizes"],
                        img["image_attention_mask"])),
            (a32, a16, (aud["audio_input_features"], aud["audio_embed_sizes"])),
        ):
            ref, got = m32(*args), m16(*args)
            assert got.dtype == torch.bfloat16
            rel = (got.float() - ref).norm() / ref.norm()
            assert rel < 0.05, float(rel)
