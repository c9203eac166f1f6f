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
from typing import Any

from . import manifest as mf


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


@dataclass
class Attempt:
    """The folder of one stage fingerprint: all its attempts share it (and its checkpoints)."""

    store: Store
    name: str
    fingerprint: str

    @property
    def dir(self) -> Path:
        return self.store.root / "stages" / self.name / self.fingerprint

    spec = property(lambda self: self.dir / "spec.json")
    status_file = property(lambda self: self.dir / "status.json")
    fields_file = property(lambda self: self.dir / "fields.json")
    manifest_file = property(lambda self: self.dir / "manifest.json")
    logs = property(lambda self: self.dir / "logs")
    log_file = property(lambda self: self.dir / "logs" / "stdout.log")
    metrics = property(lambda self: self.dir / "metrics.jsonl")
    checkpoints = property(lambda self: self.dir / "checkpoints")
    staging = property(lambda self: self.dir / "staging")
    artifacts = property(lambda self: self.dir / "artifacts")

    def lock(self) -> StageLock:
        return StageLock(self.dir / ".lock")

    def status(self) -> dict | None:
        return read_json(self.status_file)

    def fields(self) -> dict | None:
        return read_json(self.fields_file)

    def manifest(self) -> dict | None:
        return read_json(self.manifest_file)

    def update_status(self, **changes: Any) -> dict:
        status = self.status() or {"stage": self.name, "fingerprint": self.fingerprint,
                                   "attempt": 0}
        status.update(changes)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.status_file, status)
        return status

    def state(self, status: dict | None = None) -> str | None:
        """The recorded state, except that `running` with nobody holding the lock is what a
        killed local run leaves behind: `interrupted`. A Slurm job's liveness is the
        scheduler's to tell (its lock may be on another node): see executors/slurm_status."""
        status = status if status is not None else self.status()
        state = (status or {}).get("state")
        if state == "running" and (status or {}).get("executor") != "slurm" \
                and not self.lock().is_held_elsewhere():
            return "interrupted"
        return state

    def artifact_problem(self, outputs: list[str]) -> str | None:
        """None when every output is published and matches its manifest; else why not."""
        recorded = self.manifest()
        if recorded is None or not self.artifacts.is_dir():
            return "artifact missing"
        for name in outputs:
            files = recorded.get("artifacts", {}).get(name)
            if files is None:
                return f"artifact missing: {name}"
            problem = mf.check(self.artifacts / name, files, self.store.hashes)
            if problem is not None:
                return f"artifact {'missing' if problem == 'missing' else 'corrupt'}: " \
                       f"{name}" + ("" if problem == "missing" else f"/{problem}")
        return None

    def artifact_digest(self, artifact: str) -> str | None:
        files = (self.manifest() or {}).get("artifacts", {}).get(artifact)
        return None if files is None else mf.digest(files)

    def published_inputs(self) -> dict[str, str | None]:
        """The digest of each input the published artifact was made from (recorded in its
        manifest; the last attempt's record for a manifest older than that)."""
        recorded = (self.manifest() or {}).get("inputs")
        if recorded is not None:
            return recorded
        return {n: r.get("digest") for n, r in ((self.status() or {}).get("inputs") or {}).items()}

    def changed_inputs(self, now: dict[str, str | None]) -> list[str]:
        """The inputs whose digest now differs from the one the published artifact read."""
        then = self.published_inputs()
        return [n for n, digest in now.items()
                if digest is not None and then.get(n) is not None and digest != then[n]]

    def begin(self, fields: dict, **status: Any) -> dict:
        """Start an attempt: forget any earlier staging output and record it. The checkpoints
        of an unfinished attempt (interrupted, preempted, cancelled, failed) are kept so that
        the stage resumes; after a finished one (the rerun is forced, or an input was
        republished) they are discarded, so that the stage starts over."""
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self.status() or {}
        # A published artifact stays until the new one replaces it (publish): a failed rerun
        # leaves it usable, and a consumer reading it meanwhile keeps its files.
        stale = [self.staging]
        if starts_over(previous):
            stale.append(self.checkpoints)
            if self.metrics.exists():  # kept as history; the new attempt logs from step 0
                os.replace(self.metrics,
                           self.dir / f"metrics.attempt{int(previous.get('attempt', 0))}.jsonl")
        for folder in stale:
            if folder.exists():
                self._discard(folder)
        for folder in (self.staging, self.logs, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        write_json(self.fields_file, fields)
        record = self.update_status(
            state="running", attempt=int(previous.get("attempt", 0)) + 1, started=time.time(),
            ended=None, exit_code=None, error=None, blocked_by=None, pid=os.getpid(),
            host=socket.gethostname(), start_over=False, **status)
        self.store.set_latest(self.name, self.fingerprint)
        return record

    def _discard(self, folder: Path) -> None:
        trash = self.dir / f".trash.{os.getpid()}.{time.monotonic_ns()}"
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
        read = {n: r.get("digest") for n, r in ((self.status() or {}).get("inputs") or {}).items()}
        aside = self.dir / f".manifest.next.{os.getpid()}.json"
        write_json(aside, {"artifacts": built, "created": time.time(), "inputs": read})
        self.manifest_file.unlink(missing_ok=True)
        old = None
        if self.artifacts.exists():
            old = self.dir / f".trash.{os.getpid()}.{time.monotonic_ns()}"
            os.rename(self.artifacts, old)
        os.rename(self.staging, self.artifacts)
        os.replace(aside, self.manifest_file)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return None


def starts_over(previous: dict) -> bool:
    """Whether the next attempt after one with this status must not resume from its
    checkpoints: the attempt finished (its checkpoints hold the final step, trained on the
    inputs of then), or a submission recorded that it did (`start_over`)."""
    return previous.get("state") == "succeeded" or bool(previous.get("start_over"))


class Store:
    def __init__(self, root: str | Path | None = None, read_only: bool = False):
        """`read_only`: for looking only (plan, graph, dry runs): the hash cache is read,
        never written, so the store is not created or changed."""
        self.root = resolve_root(root)
        self.hashes = mf.HashCache(self.root / "cache" / "sha256", read_only=read_only)

    def attempt(self, name: str, fingerprint: str) -> Attempt:
        return Attempt(self, name, fingerprint)

    def stage_names(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / "stages").iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def attempts(self, name: str) -> list[Attempt]:
        try:
            entries = (self.root / "stages" / name).iterdir()
            return [Attempt(self, name, p.name) for p in entries if p.is_dir()]
        except FileNotFoundError:
            return []

    def set_latest(self, name: str, fingerprint: str) -> None:
        path = self.root / "stages" / name / "latest"
        tmp = path.with_name(f".latest.{os.getpid()}")
        tmp.write_text(fingerprint)
        os.replace(tmp, path)

    def latest(self, name: str) -> Attempt | None:
        """The stage's most recent attempt (any fingerprint)."""
        try:
            fp = (self.root / "stages" / name / "latest").read_text().strip()
        except OSError:
            return None
        return Attempt(self, name, fp)

    def newest_succeeded(self, name: str, artifact: str) -> Attempt | None:
        """The newest attempt of `name` whose `artifact` is published and verifies: what a
        single-recipe run consumes."""
        ranked = []
        for attempt in self.attempts(name):
            # Published is what counts: the artifact of a later failed rerun stays valid.
            created = (attempt.manifest() or {}).get("created")
            if created is not None:
                ranked.append((created, attempt))
        for _, attempt in sorted(ranked, key=lambda r: r[0], reverse=True):
            if attempt.artifact_problem([artifact]) is None:
                return attempt
        return None
