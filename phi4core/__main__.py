"""`python -m phi4core train SPEC.json` (plain python or under torchrun/srun), and the
one-process stages `python -m phi4core eval SPEC.json` / `export SPEC.json`.

The main guard matters: megatron's checkpoint writer spawns a process that re-imports __main__.
"""

from __future__ import annotations

import argparse
import logging
import sys

from phi4core import exitcodes, runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi4core")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one stage from its StageSpec JSON")
    train.add_argument("spec", help="path to the stage spec (JSON)")
    for kind, what in (("eval", "evaluate the base and the trained model (an eval stage)"),
                       ("export", "export a fine-tuned adapter (an export stage)")):
        sub.add_parser(kind, help=what).add_argument("spec", help="path to the stage spec")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime.init()
    from pydantic import ValidationError

    if args.command != "train":
        return _tool_stage(args.command, args.spec)

    from phi4core.train.loop import load_spec

    try:
        spec = load_spec(args.spec)
    except (OSError, ValueError, ValidationError) as e:
        print(f"bad stage spec {args.spec}: {e}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    from phi4core.train.loop import run
    from phi4core.train.trackers import TrackerMissing

    try:
        return run(spec)
    except TrackerMissing as e:  # a setup problem, said in one line: no traceback
        print(f"stage {spec.name}: {e}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    except Exception:
        logging.getLogger("phi4core.train").exception("stage %s failed", spec.name)
        return exitcodes.FAILURE
    finally:
        from phi4core.parallel import destroy_parallel

        try:
            destroy_parallel()
        except Exception:
            pass


def _tool_stage(kind: str, path: str) -> int:
    from pathlib import Path

    from pydantic import ValidationError

    from phi4core.config import ToolSpec

    try:
        spec = ToolSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as e:
        print(f"bad stage spec {path}: {e}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    if spec.kind != kind:
        print(f"{path} is the spec of a {spec.kind} stage, not {kind}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    if kind == "eval":
        from phi4core.finetune.evaluate import run
    else:
        from phi4core.finetune.export import run
    try:
        return run(spec)
    except Exception:
        logging.getLogger("phi4core.finetune").exception("stage %s failed", spec.name)
        return exitcodes.FAILURE


if __name__ == "__main__":
    sys.exit(main())
