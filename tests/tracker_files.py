"""Reading back what the trackers logged, offline: W&B's offline run files and an MLflow file
store (through MLflow's own client)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_BLOCK = 32768  # W&B's run files: a LevelDB-style log of 32 KiB blocks


def _records(path: Path):
    """The protobuf Records of one `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # too little room for a header: the block is padded
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0 and length == 0:
            continue
        parts += chunk
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_runs(folder: Path, run_id: str) -> list[dict]:
    """Each offline run file of `run_id` (one per attempt that logged to it), oldest first:
    its name, tags and history rows."""
    runs = []
    for path in sorted(folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        run = {"name": None, "tags": [], "history": []}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["tags"] = record.run.display_name, list(record.run.tags)
            elif kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key):
                                       json.loads(item.value_json)
                                       for item in record.history.item})
        runs.append(run)
    return runs


def _client(mlruns: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file:{mlruns}")


def mlflow_run(mlruns: Path, run_id: str) -> dict:
    """Name, tags, status and every metric's (step, value) history of one run."""
    client = _client(mlruns)
    run = client.get_run(run_id)
    metrics = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                       key=lambda m: (m.step, m.timestamp))]
               for key in run.data.metrics}
    return {"name": run.info.run_name, "tags": run.data.tags, "status": run.info.status,
            "metrics": metrics}


def mlflow_runs(mlruns: Path) -> list[str]:
    client = _client(mlruns)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments)]
