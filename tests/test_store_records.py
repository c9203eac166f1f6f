"""The store's typed records: a store written by the phi4 before them (free-form status.json and
manifest.json, the keys below) still loads, plans, reports and reruns; records round-trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dag_helpers import counts, make_pipeline, phi4, plan_json

from orchestrator import manifest as mf
from orchestrator.config import load_pipeline
from orchestrator.graph import build_graph
from orchestrator.plan import make_plan
from orchestrator.records import StageStatus, State
from orchestrator.store import Store, write_json

# Exactly what the untyped store wrote (commit 72b833d): a local success, a local failure with
# its lineage, and a Slurm submission not yet started.
OLD_SUCCEEDED = {
    "attempt": 1, "blocked_by": None, "child_pid": 20693, "command": ["python", "stage.py", "a"],
    "ended": 1796080691.2743473, "error": None, "executor": "local", "exit_code": 0,
    "fingerprint": "FP_A", "host": "vm", "inputs": {}, "job_id": "20693", "pid": 20692,
    "reasons": ["new"], "stage": "a", "start_over": False, "started": 1796080691.0949445,
    "state": "succeeded"}
OLD_FAILED = {
    "attempt": 1, "blocked_by": None, "child_pid": 20694, "command": ["python", "stage.py", "b"],
    "ended": 1796080691.4916859, "error": "exit code 3", "executor": "local", "exit_code": 3,
    "fingerprint": "FP_B", "host": "vm",
    "inputs": {"a": {"artifact": "out", "digest": "DIGEST_A", "fingerprint": "FP_A",
                     "path": "A_OUT", "source": "stage", "stage": "a"}},
    "job_id": "20694", "pid": 20692, "reasons": ["new"], "stage": "b", "start_over": False,
    "started": 1796080691.344504, "state": "failed"}
OLD_SLURM_PENDING = {
    "attempt": 0, "blocked_by": None, "cluster": "local", "command": ["srun", "--", "true"],
    "dependency": "afterok:41", "depends_on": {"a": "41"}, "ended": None, "error": None,
    "executor": "slurm", "exit_code": None, "fingerprint": "c" * 16, "force": False,
    "inputs": {}, "job_id": "42", "reasons": ["new"], "script": "/s/job.sbatch", "stage": "c",
    "start_over": True, "started": None, "state": "pending", "submitted": 1796080000.5}


def test_old_records_load_typed_and_round_trip() -> None:
    for old in (OLD_SUCCEEDED, OLD_FAILED, OLD_SLURM_PENDING):
        record = StageStatus.model_validate(old)
        dumped = record.model_dump(mode="json")
        assert {k: dumped[k] for k in old} == old
    pending = StageStatus.model_validate(OLD_SLURM_PENDING)
    assert pending.state == State.PENDING and pending.depends_on == {"a": "41"}
    assert pending.starts_over  # the submission asked the job to start over
    failed = StageStatus.model_validate(OLD_FAILED)
    assert failed.inputs["a"].digest == "DIGEST_A" and not failed.starts_over
    # Nulls older writers left where a list or mapping belongs; a numeric job id.
    loose = StageStatus.model_validate({**OLD_SUCCEEDED, "command": None, "inputs": None,
                                        "job_id": 20693})
    assert (loose.command, loose.inputs, loose.job_id) == ([], {}, "20693")


def test_unknown_keys_survive_a_rewrite_and_bad_records_read_as_none(tmp_path: Path) -> None:
    folder = Store(tmp_path).stage_dir("a", "f" * 16)
    folder.path.mkdir(parents=True)
    write_json(folder.status_file, {**OLD_SUCCEEDED, "fingerprint": "f" * 16,
                                    "written_by_a_newer_phi4": {"x": 1}})
    folder.end(State.FAILED, exit_code=1, error="boom")
    on_disk = json.loads(folder.status_file.read_text())
    assert on_disk["written_by_a_newer_phi4"] == {"x": 1} and on_disk["state"] == "failed"
    for bad in ({**OLD_SUCCEEDED, "state": "exploded"}, {"stage": "a"}, [1, 2], "text"):
        write_json(folder.status_file, bad)
        assert folder.status() is None
    folder.status_file.write_text('{"state": "succ')  # a torn write
    assert folder.status() is None and folder.state() is None


def _old_store(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """The a -> b pipeline as the untyped store left it: a published, b failed with exit 3.
    Fingerprints and paths are the ones this version computes for the same recipes."""
    pipeline = make_pipeline(root, {"a": [], "b": ["a"]})
    store = root / "store"
    plan = make_plan(build_graph(load_pipeline(pipeline).stages), Store(store))
    a, b = plan.stages["a"].stage_dir, plan.stages["b"].stage_dir
    (a.artifacts / "out").mkdir(parents=True)
    (a.artifacts / "out" / "data.txt").write_text("a:")
    files = {"data.txt": {"sha256": hashlib.sha256(b"a:").hexdigest(), "size": 2}}
    write_json(a.manifest_file, {"artifacts": {"out": files}, "created": 1796080691.27})
    write_json(a.status_file, {**OLD_SUCCEEDED, "fingerprint": a.fingerprint})
    lineage = {**OLD_FAILED["inputs"]["a"], "digest": mf.digest(files),
               "fingerprint": a.fingerprint, "path": str(a.artifacts / "out")}
    b.path.mkdir(parents=True)
    write_json(b.status_file, {**OLD_FAILED, "fingerprint": b.fingerprint,
                               "inputs": {"a": lineage}})
    for folder in (a, b):
        (folder.path.parent / "latest").write_text(folder.fingerprint)
    return pipeline, store, {"a": a.fingerprint, "b": b.fingerprint}


def test_a_store_written_before_typed_records_plans_reports_and_reruns(tmp_path: Path) -> None:
    pipeline, store, fps = _old_store(tmp_path)
    rows = {r["stage"]: r for r in json.loads(
        phi4("status", "--format", "json", store=store, check=0).stdout)["stages"]}
    assert (rows["a"]["state"], rows["a"]["attempt"], rows["a"]["job"]) == ("succeeded", 1,
                                                                           "20693")
    assert (rows["b"]["state"], rows["b"]["exit_code"], rows["b"]["note"]) == (
        "failed", 3, "exit code 3")
    planned = plan_json(pipeline, store)
    assert planned["a"]["verdict"] == "up to date"
    assert planned["b"]["verdict"] == "run"
    assert planned["b"]["reasons"] == ["last attempt failed (exit code 3)"]
    phi4("run", str(pipeline), store=store, check=0)
    assert counts(tmp_path) == {"b": 1}  # a's old artifact is used as it is
    b = Store(store).stage_dir("b", fps["b"])
    assert (b.status().state, b.status().attempt) == (State.SUCCEEDED, 2)
    assert (b.artifacts / "out" / "data.txt").read_text() == "b:[a:]"
    assert plan_json(pipeline, store)["b"]["verdict"] == "up to date"
