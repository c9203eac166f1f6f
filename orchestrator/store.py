"""The artifact store: one folder per (stage, fingerprint), published by switching one link.

    <store>/stages/<name>/<fingerprint>/
        spec.json  status.json  fields.json  .lock
        logs/stdout.log  metrics.jsonl  evaluation.json  checkpoints/  staging/<artifact>/
        versions/<id>/manifest.json  versions/<id>/<artifact>/    one published version
        artifacts -> versions/<id>     the published version: the only link publish switches
    <store>/stages/<name>/latest      fingerprint of the stage's most recent attempt
    <store>/cache/sha256/             content hashes by (inode, size, mtime, ctime)

An attempt writes into `staging/`. Publish settles links (kept as copies when they point
inside the artifact, refused when they leave it) and refuses FIFOs, devices and sockets,
makes every file read-only, hashes the files, moves `staging/` to a new `versions/<id>/`,
writes its manifest there, and only then switches `artifacts` to it with one os.replace; the
previous version is removed after. A publish killed at any step leaves the previous artifact
published and valid (or, past the switch, the new one); what it leaves half-done (`.trash.*`,
a version nobody points at, temporary files) is collected by the next attempt or publish.
A store from before versions (`artifacts/` a folder, `manifest.json` beside it) still reads.

Published files are read-only, yet permissions hold nobody back who runs as root: so the
inputs of a stage are verified against their manifests before it starts and after it ends
(StageDir.input_problem), and a stage that read a changed input publishes nothing.

`status.json` and the manifests are read and written here only, as the typed records of
records.py; a status changes only through the StageDir method named for the event (queue,
begin, record_job, end), each an atomic rewrite of the whole record. A damaged record is
reported (StoreError, or a reason in the plan), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import manifest as mf
from .artifact_tree import ArtifactError, make_read_only, remove_tree, settle_links
from .records import EvaluationRecord, InputRecord, LoginRecord, ManifestRecord, StageStatus, State

_M = TypeVar("_M", bound=BaseModel)

_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"v[0-9a-f]+\.[0-9]+")
LEGACY_VERSION = "v0.0"  # where a pre-versions artifact moves when it is first replaced
# Test hook: publish SIGKILLs its own process just before step N (tests/test_store_publish).
KILL_AT_ENV = "PHI4_TEST_PUBLISH_KILL_AT"


class StoreError(Exception):
    """The store cannot be used as it is (a damaged record, an unusable --store): one line
    for the user, exit 2."""


def resolve_root(path: str | Path | None) -> Path:
    """--store, else $PHI4_STORE, else ./phi4_runs."""
    chosen = path or os.environ.get("PHI4_STORE") or "phi4_runs"
    return Path(chosen).expanduser().resolve()


def write_json(path: Path, data: Any) -> None:
    """Readers never see a half-written file: write aside, then rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {err.strerror or err}"
                         + (" (a folder is in its place: move it away)" if path.is_dir()
                            else "")) from None


def read_json(path: Path) -> Any:
    """The JSON in a regular file; None when it is absent, unreadable or not JSON."""
    try:
        with open(path, "rb", opener=_regular_opener) as f:
            return json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError, mf.UnreadableFile):
        return None


def _regular_opener(path: str, flags: int) -> int:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise mf.UnreadableFile(os.path.basename(path), "is not a regular file")
    return mf.regular_opener(path, flags)


def record_file_problem(path: Path) -> str | None:
    """Why a record the store rewrites cannot be written in place (a folder, a FIFO where the
    file belongs), else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{path} cannot be read: {err.strerror or err}"
    if stat.S_ISREG(st.st_mode):
        return None
    what = "a folder" if stat.S_ISDIR(st.st_mode) else (mf.kind_problem(st.st_mode) or "")
    what = what.removeprefix("is ").split(",")[0]
    return f"{path} is {what}, not a file: the store's record is damaged; move it away " \
           f"(e.g. `mv {path} {path}.damaged`) and rerun"


class StageLock:
    """`flock` on `<fp>/.lock`: held while an attempt runs, released by the kernel when the
    holder dies, so a SIGKILLed run never leaves a stage locked."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """StoreError when the lock file cannot be opened (a folder in its place)."""
        problem = record_file_problem(self.path)
        if problem is not None:
            raise StoreError(problem)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise StoreError(f"cannot open the stage lock {self.path}: "
                             f"{err.strerror or err}") from None
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
        if not self.path.is_file():  # absent, or damaged (try_acquire says so when running)
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
    evaluation_file = property(lambda self: self.path / "evaluation.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    staging = property(lambda self: self.path / "staging")
    artifacts = property(lambda self: self.path / "artifacts")  # -> versions/<id>
    versions = property(lambda self: self.path / "versions")

    def lock(self) -> StageLock:
        return StageLock(self.path / ".lock")

    # ------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------

    def status(self) -> StageStatus | None:
        """The record of the latest attempt; None when there is none or it cannot be read
        (a new attempt then starts from scratch, as for a stage never run, keeping the
        checkpoints; record_problem says whether it was damaged)."""
        return _load(StageStatus, self.status_file)

    def evaluation(self) -> EvaluationRecord | None:
        """The held-out evaluations of the latest attempt (None when it wrote none or the
        file cannot be read as a record)."""
        return _load(EvaluationRecord, self.evaluation_file)

    def published_version(self) -> Path | None:
        """The folder of the published artifacts: where `artifacts` points, `artifacts`
        itself in a store from before versions, or the pre-versions artifact a publish was
        moving into `versions/` when it was killed. None when nothing is published."""
        link = self.artifacts
        if link.is_symlink():
            target = os.readlink(link)
            name = Path(target).name
            if target != f"versions/{name}" or not _VERSION.fullmatch(name):
                return None  # not a pointer publish wrote: unpublished (a rerun repairs it)
            version = self.versions / name
            return version if version.is_dir() and not version.is_symlink() else None
        if link.is_dir():
            return link
        legacy = self.versions / LEGACY_VERSION
        if not os.path.lexists(link) and (legacy / "manifest.json").is_file():
            if not self.store.read_only:  # a publish was killed between moving and pointing
                with contextlib.suppress(OSError):
                    self._point_at(legacy)
            return legacy
        return None

    def _manifest_path(self, version: Path) -> Path:
        return self.manifest_file if version == self.artifacts else version / "manifest.json"

    def manifest(self) -> ManifestRecord | None:
        version = self.published_version()
        return None if version is None else _load(ManifestRecord, self._manifest_path(version))

    def record_problem(self) -> str | None:
        """Why a record this stage's next attempt rewrites cannot be written (StoreError for
        the run: exit 2 before anything starts), else None."""
        for path in (self.path, self.lock().path, self.status_file, self.spec_file,
                     self.fields_file, self.path.parent / "latest"):
            if path == self.path:
                if os.path.lexists(path) and not path.is_dir():
                    return f"{path} is not a folder: the store is damaged; move it away"
                continue
            problem = record_file_problem(path)
            if problem is not None:
                return problem
        return None

    def damaged_status(self) -> str | None:
        """Why status.json, present, cannot be read as a record; None when it is absent or
        reads."""
        if not os.path.lexists(self.status_file) or self.status() is not None:
            return None
        return damage_of(StageStatus, self.status_file)

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
        """None when every output is published and matches its manifest; else why not
        (a file that is not a regular file, or cannot be read, is "artifact corrupt")."""
        version = self.published_version()
        if version is None:
            return "artifact missing"
        recorded = self.manifest()
        if recorded is None:
            manifest = self._manifest_path(version)
            if not os.path.lexists(manifest):
                return "artifact missing"
            return f"artifact unverifiable: {damage_of(ManifestRecord, manifest)}"
        for name in outputs:
            files = recorded.artifacts.get(name)
            if files is None:
                return f"artifact missing: {name}"
            problem = mf.check(version / name, files, self.store.hashes)
            if problem is not None:
                return f"artifact {'missing' if problem == 'missing' else 'corrupt'}: " \
                       f"{name}" + ("" if problem == "missing" else f"/{problem}")
        return None

    def input_problem(self, inputs: dict[str, InputRecord]) -> tuple[str, str] | None:
        """(upstream stage, why) when this stage's stage inputs are not what it was given:
        an upstream artifact that no longer matches its manifest (a stage wrote into it:
        published files are read-only, yet not to root), or one republished since the
        attempt began (`digest` of the lineage record). None when every input verifies."""
        for name, record in sorted(inputs.items()):
            if record.source != "stage" or not record.stage or not record.fingerprint:
                continue
            upstream = self.store.stage_dir(record.stage, record.fingerprint)
            problem = upstream.artifact_problem([record.artifact or ""])
            if problem is not None:
                return record.stage, (
                    f"input {name} (stage {record.stage}): {problem}; published artifacts "
                    f"are read-only to the stages that read them, and the next run rebuilds "
                    f"{record.stage}")
            now = upstream.artifact_digest(record.artifact or "")
            if record.digest is not None and now != record.digest:
                return record.stage, (f"input {name} (stage {record.stage}) was republished "
                                      "while this stage ran")
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
              depends_on: dict[str, str] | None = None,
              login: LoginRecord | None = None) -> StageStatus:
        """A submission to a scheduler: `pending` until its job's `stage-hook begin`, which
        honours `force` and `start_over` (whether the finished attempt before it must not be
        resumed) as a local run would have."""
        previous = self.status()
        record = self._write(
            previous, state=State.PENDING, executor=executor, cluster=cluster, job_id=None,
            start_over=previous.starts_over if previous else False, force=force,
            submitted=time.time(), started=None, ended=None, exit_code=None, error=None,
            blocked_by=None, script=script, dependency=dependency, depends_on=depends_on or {},
            login=login, job_log=None,
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
            if self.evaluation_file.exists():  # likewise: the new attempt evaluates anew
                os.replace(self.evaluation_file, self.path / f"evaluation.attempt{attempt}.json")
        for folder in stale:
            if os.path.lexists(folder):
                self._discard(folder)
        self.collect_leftovers()
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

    def record_job(self, job_id: str, child_pid: int | None = None, *,
                   job_log: str | None = None,
                   depends_on: dict[str, str] | None = None) -> StageStatus:
        """The job (or, locally, the process) that carries the attempt; `job_log`: where the
        scheduler writes the job's own output, when not in the stage's log (NeMo-Run's);
        `depends_on`: upstream stage -> job, when known only once submitted (NeMo-Run)."""
        changes: dict[str, Any] = {"job_log": job_log} if job_log else {}
        if depends_on is not None:
            changes["depends_on"] = depends_on
        return self._write(self.status(), job_id=job_id, child_pid=child_pid, **changes)

    def end(self, state: State, *, exit_code: int | None = None, error: str | None = None,
            blocked_by: str | None = None, ended: float | None = None) -> StageStatus:
        """The attempt (or the submission that never started one) ended in `state`."""
        assert state in (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.PREEMPTED,
                         State.BLOCKED), state
        previous = self.status()
        # A finished attempt's checkpoints stay unusable to the next one whatever follows
        # (a rerun refused before it began, a block).
        return self._write(previous, state=state, exit_code=exit_code, error=error,
                           blocked_by=blocked_by, ended=ended or time.time(),
                           start_over=previous.starts_over if previous is not None else False)

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
        remove_tree(trash)

    def collect_leftovers(self) -> None:
        """Remove what a killed publish or attempt left (`.trash.*`, versions nobody points
        at, temporary files) and finish moving a pre-versions artifact. Called with the
        stage lock held (begin, publish): nobody else writes here meanwhile."""
        if not self.path.is_dir():
            return
        current = self.published_version()
        if current == self.versions / LEGACY_VERSION and not os.path.lexists(self.artifacts):
            self._point_at(current)  # a kill between moving it and pointing at it
        for entry in self.path.iterdir():
            if entry.name.startswith(".trash."):
                remove_tree(entry)
            elif entry.name.startswith(".") and entry.name.endswith((".tmp", ".link")):
                with contextlib.suppress(OSError):
                    entry.unlink()
        if self.versions.is_dir() and not self.versions.is_symlink():
            for version in self.versions.iterdir():
                if version != current:
                    self._discard(version)

    def tidy(self) -> None:
        """collect_leftovers, if no one holds the stage lock now (else its holder will):
        what a run does for every stage of its plan, the up-to-date ones included."""
        if not self.path.is_dir() or record_file_problem(self.lock().path) is not None:
            return
        if self.state() in (State.RUNNING, State.PENDING):
            return  # a job elsewhere (its lock may be on another node's view) owns it
        lock = self.lock()
        if lock.try_acquire():
            try:
                self.collect_leftovers()
            except OSError:
                pass  # tidying is best effort; the stage's next publish tries again
            finally:
                lock.release()

    # ------------------------------------------------------------------------------------
    # garbage collection (phi4 gc): never while the stage runs
    # ------------------------------------------------------------------------------------

    def remove(self) -> bool:
        """Remove this whole fingerprint folder; False (nothing removed) when a process holds
        its lock or it is recorded running or queued. It is moved aside first
        (`stages/<name>/.trash.*`), so a kill leaves no half folder under a fingerprint."""
        lock = self.lock()
        if not self.path.is_dir() or not lock.try_acquire():
            return False
        try:
            if self.state() in (State.RUNNING, State.PENDING):
                return False
            trash = self.path.parent / f".trash.{self.fingerprint}.{os.getpid()}"
            os.rename(self.path, trash)
        finally:
            lock.release()
        remove_tree(trash)
        return True

    def remove_checkpoints(self) -> bool:
        """Remove the checkpoints of a finished attempt (its rerun starts over, never resumes
        from them); False when the stage runs or its last attempt did not succeed."""
        lock = self.lock()
        if not lock.try_acquire():
            return False
        try:
            status = self.status()
            if status is None or status.state != State.SUCCEEDED \
                    or not os.path.lexists(self.checkpoints):
                return False
            self._discard(self.checkpoints)
            return True
        finally:
            lock.release()

    def _point_at(self, version: Path) -> None:
        """The one atomic switch of publish: `artifacts` -> versions/<id>."""
        tmp = self.path / f".artifacts.{os.getpid()}.link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"versions/{version.name}", tmp)
        os.replace(tmp, self.artifacts)

    def publish(self, outputs: list[str]) -> str | None:
        """Publish `staging/` as a new version; the previous one stays published and valid
        until the switch of `artifacts` (see the module docstring). Returns a problem
        instead of publishing when a declared output was not written or holds what an
        artifact may not (a link leaving it, a FIFO, a device, a socket)."""
        linked = [o for o in outputs if (self.staging / o).is_symlink()]
        if linked:
            return (f"output {linked[0]} is a symbolic link: write $PHI4_OUTPUT_DIR/"
                    f"{linked[0]}/ as a folder")
        missing = [o for o in outputs if not (self.staging / o).is_dir()]
        if missing:
            return (f"the stage exited 0 but did not write "
                    f"{', '.join(f'$PHI4_OUTPUT_DIR/{o}/' for o in missing)}")
        _kill_point(1)
        self.collect_leftovers()
        try:
            for o in outputs:
                settle_links(self.staging / o, o)
                make_read_only(self.staging / o)
            built = {o: mf.build(self.staging / o, self.store.hashes) for o in outputs}
        except (ArtifactError, mf.UnreadableFile) as err:
            return f"output {err} (outputs hold regular files and folders; links are " \
                   "kept, as copies, only when they point inside their artifact)"
        # What the artifact was made from: a rerun whose inputs still have these digests
        # (and is not forced) has nothing to do.
        status = self.status()
        record = ManifestRecord(artifacts=built, created=time.time(),
                                inputs=status.input_digests if status else {})
        old = self.published_version()
        if old == self.artifacts:  # a store from before versions: move it in, then point
            _kill_point(2)
            write_json(old / "manifest.json", read_json(self.manifest_file))
            self.versions.mkdir(exist_ok=True)
            _kill_point(3)
            os.rename(old, self.versions / LEGACY_VERSION)
            _kill_point(4)
            self._point_at(self.versions / LEGACY_VERSION)
            self.manifest_file.unlink(missing_ok=True)
            old = self.versions / LEGACY_VERSION
        version = self.versions / f"v{time.time_ns():x}.{os.getpid()}"
        self.versions.mkdir(exist_ok=True)
        _kill_point(5)
        os.rename(self.staging, version)
        _kill_point(6)
        write_json(version / "manifest.json", record.model_dump(mode="json"))
        _kill_point(7)
        self._point_at(version)
        _kill_point(8)
        if old is not None and old != version:
            self._discard(old)
        return None


PUBLISH_KILL_POINTS = 8


def _kill_point(step: int) -> None:
    """Tests only: die by SIGKILL just before publish step `step` (KILL_AT_ENV)."""
    if os.environ.get(KILL_AT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def damage_of(model: type[BaseModel], path: Path) -> str:
    """What is wrong with a record file that does not load: for messages."""
    data = read_json(path)
    if data is None:
        return f"{path.name} is not readable JSON"
    if not isinstance(data, dict):
        return f"{path.name} holds a {type(data).__name__}, not a record"
    try:
        model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(record)"
        return f"{path.name}: {where}: {first['msg'].removeprefix('Value error, ')}"
    return f"{path.name} is damaged"


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
        never written, so the store is not created or changed. StoreError when the path
        cannot hold a store (a regular file, a path through one)."""
        self.root = resolve_root(root)
        self.read_only = read_only
        problem = _not_a_folder(self.root)
        if problem is not None:
            raise StoreError(f"--store {self.root}: {problem}; use a folder "
                             "(--store DIR or $PHI4_STORE)")
        self.hashes = mf.HashCache(self.root / "cache" / "sha256", read_only=read_only)

    def ensure_writable(self) -> None:
        """Create the store if needed and prove a file can be written in it: StoreError
        (exit 2 before anything runs) otherwise."""
        probe = self.root / "stages" / f".probe.{os.getpid()}.tmp"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"--store {self.root} cannot be written: "
                             f"{err.strerror or err}; use a writable folder "
                             "(--store DIR or $PHI4_STORE)") from None

    def stage_dir(self, name: str, fingerprint: str) -> StageDir:
        return StageDir(self, name, fingerprint)

    def stage_names(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / "stages").iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

    def stage_dirs(self, name: str) -> list[StageDir]:
        """Every fingerprint of stage `name` in the store."""
        try:
            entries = list((self.root / "stages" / name).iterdir())
        except OSError:
            return []
        return [StageDir(self, name, p.name) for p in entries
                if _FINGERPRINT.fullmatch(p.name) and p.is_dir()]

    def collect_trash(self) -> None:
        """Remove what a killed `phi4 gc` left beside the stage folders (`.trash.*`)."""
        for name in self.stage_names():
            with contextlib.suppress(OSError):
                for entry in (self.root / "stages" / name).iterdir():
                    if entry.name.startswith(".trash."):
                        remove_tree(entry)

    def set_latest(self, name: str, fingerprint: str) -> None:
        path = self.root / "stages" / name / "latest"
        problem = record_file_problem(path)
        if problem is not None:
            raise StoreError(problem)
        tmp = path.with_name(f".latest.{os.getpid()}")
        try:
            tmp.write_text(fingerprint)
            os.replace(tmp, path)
        except OSError as err:
            raise StoreError(f"cannot write {path}: {err.strerror or err}") from None

    def latest(self, name: str) -> StageDir | None:
        """The folder of the stage's most recent attempt (any fingerprint). A `latest` that
        is unreadable or names no folder here is not trusted: the folder whose status was
        written last stands in (and the next attempt rewrites the pointer)."""
        text = read_small_text(self.root / "stages" / name / "latest")
        fp = (text or "").strip()
        if _FINGERPRINT.fullmatch(fp) and self.stage_dir(name, fp).path.is_dir():
            return StageDir(self, name, fp)
        written = [(_mtime(d.status_file), d.fingerprint) for d in self.stage_dirs(name)]
        newest = max(((t, fp) for t, fp in written if t is not None), default=None)
        return StageDir(self, name, newest[1]) if newest else None

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


def _not_a_folder(root: Path) -> str | None:
    """Why `root` can never be a store folder (it, or a folder above it, is a file)."""
    for path in (root, *root.parents):
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # the first part that exists says
        except OSError as err:
            return f"cannot be used: {err.strerror or err}"
        if stat.S_ISDIR(st.st_mode):
            return None
        return "is a file, not a folder" if path == root else f"{path} is a file, not a folder"
    return None


def _mtime(path: Path) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def read_small_text(path: Path) -> str | None:
    """A small regular file's text; None when absent, not a regular file or unreadable."""
    try:
        with open(path, "rb", opener=_regular_opener) as f:
            return f.read(4096).decode("utf-8", errors="replace")
    except (OSError, mf.UnreadableFile):
        return None
