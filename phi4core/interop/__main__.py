"""Conversions from the command line (single process, or collectively under torchrun):

    python -m phi4core.interop hf-to-phi4 HF_DIR CKPT_DIR [--params-dtype fp32] [--tp N --pp N]
    python -m phi4core.interop phi4-to-hf SRC HF_DIR [--dtype bfloat16] [--merge-adapter vision]
    python -m phi4core.interop model-info PRESET

SRC: a phi4 checkpoint, a stage folder or a training checkpoint step_N. What cannot be
converted exits 2 with one line saying why. (The `phi4` CLI wires the same functions; this
entry point has the main guard that checkpoint saving needs, since its writer re-imports
__main__.)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phi4core.interop")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-phi4",
                       help="HF folder (Phi-3 or Phi-4-Multimodal) -> phi4core checkpoint")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--params-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b = sub.add_parser("phi4-to-hf", help="phi4core checkpoint -> HF folder")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (default: the source's)")
    b.add_argument("--merge-adapter", action="append", default=[], choices=["vision", "speech"],
                   help="fold this LoRA adapter into the base weights before the export")
    for p in (a, b):
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--pp", type=int, default=1)
    c = sub.add_parser("model-info", help="parameter counts of a preset")
    c.add_argument("preset")
    args = ap.parse_args(argv)

    from phi4core import exitcodes, runtime

    runtime.init()
    if args.cmd == "model-info":
        from phi4core.info import model_info

        print(json.dumps(model_info(args.preset), indent=2))
        return 0

    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf
    from phi4core.interop.hf import ConversionError
    from phi4core.parallel import ParallelSettings

    par = ParallelSettings(tp=args.tp, pp=args.pp)
    try:
        if args.cmd == "hf-to-phi4":
            out = hf_to_phi4(args.src, args.dst, params_dtype=args.params_dtype, parallel=par)
        else:
            out = phi4_to_hf(args.src, args.dst, dtype=args.dtype, parallel=par,
                             merge_adapters=tuple(args.merge_adapter))
    except ConversionError as err:
        print(f"cannot convert {args.src}: {err}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    print(out)
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
