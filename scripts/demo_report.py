"""What `make demo` ends with: per stage its loss, frozen check and held-out evaluations, and
where the lineage drawing, the metrics and the evaluations are.

    python scripts/demo_report.py STORE PIPELINE.yaml [LINEAGE.svg]

Reads the store only (torch-free): each stage's latest attempt, its published artifacts'
train_summary.json and frozen_checksums.json, and its evaluation.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from orchestrator.store import Store


def _artifact_files(stage_dir) -> tuple[dict | None, str]:
    """(train summary, what the frozen check found) from the first published artifact."""
    version = stage_dir.published_version()
    if version is None:
        return None, "-"
    for artifact in sorted(p for p in version.iterdir() if p.is_dir()):
        summary, sums = artifact / "train_summary.json", artifact / "frozen_checksums.json"
        if summary.is_file() and sums.is_file():
            checks = json.loads(sums.read_text())
            if not checks["after"]["groups"]:
                frozen = "none"
            else:
                frozen = "unchanged" if checks["before"] == checks["after"] else "CHANGED"
            return json.loads(summary.read_text()), frozen
    return None, "-"


def loss_ends(metrics: Path) -> tuple[float, float] | None:
    """Mean loss of the first and of the last tenth of a stage's steps (at least 5 each): one
    step's loss of a batch of 8 varies too much to show whether a stage learnt."""
    if not metrics.is_file():
        return None
    losses = []
    for line in metrics.read_text().splitlines():
        try:  # a line torn by a crash mid-write is skipped, not fatal to the report
            loss = json.loads(line).get("loss")
        except (ValueError, AttributeError):
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.append(loss)
    if not losses:
        return None
    n = max(5, len(losses) // 10)
    return sum(losses[:n]) / len(losses[:n]), sum(losses[-n:]) / len(losses[-n:])


def main(store_root: str, pipeline: str, lineage: str | None = None) -> int:
    store = Store(store_root, read_only=True)
    names = [Path(s).stem for s in yaml.safe_load(Path(pipeline).read_text())["stages"]]
    print("\nloss: the mean of the first and of the last tenth of a stage's steps")
    print(f"{'stage':<24} {'loss first -> last':<20} {'frozen':<9} held-out evaluations")
    folders = []
    for name in names:
        stage = store.latest(name)
        if stage is None:
            print(f"{name:<24} (not run)")
            continue
        folders.append(stage.path)
        summary, frozen = _artifact_files(stage)
        ends = loss_ends(stage.path / "metrics.jsonl")
        loss = f"{ends[0]:.3f} -> {ends[1]:.3f}" if ends else "-"
        record = stage.evaluation()
        figures = record.summary() if record else "-"
        print(f"{name:<24} {loss:<20} {frozen:<9} {figures}")
    root = Path(store_root)
    print()
    if lineage:
        print(f"lineage drawing: {lineage}")
    print(f"metrics:         {root}/stages/<stage>/<fingerprint>/metrics.jsonl")
    print(f"evaluations:     {root}/stages/<stage>/<fingerprint>/evaluation.json")
    print(f"artifacts:       {root}/stages/<stage>/<fingerprint>/artifacts/, in")
    for folder in folders:
        print(f"  {folder}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
