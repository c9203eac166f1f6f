"""Forward+backward tokens/s of the phi4core decoder (megatron-core, local spec) against
transformers' Phi3ForCausalLM of the same config and the same weights, measured in one run.

    OMP_NUM_THREADS=1 python bench/decoder_cpu.py [--preset phi4_mini_tiny] [--seconds 8]
        [--rounds 16] [--width-mult 4 --layers 4]

The two models run in alternating short rounds (the order flips every round), so load from
other processes hits both alike; the figure is the median of the per-round ratios, with their
spread (min, quartiles, max). "cpu_time_ratio" is the same from this process's CPU time,
which waiting for a busy core does not inflate (the steadier figure on a shared machine with
one thread). Set-up is the trainer's: ``phi4core.runtime.init()`` first.
Prints one JSON object; "ratio" = ours / transformers in tokens/s (higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(step, n: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per step over n steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _spread(values: list[float]) -> dict:
    return {
        "min": round(min(values), 3),
        "p25": round(_quantile(values, 0.25), 3),
        "p75": round(_quantile(values, 0.75), 3),
        "max": round(max(values), 3),
    }


def interleaved(step_ours, step_ref, seconds: float, rounds: int) -> dict:
    """Per-round seconds/step of both models, alternating which goes first."""
    for _ in range(3):  # warm-up: allocator, autograd graph caches
        step_ours()
        step_ref()
    per_step = max(_timed(step_ours, 2)[0], _timed(step_ref, 2)[0])
    steps = max(1, round(seconds / rounds / per_step))
    ours, ref = [], []
    for r in range(rounds):
        if r % 2:
            ours.append(_timed(step_ours, steps))
            ref.append(_timed(step_ref, steps))
        else:
            ref.append(_timed(step_ref, steps))
            ours.append(_timed(step_ours, steps))
    return {
        "ours": [w for w, _ in ours],
        "ref": [w for w, _ in ref],
        "ratios": [r[0] / o[0] for o, r in zip(ours, ref)],
        # CPU time is what other processes disturb least (waiting for a core costs none of it).
        "cpu_ratios": [r[1] / o[1] for o, r in zip(ours, ref)],
        "steps_per_round": steps,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="phi4_mini_tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128,
                    help="128 > the tiny preset's original context: long LongRoPE factors")
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per model")
    ap.add_argument("--rounds", type=int, default=32,
                    help="alternating rounds the measuring time is split into")
    ap.add_argument("--width-mult", type=int, default=1,
                    help="scale hidden, ffn and head counts (head dim kept) to see size effects")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    from phi4core import runtime

    runtime.init()

    import torch
    import torch.nn.functional as F
    from transformers import Phi3ForCausalLM

    from phi4core.config import preset
    from phi4core.interop.hf import save_hf
    from phi4core.models.decoder import build_model
    from phi4core.parallel import init_single_process

    torch.manual_seed(0)
    init_single_process()
    mc = preset(args.preset)
    w = args.width_mult
    if w != 1 or args.layers:
        mc = mc.model_copy(update={
            "hidden_size": mc.hidden_size * w, "ffn_hidden_size": mc.ffn_hidden_size * w,
            "num_attention_heads": mc.num_attention_heads * w,
            "num_query_groups": mc.num_query_groups * w,
            "num_layers": args.layers or mc.num_layers,
            "name": f"{mc.name}_w{w}_l{args.layers or mc.num_layers}",
        })
    ours = build_model(mc)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d, mc)
        ref = Phi3ForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    ref.train()
    ours.train()

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step_ours():
        logits = ours(x, None, None)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
        ours.zero_grad(set_to_none=True)

    def step_ref():
        logits = ref(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
        ref.zero_grad(set_to_none=True)

    with torch.no_grad():
        ref_logits = ref(input_ids=x, use_cache=False).logits
        max_diff = (ours(x, None, None) - ref_logits).abs().max().item()

    m = interleaved(step_ours, step_ref, args.seconds, args.rounds)
    tokens_per_step = args.batch * args.seq
    ratios = m["ratios"]
    out = {
        "bench": "decoder_cpu",
        "preset": mc.name,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps_per_round": m["steps_per_round"],
        "phi4core_tokens_per_s": round(tokens_per_step / statistics.median(m["ours"]), 1),
        "transformers_tokens_per_s": round(tokens_per_step / statistics.median(m["ref"]), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_spread": _spread(ratios),
        "cpu_time_ratio": round(statistics.median(m["cpu_ratios"]), 3),
        "cpu_time_ratio_spread": _spread(m["cpu_ratios"]),
        "logits_max_abs_diff": max_diff,
    }
    print(json.dumps(out))
    s = out["ratio_spread"]
    print(
        f"phi4core {out['phi4core_tokens_per_s']} tok/s vs transformers "
        f"{out['transformers_tokens_per_s']} tok/s: ratio {out['ratio']}x median of "
        f"{args.rounds} rounds (spread {s['min']}-{s['max']}, quartiles {s['p25']}-{s['p75']}); "
        f"CPU-time ratio {out['cpu_time_ratio']}x (fwd+bwd, {mc.name})",
        file=sys.stderr,
    )
    return out


if __name__ == "__main__":
    main()
