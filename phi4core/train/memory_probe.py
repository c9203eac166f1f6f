"""Measure one real training step's peak memory, for checking `phi4 plan --estimate`.

`python -m phi4core.train.memory_probe OUT.json [--bf16] [--hidden H] [--seq S] [--micro B]
[--recompute none|selective|full]` builds the trainer (phi4core.train.loop.Trainer, megatron
DDP and optimizer) on a decoder of the given size and runs two optimizer steps of one
micro-batch each. The second step is measured, so that Adam's lazily created moments already
exist, as they do in every step but the first:

- on a GPU: torch.cuda.max_memory_allocated() over the step, minus what was allocated before it;
- on a CPU: the peak resident set size over the step (Linux VmHWM, reset through
  /proc/self/clear_refs just before it), minus the resident size before it. Tensors of this
  size are mmapped by glibc and given back when freed, so resident memory follows the live
  tensors; the allocator's small-block pools and any kernel workspace count too.

One setting per process: memory a previous trainer freed would stay resident and hide the
next one's peak. It writes {"measured_step_bytes", "state_bytes" (parameters and gradient
buffers as built), "model": the ModelConfig, "train": the Train section, "precision",
"recompute"} for the caller to compare with the estimator's terms.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from phi4core.config import PRESETS, StageSpec


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (Linux >= 4.0)


def probe_model(hidden: int, layers: int, vocab: int) -> dict:
    """A Phi-4-shaped decoder (GQA 3:1, SwiGLU 8/3 x, tied embeddings) of the given size."""
    base = PRESETS["phi4_mini_tiny"].model_dump()
    heads = max(3, hidden // 32)
    heads -= heads % 3
    return {**base, "name": "probe", "hidden_size": hidden, "ffn_hidden_size": 8 * hidden // 3,
            "num_layers": layers, "num_attention_heads": heads, "num_query_groups": heads // 3,
            "kv_channels": hidden // heads, "vocab_size": vocab, "rope_scaling": None}


def _measure(spec: StageSpec, args, on_gpu: bool) -> dict:
    from phi4core.train.loop import Trainer

    trainer = Trainer(spec)
    trainer.setup()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (args.micro, args.seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(args.micro, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.micro, -1)}
    trainer.train_step(0, [batch])
    gc.collect()
    if on_gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
        _reset_hwm()
    trainer.train_step(1, [batch])
    if on_gpu:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        measured = _hwm_bytes() - before
    params = [p for c in trainer.raw_chunks for p in c.parameters()]
    state = sum(p.numel() * p.element_size() for p in params)
    state += sum(p.main_grad.numel() * p.main_grad.element_size() for p in params
                 if getattr(p, "main_grad", None) is not None)
    return {"measured_step_bytes": measured, "state_bytes": state}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    model = probe_model(args.hidden, args.layers, args.vocab)
    train = dict(steps=2, global_batch_size=args.micro, micro_batch_size=args.micro,
                 seq_length=args.seq, lr=1e-4, warmup_steps=0, schedule="constant")
    precision = "bf16" if args.bf16 else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        spec = StageSpec.model_validate({
            "name": "probe", "fingerprint": "probe", "model": model, "tokenizer": "demo",
            "outputs": ["model"], "trainable": ["backbone"], "frozen": [],
            "data": {"sources": [{"kind": "synthetic", "modality": "text", "samples": 64}]},
            "train": train, "parallel": {"recompute": args.recompute},
            "precision": {"params": precision},
            "logging": {"interval": 1, "tensorboard": False},
            "stage_dir": str(Path(tmp) / "stage"), "output_dir": str(Path(tmp) / "out")})
        measured = _measure(spec, args, on_gpu)
    Path(args.out).write_text(json.dumps({
        "device": "cuda" if on_gpu else "cpu", **measured, "model": model, "train": train,
        "precision": precision, "recompute": args.recompute}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
