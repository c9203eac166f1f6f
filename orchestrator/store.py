"""The artifact store: one folder per (stage, fingerprint), published by atomic rename.

    <store>/stages/<name>/<fingerprint>/
        spec.json  status.json  fields.json  manifest.json  .lock
        logs/stdout.log  metrics.jsonl  checkpoints/  staging/<artifact>/  artifacts/<artifact>/
    <store>/stages/<name>/latest      fingerprint of the stage's most recent attempt
    <store>/cache/sha256/             content hashes by (inode, size, mtime, ctime)

An attempt writes into `staging/`; on success `staging/` replaces `artifacts/` by rename and
then the manifest is put in place. So `artifacts/` plus `manifest.json` means "complete"; a
rerun leaves the previous artifact in place until its own replaces it. `checkpoints/` survives
the reruns of an unfinished attempt (the trainer resumes from it); the rerun of a finished one
starts over.

`status.json` and `manifest.json` are read and written here only, as the typed records of
records.py; a status changes only through the StageDir method named for the event (queue,
begin, record_job, end), each an atomic rewrite of the whole record.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import manifest as mf
from .records import InputRecord, ManifestRecord, StageStatus, State

_M = TypeVar("_M", bound=BaseModel)


def resolve_root(path: str | Path | None) -> Path:
    """--store, else $PHI4_STORE, else ./phi4_runs."""
    chosen = path or os.environ.get("PHI4_STORE") or "phi4_runs"
    return Path(chosen).expanduser().resolve()


def write_json(path: Path, data: Any) -> None:
    """Readers never see a half-written file: write aside, then rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StageLock:
    """`flock` on `<fp>/.lock`: held while an attempt runs, released by the kernel when the
    holder dies, so a SIGKILLed run never leaves a stage locked."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def is_held_elsewhere(self) -> bool:
        if not self.path.exists():
            return False
        if self.try_acquire():
            self.release()
            return False
        return True


@dataclass(frozen=True)
class StageDir:
    """The folder of one stage fingerprint: every attempt at that fingerprint shares it (and
    its checkpoints). Its status and manifest are read and written here only."""

    store: Store
    name: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.store.root / "stages" / self.name / self.fingerprint

    spec_file = property(lambda self: self.path / "spec.json")
    status_file = property(lambda self: self.path / "status.json")
    fields_file = property(lambda self: self.path / "fields.json")
    manifest_file = property(lambda self: self.path / "manifest.json")
    logs = property(lambda self: self.path / "logs")
    log_file = property(lambda self: self.path / "logs" / "stdout.log")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    staging = property(lambda self: self.path / "staging")
    artifacts = property(lambda self: self.path / "artifacts")

    def lock(self) -> StageLock:
        return StageLock(self.path / ".lock")

    # ------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------

    def status(self) -> StageStatus | None:
        """The record of the latest attempt; None when there is none or it cannot be read
        (a new attempt then starts from scratch, as for a stage never run)."""
        return _load(StageStatus, self.status_file)

    def manifest(self) -> ManifestRecord | None:
        return _load(ManifestRecord, self.manifest_file)

    def fields(self) -> dict | None:
        return read_json(self.fields_file)

    def declared_outputs(self) -> list[str]:
        """The outputs named in spec.json (what a job's end hook publishes)."""
        spec = read_json(self.spec_file)
        outputs = spec.get("outputs") if isinstance(spec, dict) else None
        return [str(o) for o in outputs] if isinstance(outputs, list) else []

    def state(self, status: StageStatus | None = None) -> State | None:
        """The recorded state, except that `running` with nobody holding the lock is what a
        killed local run leaves behind: `interrupted`. A Slurm job's liveness is the
        scheduler's to tell (its lock may be on another node): see executors/slurm_status."""
        status = status if status is not None else self.status()
        if status is None:
            return None
        if status.state == State.RUNNING and status.executor != "slurm" \
                and not self.lock().is_held_elsewhere():
            return State.INTERRUPTED
        return status.state

    def artifact_problem(self, outputs: list[str]) -> str | None:
        """None when every output is published and matches its manifest; else why not."""
        recorded = self.manifest()
        if recorded is None or not self.artifacts.is_dir():
            return "artifact missing"
        for name in outputs:
            files = recorded.artifacts.get(name)
            if files is None:
                return f"artifact missing: {name}"
            problem = mf.check(self.artifacts / name, files, self.store.hashes)
            if problem is not None:
                return f"artifact {'missing' if problem == 'missing' else 'corrupt'}: " \
                       f"{name}" + ("" if problem == "missing" else f"/{problem}")
        return None

    def artifact_digest(self, artifact: str) -> str | None:
        recorded = self.manifest()
        files = recorded.artifacts.get(artifact) if recorded else None
        return None if files is None else mf.digest(files)

    def published_inputs(self) -> dict[str, str | None]:
        """The digest of each input the published artifact was made from (recorded in its
        manifest; the last attempt's record for a manifest older than that)."""
        recorded = self.manifest()
        if recorded is not None and recorded.inputs is not None:
            return recorded.inputs
        status = self.status()
        return status.input_digests if status else {}

    def changed_inputs(self, now: dict[str, str | None]) -> list[str]:
        """The inputs whose digest now differs from the one the published artifact read."""
        then = self.published_inputs()
        return [n for n, digest in now.items()
                if digest is not None and then.get(n) is not None and digest != then[n]]

    # ------------------------------------------------------------------------------------
    # writing: one method per event in an attempt's life
    # ------------------------------------------------------------------------------------

    def prepare(self, spec: dict, fields: dict) -> None:
        """Before a stage is launched or submitted: what it is given (spec.json), what its
        fingerprint hashes (fields.json), and the folders its processes write into."""
        for folder in (self.logs, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        write_json(self.spec_file, spec)
        write_json(self.fields_file, fields)

    def queue(self, executor: str, *, force: bool, command: list[str], reasons: list[str],
              inputs: dict[str, InputRecord], cluster: str | None = None,
              script: str | None = None, dependency: str | None = None,
              depends_on: dict[str, str] | None = None) -> StageStatus:
        """A submission to a scheduler: `pending` until its job's `stage-hook begin`, which
        honours `force` and `start_over` (whether the finished attempt before it must not be
        resumed) as a local run would have."""
        previous = self.status()
        record = self._write(
            previous, state=State.PENDING, executor=executor, cluster=cluster, job_id=None,
            start_over=previous.starts_over if previous else False, force=force,
            submitted=time.time(), started=None, ended=None, exit_code=None, error=None,
            blocked_by=None, script=script, dependency=dependency, depends_on=depends_on or {},
            command=list(command), reasons=list(reasons), inputs=inputs)
        self.store.set_latest(self.name, self.fingerprint)
        return record

    def begin(self, executor: str, *, command: list[str], reasons: list[str],
              inputs: dict[str, InputRecord], job_id: str | None = None,
              restarts: int | None = None, nodes: str | None = None) -> StageStatus:
        """Start an attempt: forget any earlier staging output and record it. The checkpoints
        of an unfinished attempt (interrupted, preempted, cancelled, failed) are kept so that
        the stage resumes; after a finished one (the rerun is forced, or an input was
        republished) they are discarded, so that the stage starts over."""
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.status()
        attempt = previous.attempt if previous else 0
        # A published artifact stays until the new one replaces it (publish): a failed rerun
        # leaves it usable, and a consumer reading it meanwhile keeps its files.
        stale = [self.staging]
        if previous is not None and previous.starts_over:
            stale.append(self.checkpoints)
            if self.metrics.exists():  # kept as history; the new attempt logs from step 0
                os.replace(self.metrics, self.path / f"metrics.attempt{attempt}.jsonl")
        for folder in stale:
            if folder.exists():
                self._discard(folder)
        for folder in (self.staging, self.logs, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        record = self._write(
            previous, state=State.RUNNING, executor=executor, attempt=attempt + 1,
            started=time.time(), ended=None, exit_code=None, error=None, blocked_by=None,
            pid=os.getpid(), host=socket.gethostname(), child_pid=None, job_id=job_id,
            restarts=restarts, nodes=nodes, start_over=False, command=list(command),
            reasons=list(reasons), inputs=inputs)
        self.store.set_latest(self.name, self.fingerprint)
        return record

    def record_job(self, job_id: str, child_pid: int | None = None) -> StageStatus:
        """The job (or, locally, the process) that carries the attempt."""
        return self._write(self.status(), job_id=job_id, child_pid=child_pid)

    def end(self, state: State, *, exit_code: int | None = None, error: str | None = None,
            blocked_by: str | None = None, ended: float | None = None) -> StageStatus:
        """The attempt (or the submission that never started one) ended in `state`."""
        assert state in (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.PREEMPTED,
                         State.BLOCKED), state
        return self._write(self.status(), state=state, exit_code=exit_code, error=error,
                           blocked_by=blocked_by, ended=ended or time.time())

    def _write(self, previous: StageStatus | None, **changes: Any) -> StageStatus:
        base = previous.model_dump() if previous is not None else \
            {"stage": self.name, "fingerprint": self.fingerprint}
        record = StageStatus.model_validate({**base, **changes})
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.status_file, record.model_dump(mode="json"))
        return record

    def _discard(self, folder: Path) -> None:
        trash = self.path / f".trash.{os.getpid()}.{time.monotonic_ns()}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def publish(self, outputs: list[str]) -> str | None:
        """Manifest aside; then, with no manifest in place, swap staging -> artifacts by
        rename; then the manifest; then drop the previous artifact. At no moment does a
        manifest sit beside files it does not describe. Returns a problem instead of
        publishing when a declared output was not written."""
        missing = [o for o in outputs if not (self.staging / o).is_dir()]
        if missing:
            return (f"the stage exited 0 but did not write "
                    f"{', '.join(f'$PHI4_OUTPUT_DIR/{o}/' for o in missing)}")
        built = {o: mf.build(self.staging / o, self.store.hashes) for o in outputs}
        # What the artifact was made from: a rerun whose inputs still have these digests
        # (and is not forced) has nothing to do.
        status = self.status()
        record = ManifestRecord(artifacts=built, created=time.time(),
                                inputs=status.input_digests if status else {})
        aside = self.path / f".manifest.next.{os.getpid()}.json"
        write_json(aside, record.model_dump(mode="json"))
        self.manifest_file.unlink(missing_ok=True)
        old = None
        if self.artifacts.exists():
            old = self.path / f".trash.{os.getpid()}.{time.monotonic_ns()}"
            os.rename(self.artifacts, old)
        os.rename(self.staging, self.artifacts)
        os.replace(aside, self.manifest_file)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return None


def _load(model: type[_M], path: Path) -> _M | None:
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


class Store:
    def __init__(self, root: str | Path | None = None, read_only: bool = False):
        """`read_only`: for looking only (plan, graph, dry runs): the hash cache is read,
        never written, so the store is not created or changed."""
        self.root = resolve_root(root)
        self.hashes = mf.HashCache(self.root / "cache" / "sha256", read_only=read_only)

    def stage_dir(self, name: str, fingerprint: str) -> StageDir:
        return StageDir(self, name, fingerprint)

    def stage_names(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / "stages").iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def stage_dirs(self, name: str) -> list[StageDir]:
        """Every fingerprint of stage `name` in the store."""
        try:
            entries = (self.root / "stages" / name).iterdir()
            return [StageDir(self, name, p.name) for p in entries if p.is_dir()]
        except FileNotFoundError:
            return []

    def set_latest(self, name: str, fingerprint: str) -> None:
        path = self.root / "stages" / name / "latest"
        tmp = path.with_name(f".latest.{os.getpid()}")
        tmp.write_text(fingerprint)
        os.replace(tmp, path)

    def latest(self, name: str) -> StageDir | None:
        """The folder of the stage's most recent attempt (any fingerprint)."""
        try:
            fp = (self.root / "stages" / name / "latest").read_text().strip()
        except OSError:
            return None
        return StageDir(self, name, fp)

    def newest_succeeded(self, name: str, artifact: str) -> StageDir | None:
        """The newest folder of `name` whose `artifact` is published and verifies: what a
        single-recipe run consumes."""
        ranked = []
        for folder in self.stage_dirs(name):
            # Published is what counts: the artifact of a later failed rerun stays valid.
            manifest = folder.manifest()
            if manifest is not None:
                ranked.append((manifest.created, folder))
        for _, folder in sorted(ranked, key=lambda r: r[0], reverse=True):
            if folder.artifact_problem([artifact]) is None:
                return folder
        return None

    def with_digests(self, inputs: dict[str, InputRecord]) -> dict[str, InputRecord]:
        """The lineage records with each stage input's digest as published now (None for an
        upstream that has not published)."""
        out = {}
        for name, record in inputs.items():
            if record.source == "stage" and record.stage and record.fingerprint:
                upstream = self.stage_dir(record.stage, record.fingerprint)
                record = record.model_copy(
                    update={"digest": upstream.artifact_digest(record.artifact or "")})
            out[name] = record
        return out
