"""Training throughput of the tiny preset: the real entry point vs a bare loop, in one run.

`python -m phi4core train spec.json` (megatron DDP + optimizer + schedule, per-step metrics,
checkpoints) is measured from its own metrics.jsonl; the bare loop is build_model + plain
forward/backward + torch AdamW over the same shapes and micro-batching. Prints both
tokens/s (median step after warm-up) and their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 40, 5


def entry_point_tokens_per_s(work: Path) -> float:
    from phi4core.train.testing import tiny_spec, write_spec

    spec = tiny_spec(work, "bench", steps=STEPS, save_interval=20)
    path = write_spec(spec, work / "bench.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PHI4_CACHE": os.environ.get("PHI4_CACHE", str(work / "cache"))}
    with open(work / "bench.log", "w") as log:
        subprocess.run([sys.executable, "-m", "phi4core", "train", str(path)], cwd=REPO, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True, timeout=600)
    rows = [json.loads(x)
            for x in (Path(spec.stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[WARMUP:])


def bare_tokens_per_s() -> float:
    import torch

    from phi4core import runtime
    from phi4core.config import PRESETS, Precision
    from phi4core.models.decoder import build_model
    from phi4core.parallel import init_single_process

    runtime.init()
    init_single_process(seed=1234)
    mc = PRESETS["phi4_mini_tiny"]
    model = build_model(mc, None, Precision(params="fp32"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    gbs, mbs, seq = 4, 2, 128
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        opt.zero_grad()
        for _ in range(gbs // mbs):
            tokens = torch.randint(3, mc.vocab_size, (mbs, seq + 1), generator=g)
            pos = torch.arange(seq).expand(mbs, seq)
            loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean() / (gbs // mbs)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return gbs * seq / statistics.median(times[WARMUP:])


def main() -> None:
    torch_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="phi4-bench-") as tmp:
        real = entry_point_tokens_per_s(Path(tmp))
    bare = bare_tokens_per_s()
    print(f"tiny preset, seq 128, global batch 4 (micro 2), OMP_NUM_THREADS={torch_threads}")
    print(f"python -m phi4core train : {real:9.0f} tokens/s")
    print(f"bare loop                : {bare:9.0f} tokens/s")
    print(f"ratio (entry point / bare): {real / bare:.2f}")


if __name__ == "__main__":
    main()
