"""GPU smoke test of the decoder at Phi-4-mini width: bf16 tokens/s and model-FLOPs
utilisation, then FP8 through Transformer Engine where it is installed. Prints one JSON object.

    python bench/gpu_smoke.py [--layers 4] [--seq 4096] [--batch 1] [--steps 10]

Without a CUDA GPU it prints {"status": "skipped", ...} and exits 0 (nothing is imported
beyond torch). MFU uses the PaLM formula, 6 N + 12 L H S FLOPs per token (N: parameters
without the input embedding; non-causal attention), against the card's dense bf16 peak
(override with PHI4_PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 tensor-core peaks, TFLOP/s.
PEAKS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def _peak_tflops(name: str) -> float | None:
    env = os.environ.get("PHI4_PEAK_TFLOPS")
    if env:
        return float(env)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def _flops_per_token(mc, seq: int) -> float:
    L, H, V = mc.num_layers, mc.hidden_size, mc.vocab_size
    d_q = mc.num_attention_heads * mc.kv_channels
    d_kv = mc.num_query_groups * mc.kv_channels
    per_layer = H * (d_q + 2 * d_kv) + d_q * H + 3 * H * mc.ffn_hidden_size + 2 * H
    n = L * per_layer + H + V * H  # output projection counts even when tied
    return 6.0 * n + 12.0 * L * d_q * seq


def _run(mc, precision, args) -> dict:
    import torch

    from phi4core.models.decoder import build_model

    model = build_model(mc, None, precision)
    model.train()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        loss = model(x, None, None, labels=y).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq / dt
    peak = _peak_tflops(torch.cuda.get_device_name())
    achieved = _flops_per_token(mc, args.seq) * tok_s / 1e12
    out = {
        "status": "ok",
        "step_s": round(dt, 4),
        "tokens_per_s": round(tok_s, 1),
        "model_tflops_per_s": round(achieved, 1),
        "mfu": round(achieved / peak, 4) if peak else None,
        "loss": float(loss),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    return out  # the model dies with this frame; main() empties the cache between runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (Phi-4-mini has 32)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fp8-recipes", default="delayed,tensorwise")
    args = ap.parse_args(argv)

    import torch

    result: dict = {"bench": "gpu_smoke"}
    if not torch.cuda.is_available():
        result.update(
            status="skipped",
            reason="no CUDA GPU available (torch.cuda.is_available() is False): "
            "this smoke test needs a GPU node",
            torch=torch.__version__,
        )
        print(json.dumps(result))
        return 0

    from phi4core import runtime
    from phi4core.config import Precision, preset
    from phi4core.models import cpu_shims
    from phi4core.models.decoder import te_importable, use_transformer_engine
    from phi4core.parallel import init_single_process

    runtime.init()
    init_single_process()
    mc = preset("phi4_mini").model_copy(update={"num_layers": args.layers,
                                                "name": f"phi4_mini_{args.layers}l"})
    result.update(
        status="ok",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformer_engine=te_importable(),
        layer_spec="transformer_engine" if use_transformer_engine() else "local",
        cpu_shims_applied=cpu_shims.is_applied(),
        model=mc.name,
        seq=args.seq,
        batch=args.batch,
        flops_per_token=_flops_per_token(mc, args.seq),
        peak_tflops=_peak_tflops(torch.cuda.get_device_name()),
    )
    try:
        result["bf16"] = _run(mc, Precision(params="bf16"), args)
    except Exception as exc:  # report, do not hide
        result["bf16"] = {"status": "error", "error": repr(exc),
                          "trace": traceback.format_exc()[-2000:]}
    torch.cuda.empty_cache()
    fp8: dict = {}
    if not te_importable():
        fp8 = {"status": "skipped", "reason": "Transformer Engine is not importable"}
    else:
        for recipe in [r for r in args.fp8_recipes.split(",") if r]:
            try:
                prec = Precision(params="bf16", fp8="hybrid", fp8_recipe=recipe)
                fp8[recipe] = _run(mc, prec, args)
                torch.cuda.empty_cache()
                if result["bf16"].get("tokens_per_s"):
                    fp8[recipe]["speedup_vs_bf16"] = round(
                        fp8[recipe]["tokens_per_s"] / result["bf16"]["tokens_per_s"], 3
                    )
            except Exception as exc:
                fp8[recipe] = {"status": "error", "error": repr(exc),
                               "trace": traceback.format_exc()[-2000:]}
    result["fp8"] = fp8
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
