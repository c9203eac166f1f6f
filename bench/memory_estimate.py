"""`phi4 plan --estimate`'s memory against a real bf16 training step on a GPU, at Phi-4-Mini's
layer width. Prints one JSON object per recomputation setting:
{"recompute", "estimated_bytes", "measured_bytes", "ratio": measured / estimated, "terms"}.

    python bench/memory_estimate.py [--layers 4] [--seq 4096] [--micro 1] [--vocab 200064]

Each setting runs `python -m phi4core.train.memory_probe --bf16` in its own process (the
trainer, megatron DDP and optimizer; two steps, the second measured with
torch.cuda.max_memory_allocated over its forward-backward). Without a CUDA GPU it prints
{"status": "skipped", ...} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def estimated(probe: dict) -> tuple[int, dict]:
    from orchestrator.config.schema import Recipe
    from orchestrator.estimate import estimate
    from phi4core.config import ModelConfig

    recipe = Recipe.model_validate({
        "name": "probe", "model": {"preset": "phi4_mini"}, "trainable": ["backbone"],
        "outputs": ["model"], "data": {"sources": [{"kind": "synthetic", "modality": "text"}]},
        "train": probe["train"], "parallel": {"recompute": probe["recompute"]},
        "precision": {"params": probe["precision"]},
        "resources": {"nodes": 1, "gpus_per_node": 1}})
    est = estimate(recipe, "h100-80gb", model=ModelConfig.model_validate(probe["model"]))
    step = {k: v for k, v in est.memory.items() if k not in ("weights", "gradients",
                                                              "optimizer")}
    return sum(step.values()), step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=200064)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA GPU"}))
        return 0
    for recompute in ("none", "selective", "full"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "probe.json"
            subprocess.run([sys.executable, "-m", "phi4core.train.memory_probe", str(out),
                            "--bf16", "--hidden", "3072", "--head-dim", "128",
                            "--layers", str(args.layers), "--vocab", str(args.vocab),
                            "--seq", str(args.seq), "--micro", str(args.micro),
                            "--recompute", recompute], check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            probe = json.loads(out.read_text())
        total, terms = estimated(probe)
        measured = probe["measured_forward_backward_bytes"]
        print(json.dumps({"recompute": recompute, "estimated_bytes": total,
                          "measured_bytes": measured, "ratio": round(measured / total, 3),
                          "terms": terms}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
