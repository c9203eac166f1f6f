"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow, each optional.

Each is turned on by its section in the stage's `logging:` (recipe or cluster file) and
imported only then (`pip install 'phi4[trackers]'`; missing, the stage fails at once with that
line, before training). A stage logs to one tracker run for all its attempts: the run's id is
kept in the stage folder (`trackers.json`), so an attempt that resumes from a checkpoint appends
to the run it began; one that starts from step 0 (new, forced, or no checkpoint yet) begins a
new run, since a tracker's steps only go forward.
Runs are named `<pipeline>.<stage>.<fingerprint>` and tagged with the lineage (StageSpec.run).
"""

from __future__ import annotations

import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from phi4core.config import Logging, MlflowLogging, TrackerRun, WandbLogging
from phi4core.files import write_json

RUN_IDS = "trackers.json"  # in the stage folder: {"wandb": id, "mlflow": id}
EXTRA = "pip install 'phi4[trackers]'"


class TrackerMissing(RuntimeError):
    """A tracker is configured but its package is not installed."""


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, ok: bool) -> None: ...


def _run_ids(stage_dir: Path) -> dict[str, str]:
    import json

    try:
        data = json.loads((stage_dir / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _remember(stage_dir: Path, tracker: str, run_id: str) -> None:
    ids = _run_ids(stage_dir)
    if ids.get(tracker) != run_id:
        write_json(stage_dir / RUN_IDS, {**ids, tracker: run_id})


def open_trackers(stage_dir: Path, logging: Logging, run: TrackerRun, resumed: bool
                  ) -> list[Tracker]:
    """The trackers `logging` asks for, each attached to the stage's run: the one recorded
    when the attempt `resumed`, else a new one."""
    ids = _run_ids(stage_dir) if resumed else {}
    trackers: list[Tracker] = []
    try:
        if logging.wandb is not None:
            trackers.append(WandbTracker(stage_dir, logging.wandb, run, ids.get("wandb")))
        if logging.mlflow is not None:
            trackers.append(MlflowTracker(stage_dir, logging.mlflow, run, ids.get("mlflow")))
    except BaseException:
        for tracker in trackers:
            tracker.close(ok=False)
        raise
    return trackers


def scalars_of(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (bools and nulls left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class WandbTracker:
    def __init__(self, stage_dir: Path, config: WandbLogging, run: TrackerRun,
                 run_id: str | None):
        try:
            import wandb
        except ImportError:
            raise TrackerMissing(f"logging.wandb is set but wandb is not installed: {EXTRA}") \
                from None
        run_id = run_id or secrets.token_hex(6)
        self._run = wandb.init(
            project=config.project, entity=config.entity, name=run.name, id=run_id,
            resume="allow", mode=config.mode, dir=str(stage_dir),
            tags=[f"{k}={v}"[:64] for k, v in sorted(run.tags.items())],
            config={"phi4": run.tags},
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        _remember(stage_dir, "wandb", self._run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self._run.finish(exit_code=0 if ok else 1)


class MlflowTracker:
    def __init__(self, stage_dir: Path, config: MlflowLogging, run: TrackerRun,
                 run_id: str | None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackerMissing(f"logging.mlflow is set but mlflow is not installed: {EXTRA}") \
                from None
        uri = config.tracking_uri
        if uri is not None and (uri.startswith("file:") or "://" not in uri):
            # Asked for by name: MLflow 3 keeps its file store behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")  # resumed: the same run goes on
        else:
            experiment = self._client.get_experiment_by_name(config.experiment)
            experiment_id = experiment.experiment_id if experiment is not None \
                else self._client.create_experiment(config.experiment)
            created = self._client.create_run(experiment_id, run_name=run.name,
                                              tags=dict(run.tags))
            run_id = created.info.run_id
            _remember(stage_dir, "mlflow", run_id)
        self._run_id = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step)
                                                      for k, v in scalars.items()])

    def close(self, ok: bool) -> None:
        self._client.set_terminated(self._run_id, status="FINISHED" if ok else "KILLED")
