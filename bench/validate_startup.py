"""`phi4 validate` on the nine-stage pipeline vs the imports it cannot avoid, in one run.

The floor is `python -c "import pydantic, omegaconf, yaml, click"`: the libraries the recipe
language is built on. What `validate` adds on top of that floor is the orchestrator's own
start-up cost. The commands run interleaved (one of each per round) so that load on a shared
machine hits them alike; each figure is the best of N rounds. Printed for context: a bare
interpreter start, and the floor plus one pydantic model defined and validated (`import
pydantic` alone loads neither BaseModel's machinery nor the plugin discovery that building a
validator runs, which every recipe check pays).

phi4's own modules are byte-compiled first, as `pip install` leaves them: the libraries of the
floor come with their bytecode, and a shell with PYTHONDONTWRITEBYTECODE set would otherwise
time the compiler on every run of `validate` only.
"""

from __future__ import annotations

import argparse
import compileall
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "pipelines/phi4_multimodal.yaml"

COMMANDS = {
    "bare": [sys.executable, "-c", "pass"],
    "floor": [sys.executable, "-c", "import pydantic, omegaconf, yaml, click"],
    "one_model": [sys.executable, "-c", "import pydantic, omegaconf, yaml, click\n"
                  "class M(pydantic.BaseModel):\n    x: int\nM(x=1)"],
    "validate": [sys.executable, "-m", "orchestrator.cli", "validate", PIPELINE],
    "tiny": [sys.executable, "-m", "orchestrator.cli", "validate", PIPELINE,
             "--profile", "tiny"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def best_of_interleaved(runs: int) -> dict[str, float]:
    """Best wall time of each command over `runs` rounds, one run of every command per round."""
    best = {name: float("inf") for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the file cache and .pyc files first
        wall(argv)
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            best[name] = min(best[name], wall(argv))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="rounds (best of N)")
    args = parser.parse_args()
    for package in ("orchestrator", "phi4core"):
        compileall.compile_dir(REPO / package, quiet=1)
    best = best_of_interleaved(args.runs)
    floor, bare = best["floor"], best["bare"]
    print(f"{'bare interpreter start':<36} {bare * 1000:8.1f} ms")
    print(f"{'floor: pydantic+omegaconf+yaml+click':<36} {floor * 1000:8.1f} ms   "
          f"{floor / bare:5.2f}x bare")
    for name, label in (("one_model", "floor + one pydantic model"),
                        ("validate", "phi4 validate (9 stages)"),
                        ("tiny", "  ... with --profile tiny")):
        t = best[name]
        print(f"{label:<36} {t * 1000:8.1f} ms   {t / floor:5.2f}x floor   "
              f"{t / bare:5.2f}x bare")


if __name__ == "__main__":
    main()
