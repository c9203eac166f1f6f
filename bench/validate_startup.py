"""`phi4 validate` on the nine-stage pipeline vs a bare interpreter start, in one run.

Prints both wall times (best of N) and their ratio: what the orchestrator adds on top of
Python's own start-up.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = 7


def best_of(argv: list[str], runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    bare = best_of([sys.executable, "-c", "pass"])
    validate = best_of([sys.executable, "-m", "orchestrator.cli", "validate",
                        "pipelines/phi4_multimodal.yaml"])
    tiny = best_of([sys.executable, "-m", "orchestrator.cli", "validate",
                    "pipelines/phi4_multimodal.yaml", "--profile", "tiny"])
    print(f"bare interpreter start      {bare * 1000:8.1f} ms")
    print(f"phi4 validate (9 stages)    {validate * 1000:8.1f} ms   {validate / bare:5.1f}x bare")
    print(f"  ... with --profile tiny   {tiny * 1000:8.1f} ms   {tiny / bare:5.1f}x bare")


if __name__ == "__main__":
    main()
