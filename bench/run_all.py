"""`make bench`: run every benchmark in this folder, each printing ratios against a reference."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "gpu_smoke.py"}  # gpu_smoke runs on a GPU node only


def main() -> None:
    only = set(sys.argv[1:])
    for script in sorted(HERE.glob("*.py")):
        if script.name in SKIP or (only and script.stem not in only):
            continue
        print(f"== {script.stem}", flush=True)
        # Each script parses sys.argv: give it its defaults, not this runner's script names.
        saved, sys.argv = sys.argv, [str(script)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        print(flush=True)


if __name__ == "__main__":
    main()
