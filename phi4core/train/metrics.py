"""Per-step telemetry: metrics.jsonl (read by `phi4 status`, `diff`, `metrics`), TensorBoard,
W&B and MLflow when configured (trackers.py), a progress line.

metrics.jsonl is strict JSON: a loss or norm that is not finite is written as null.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from phi4core.config import Logging, TrackerRun
from phi4core.files import json_text


class MetricsWriter:
    """Only rank 0 writes. The JSONL is appended (a resumed run continues the same file)."""

    def __init__(self, stage_dir: Path, total_steps: int, logging: Logging, enabled: bool,
                 run: TrackerRun | None = None, resumed: bool = False):
        """`run`: the tracker run's name and tags (default: named after the stage folder);
        `resumed`: the attempt goes on from a checkpoint (its tracker runs go on too)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.started = time.monotonic()
        self.first_step: int | None = None
        self._file = None
        self._tb = None
        self._trackers: list = []
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        if logging.wandb is not None or logging.mlflow is not None:
            from phi4core.train.trackers import open_trackers

            run = run or TrackerRun(name=f"{stage_dir.parent.name}.{stage_dir.name}")
            self._trackers = open_trackers(stage_dir, logging, run, resumed)
        self._file = open(stage_dir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(stage_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json_text(record) + "\n")
        if self._tb is not None or self._trackers:
            from phi4core.train.trackers import scalars_of

            scalars = scalars_of(values)
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(key, value, step)
            for tracker in self._trackers:
                tracker.log(step, scalars)

    def progress(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step - (self.first_step or 0) + 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(done, 1) * (self.total_steps - step - 1)
        print(f"step {step + 1}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3g}  "
              f"eta {_clock(eta)}", file=sys.stdout, flush=True)

    def close(self, ok: bool = True) -> None:
        """`ok`: whether the attempt got to its end (a tracker run is marked finished, else
        stopped; a resumed attempt reopens it)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close(ok)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
