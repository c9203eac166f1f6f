"""Speech loader throughput against the tiny model's consumption rate, in one run.

    OMP_NUM_THREADS=1 python bench/speech_loader.py [--workers N] [--steps 30] [--clips 200]

A synthetic speech corpus (0.5-3 s clips) is prepared with `phi4 data prepare-speech`, raw and
with precomputed features, and read as a `{kind: lhotse}` source through the trainer's own
loader (`StepBatches` + `MultimodalCollator`: chats tokenised, fbank computed in the loader
workers) with the recipe's batch sizes and worker count (recipes/speech_post_train.yaml with
the tiny profile; `--workers` overrides). The model side is `python -m phi4core train` on the
same source and batches (the tiny multimodal preset, the recipe's trainable groups), read from
its metrics.jsonl (median step after warm-up). "ahead" = loader samples/s / model samples/s:
above 1 the model bounds a step, below 1 the data does. Prints one JSON object, then one line
per loader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As the trainer: one thread per process (tiny tensors on shared cores; else ~25x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
WARMUP = 5


def recipe_settings() -> dict:
    from orchestrator.config.loader import load_recipe

    recipe = load_recipe(REPO / "recipes" / "speech_post_train.yaml", profile="tiny").recipe
    t = recipe.train
    return {"global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "seq_length": t.seq_length, "num_workers": recipe.data.num_workers,
            "trainable": list(recipe.trainable), "frozen": list(recipe.frozen)}


def loader_samples_per_s(corpus: Path, cfg: dict, workers: int, steps: int, cache: Path) -> float:
    from phi4core.data.multimodal import MultimodalCollator, MultimodalSamples
    from phi4core.data.speech import SpeechDataset
    from phi4core.data.tokenizer import get_demo_tokenizer
    from phi4core.train.data import StepBatches

    tok = get_demo_tokenizer(cache)
    gbs, mbs = cfg["global_batch_size"], cfg["micro_batch_size"]
    ds = SpeechDataset(corpus, tok, cfg["seq_length"], task="qa")
    samples = MultimodalSamples([ds], [1.0], group=mbs, num_samples=(steps + WARMUP) * gbs,
                                seed=1)
    batches = StepBatches(samples, 0, steps + WARMUP, gbs, mbs, 0, 1, block_mask=False,
                          num_workers=workers, collate=MultimodalCollator(cfg["seq_length"],
                                                                          tok.pad_id))
    for _ in range(WARMUP):  # workers started, first batches read
        batches.next_step()
    began = time.perf_counter()
    for _ in range(steps):
        batches.next_step()
    elapsed = time.perf_counter() - began
    batches.close()
    return steps * gbs / elapsed


def model_samples_per_s(corpus: Path, cfg: dict, workers: int, steps: int, work: Path) -> float:
    from phi4core.train.testing import tiny_multimodal_spec, write_spec

    data = {"sources": [{"kind": "lhotse", "path": str(corpus), "task": "qa"}],
            "num_workers": workers}
    spec = tiny_multimodal_spec(work, "speech_bench", "audio", trainable=cfg["trainable"],
                                outputs=["speech"], frozen=cfg["frozen"], data=data,
                                steps=steps + WARMUP, save_interval=10 ** 6,
                                global_batch_size=cfg["global_batch_size"],
                                micro_batch_size=cfg["micro_batch_size"],
                                seq_length=cfg["seq_length"])
    path = write_spec(spec, work / "speech_bench.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": str(work / "cache")}
    with open(work / "train.log", "w") as log:
        subprocess.run([sys.executable, "-m", "phi4core", "train", str(path)], cwd=REPO, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900)
    rows = [json.loads(x)
            for x in (Path(spec.stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return cfg["global_batch_size"] / statistics.median(r["step_time_s"] for r in rows[WARMUP:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None,
                    help="loader processes (default: the recipe's data.num_workers)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--clips", type=int, default=200)
    args = ap.parse_args()

    from phi4core import runtime
    from phi4core.train.testing import synthetic_speech_corpus

    runtime.init()
    cfg = recipe_settings()
    workers = cfg["num_workers"] if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="phi4_speech_bench_") as tmp:
        work = Path(tmp)
        raw = synthetic_speech_corpus(work / "raw", args.clips, seed=0)
        pre = synthetic_speech_corpus(work / "pre", args.clips, seed=0, features=True)
        loaders = {"fbank in the loader": loader_samples_per_s(raw, cfg, workers, args.steps,
                                                               work / "cache"),
                   "precomputed features": loader_samples_per_s(pre, cfg, workers, args.steps,
                                                                work / "cache")}
        model = model_samples_per_s(raw, cfg, workers, args.steps, work)
    out = {"workers": workers, "global_batch_size": cfg["global_batch_size"],
           "micro_batch_size": cfg["micro_batch_size"], "model_samples_per_s": round(model, 2),
           "loaders": {k: {"samples_per_s": round(v, 2), "ahead": round(v / model, 2)}
                       for k, v in loaders.items()}}
    print(json.dumps(out))
    print(f"tiny model (speech_post_train, tiny profile): {model:.1f} samples/s")
    for name, v in loaders.items():
        print(f"speech loader, {name}, {workers} workers: {v:.1f} samples/s = "
              f"{v / model:.1f}x the model's rate")


if __name__ == "__main__":
    main()
