"""The towers at TP=2 against TP=1 on CPU (gloo), run under torchrun with 2 processes by
tests/test_mm_towers.py:

    torchrun --nproc_per_node 2 tests/mp_towers_worker.py OUT_DIR

TP=1 (each rank a full replica): random tiny towers, their outputs on images of two crop
counts and on two clips (a batch with padding), and the gradients of a few replicated
parameters. TP=2: the same full weights loaded as shards, the same outputs and gradients.
Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import sys

import torch


def inputs():
    from phi4core.config import preset
    from phi4core.models.audio import extract_features
    from phi4core.models.hd_transform import process_images

    g = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (3, 300, 500), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 448, 448), generator=g, dtype=torch.uint8)]
    clips = [torch.randn(20_000, generator=g) * 0.1, torch.randn(9_000, generator=g) * 0.1]
    crop = preset("phi4_multimodal_tiny").vision.image_size
    return process_images(images, crop), extract_features(clips)


def run(towers, img, aud) -> dict:
    vision, audio = towers
    for t in towers:
        t.zero_grad(set_to_none=True)
    v = vision(img["image_pixel_values"], img["image_sizes"], img["image_attention_mask"])
    a = audio(aud["audio_input_features"], aud["audio_embed_sizes"],
              aud["audio_attention_mask"], mode="vision_speech")
    (v.square().mean() + a.square().mean()).backward()
    return {
        "vision": v.detach(), "audio": a.detach(),
        "grad_sub_GN": vision.sub_GN.grad.clone(),
        "grad_patch": vision.embeddings.patch_embedding.weight.grad.clone(),
        "grad_rel_bias": audio.encoder.relative_attention_bias_layer.bias_values.weight.grad
        .clone(),
    }


def build(mc):
    from phi4core.models.audio import AudioTower
    from phi4core.models.vision import VisionTower

    return VisionTower(mc.vision, mc.hidden_size), AudioTower(mc.audio, mc.hidden_size)


def main(out_dir: str) -> None:
    from phi4core import runtime
    from phi4core.config import preset
    from phi4core.models.tower_common import load_full_state_dict
    from phi4core.parallel import init_parallel

    runtime.init()
    mc = preset("phi4_multimodal_tiny")
    init_parallel(tp=1)
    torch.manual_seed(0)
    full = build(mc)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in full:
            for p in list(t.parameters()) + [b for b in t.buffers() if b.is_floating_point()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    states = [t.state_dict() for t in full]
    img, aud = inputs()
    ref = run(full, img, aud)

    init_parallel(tp=2)
    sharded = build(mc)
    for t, s in zip(sharded, states):
        load_full_state_dict(t, s)
    got = run(sharded, img, aud)

    result = {k: float((ref[k] - got[k]).abs().max()) for k in ref}
    result.update({f"{k}_scale": float(ref[k].abs().max()) for k in ref})
    result["vision_shape"] = list(got["vision"].shape)
    qkv = sharded[0].encoder.layers[0].self_attention.linear_qkv.weight
    result["qkv_shard_rows"] = qkv.shape[0]
    result["projector_fc1_shard_rows"] = sharded[1].projector_speech.linear_fc1.weight.shape[0]
    if torch.distributed.get_rank() == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
