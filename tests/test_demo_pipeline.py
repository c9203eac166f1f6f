"""`make demo`'s training part: the tiny phi4_mini pipeline trains both stages, then skips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def phi4(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def losses(store: Path, stage: str) -> list[float]:
    (metrics,) = (store / "stages" / stage).glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_phi4_mini_pipeline_trains_then_is_up_to_date(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(tmp_path / "cache")}
    store = tmp_path / "store"
    first = phi4("run", "pipelines/phi4_mini.yaml", "--profile", "tiny", "--store", str(store),
                 env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("text_pretrain", "text_post_train"):
        curve = losses(store, stage)
        assert len(curve) == 40
        start, end = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert end < 0.7 * start, (stage, start, end)
        (artifact,) = (store / "stages" / stage).glob("*/artifacts/model")
        assert (artifact / "phi4_model.json").is_file()
        assert (artifact.parent / "manifest.json").is_file()

    second = phi4("run", "pipelines/phi4_mini.yaml", "--profile", "tiny", "--store", str(store),
                  env=env)
    assert second.returncode == 0
    assert "nothing to run: 2 stages up to date" in second.stdout
    status = json.loads(phi4("status", "--store", str(store), "--format", "json", env=env).stdout)
    assert {row["stage"]: row["state"] for row in status["stages"]} == {
        "text_pretrain": "succeeded", "text_post_train": "succeeded"}
