"""Forward+backward tokens/s of the phi4core decoder (megatron-core, local spec) against
transformers' Phi3ForCausalLM of the same config and the same weights, measured in one run.

    OMP_NUM_THREADS=1 python bench/decoder_cpu.py [--preset phi4_mini_tiny] [--seconds 8]

Prints one JSON object; "ratio" = ours / transformers (higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _measure(step, seconds: float, warmup: int = 3) -> tuple[float, int]:
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds and n >= 3:
            return el / n, n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="phi4_mini_tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128,
                    help="128 > the tiny preset's original context: long LongRoPE factors")
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per model")
    ap.add_argument("--width-mult", type=int, default=1,
                    help="scale hidden, ffn and head counts (head dim kept) to see size effects")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    args = ap.parse_args(argv)

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

    tokens_per_step = args.batch * args.seq
    # Interleave the two measurements so that machine noise hits both alike.
    t_ref1, _ = _measure(step_ref, args.seconds / 2)
    t_ours1, _ = _measure(step_ours, args.seconds / 2)
    t_ref2, _ = _measure(step_ref, args.seconds / 2, warmup=1)
    t_ours2, _ = _measure(step_ours, args.seconds / 2, warmup=1)
    t_ours, t_ref = (t_ours1 + t_ours2) / 2, (t_ref1 + t_ref2) / 2
    out = {
        "bench": "decoder_cpu",
        "preset": mc.name,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "phi4core_tokens_per_s": round(tokens_per_step / t_ours, 1),
        "transformers_tokens_per_s": round(tokens_per_step / t_ref, 1),
        "ratio": round(t_ref / t_ours, 3),
        "logits_max_abs_diff": max_diff,
    }
    print(json.dumps(out))
    print(
        f"phi4core {out['phi4core_tokens_per_s']} tok/s vs transformers "
        f"{out['transformers_tokens_per_s']} tok/s: ratio {out['ratio']}x (fwd+bwd, {mc.name})",
        file=sys.stderr,
    )
    return out


if __name__ == "__main__":
    main()
