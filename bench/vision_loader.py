"""Vision loader throughput (energon + HD transform in the workers) against the tiny model's
consumption rate, measured in the same run: does data or compute bound a vision step?

    OMP_NUM_THREADS=1 python bench/vision_loader.py [--samples 96] [--workers 0,2]
        [--seq-length 256] [--micro 4]

The corpus: random-pixel PNGs of several sizes and aspect ratios (one to several of the tiny
tower's 112-pixel HD crops, in the tiny profile's 256-token sequences), captions through
`pack_images`. The loader is the trainer's
`VisionStream` (shuffling, tokenising, placeholder expansion, HD transform and collation of
micro-batches of `--micro`), timed over `--samples` samples after its first batch (start-up
excluded, reported apart). The model is phi4_multimodal_tiny with every tower trainable:
forward + backward + AdamW on the very batches the loader made, in vision mode (the
consumption rate of a tiny vision stage). "ahead" = loader samples/s / model samples/s; the
loaders should keep at least 3x ahead. Prints one JSON object, then one human line per worker
count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SIZES = [(100, 40), (64, 48), (200, 90), (150, 150), (90, 210), (300, 120)]


def make_dataset(folder: Path, n: int, seq_length: int, vision) -> Path:
    import numpy as np

    from phi4core.data.media_files import write_png
    from phi4core.data.pack_images import pack_images
    from phi4core.models.hd_transform import ImageGeometry

    fits = [s for s in SIZES if ImageGeometry.of(vision).tokens(*s) <= seq_length - 40]
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n):
            w, h = fits[i % len(fits)]
            write_png(images / f"{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            f.write(json.dumps({"image": f"{i}.png", "caption": f"shape {i % 7} of {w}x{h}"})
                    + "\n")
    return pack_images(images, folder / "captions.jsonl", folder / "ds", shard_size=32).out


def loader_rate(ds: Path, tokenizer, vision, workers: int, samples: int, seq: int,
                micro: int) -> tuple[float, float, list]:
    from phi4core.data.vision_loader import VisionStream

    stream = VisionStream([str(ds)], [1.0], tokenizer, seq, micro, vision=vision,
                          num_workers=workers, seed=1)
    t0 = time.perf_counter()
    batches = [stream.next()]
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    while sum(len(b["sources"]) for b in batches[1:]) < samples:
        batches.append(stream.next())
    rate = sum(len(b["sources"]) for b in batches[1:]) / (time.perf_counter() - t1)
    stream.close()
    return rate, first, batches


def model_rate(batches: list, mc) -> float:
    import torch

    from phi4core.config import Precision
    from phi4core.data.multimodal import MEDIA_KEYS
    from phi4core.models.multimodal import build_multimodal_model
    from phi4core.parallel import init_single_process

    init_single_process(seed=1234)
    model = build_multimodal_model(mc, None, Precision(params="fp32"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> None:
        opt.zero_grad()
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       input_mode=int(batch["input_mode"]), **media)
        ((losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).backward()
        opt.step()

    step(batches[0])  # warm-up: allocator, autograd caches
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return sum(len(b["sources"]) for b in batches[1:]) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")

    from phi4core import runtime
    from phi4core.config import PRESETS
    from phi4core.data.tokenizer import get_demo_tokenizer

    runtime.init()
    mc = PRESETS["phi4_multimodal_tiny"]
    cache = os.environ.get("PHI4_CACHE", str(Path.home() / ".cache" / "phi4"))
    tokenizer = get_demo_tokenizer(cache)
    results = []
    with tempfile.TemporaryDirectory(prefix="phi4-bench-vision-") as tmp:
        ds = make_dataset(Path(tmp), max(64, args.samples // 2), args.seq_length, mc.vision)
        model_sps = None
        for workers in (int(w) for w in args.workers.split(",")):
            rate, first, batches = loader_rate(ds, tokenizer, mc.vision, workers, args.samples,
                                               args.seq_length, args.micro)
            if model_sps is None:  # the same batches for the model, once
                model_sps = model_rate(batches, mc)
            results.append({"workers": workers, "loader_samples_per_s": round(rate, 2),
                            "first_batch_s": round(first, 2),
                            "ahead": round(rate / model_sps, 2)})
    out = {"bench": "vision_loader", "omp_threads": threads, "seq_length": args.seq_length,
           "micro_batch": args.micro, "model_samples_per_s": round(model_sps, 2),
           "loaders": results}
    print(json.dumps(out))
    print(f"tiny model (vision mode, fwd+bwd+AdamW): {model_sps:.1f} samples/s")
    for r in results:
        verdict = "keeps >= 3x ahead" if r["ahead"] >= 3 else "does NOT keep 3x ahead"
        print(f"loader, {r['workers']} workers: {r['loader_samples_per_s']:.1f} samples/s "
              f"(first batch {r['first_batch_s']:.1f} s), {r['ahead']:.2f}x the model: {verdict}")


if __name__ == "__main__":
    main()
