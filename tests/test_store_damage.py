"""Damaged store records and unusable stores: each is a clear message and exit 2, or repaired;
never a traceback, never a silent discard of checkpoints (fuzz-style: every record, many
kinds of damage)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from dag_helpers import counts, make_pipeline, phi4

from orchestrator import status as status_view
from orchestrator.config import load_pipeline
from orchestrator.graph import build_graph
from orchestrator.plan import make_plan
from orchestrator.store import Store, StoreError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Stage a published; b failed after checkpointing (its rerun resumes: `resumed_b`). Kept as
    store.orig: fingerprints hash the recipes' paths, so every test reuses this folder."""
    root = tmp_path_factory.mktemp("pristine")
    make_pipeline(root, {"a": [], "b": ["a"]})
    (root / "fail_b").touch()
    phi4("run", str(root / "pipeline.yaml"), store=root / "store", check=1)
    (root / "fail_b").unlink()
    shutil.copytree(root / "store", root / "store.orig", symlinks=True)
    return root


def _copy(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The pristine store again, in place (tmp_path unused: the paths must not change)."""
    store = pristine / "store"
    if store.exists():
        _make_writable(store)
        shutil.rmtree(store)
    shutil.copytree(pristine / "store.orig", store, symlinks=True)
    for name in ("counter.txt", "resumed_b", "resumed_a"):
        (pristine / name).unlink(missing_ok=True)
    return pristine, store


def _make_writable(path: Path) -> None:
    for folder, dirs, _ in os.walk(path):
        for name in dirs:
            target = os.path.join(folder, name)
            if not os.path.islink(target):
                os.chmod(target, 0o755)


def _stage(store: Path, name: str) -> Path:
    (path,) = [p for p in (store / "stages" / name).iterdir() if p.name != "latest"
               and not p.name.startswith(".")]
    return path


def _manifest(store: Path) -> Path:
    return _stage(store, "a") / "artifacts" / "manifest.json"


def _set(path: Path, text: str | bytes) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)


def _json(record: dict, key: str, value) -> str:
    return json.dumps({**record, key: value} if value is not _DROP else
                      {k: v for k, v in record.items() if k != key})


_DROP = object()
WHOLE = {"list": "[1, 2]", "string": '"text"', "number": "7", "null": "null", "empty": "",
         "torn": '{"state": "succ', "binary": b"\xff\xfe\x00garbage",
         "deep": "[" * 5000 + "]" * 5000}
VALUES = {"drop": _DROP, "null": None, "list": [1], "string": "x", "negative": -1,
          "huge": 10**400, "mapping": {"x": {}}}


def _damages() -> dict[str, tuple[str, object]]:
    """Each case: name -> (which record, damage): whole-file replacements and one key at a time."""
    out: dict[str, tuple[str, object]] = {}
    for record in ("status", "manifest"):
        for kind, text in WHOLE.items():
            out[f"{record} is {kind}"] = (record, text)
        keys = ("state", "attempt", "inputs", "stage") if record == "status" else \
            ("artifacts", "created", "inputs", "size", "sha256")
        for key in keys:
            for kind, value in VALUES.items():
                out[f"{record}.{key} {kind}"] = (record, (key, value))
    return out


DAMAGES = _damages()


def _damage(store: Path, record: str, damage) -> None:
    if record == "status":
        path = _stage(store, "b") / "status.json"
    else:
        path = _manifest(store)
    data = json.loads(path.read_text())
    if isinstance(damage, tuple):
        key, value = damage
        if key in ("size", "sha256"):
            entry = data["artifacts"]["out"]["data.txt"]
            text = json.dumps({**data, "artifacts": {"out": {"data.txt": json.loads(
                _json(entry, key, value))}}})
        else:
            text = _json(data, key, value)
    else:
        text = damage
    _set(path, text)


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_damaged_records_plan_report_and_rerun(pristine: Path, tmp_path: Path,
                                               name: str) -> None:
    root, store = _copy(pristine, tmp_path)
    record, damage = DAMAGES[name]
    _damage(store, record, damage)
    # In-process, every reader: plan (read-only), status rows. No exception escapes.
    loaded = load_pipeline(root / "pipeline.yaml")
    plan = make_plan(build_graph(loaded.stages), Store(store, read_only=True))
    rows = {r.stage: r for r in status_view.collect(Store(store, read_only=True))}
    assert set(rows) == {"a", "b"}  # no stage vanishes
    a, b = plan.stages["a"], plan.stages["b"]
    if record == "manifest" and a.verdict == "run":
        assert any("artifact" in r for r in a.reasons), a.reasons
    if record == "status":
        assert b.verdict == "run" and rows["b"].state in ("failed", "damaged"), rows["b"]
        if rows["b"].state == "damaged":
            assert "checkpoints/ kept" in rows["b"].note
            assert any("record is damaged" in r for r in b.reasons), b.reasons
    if name.split()[-1] not in ("drop", "string") and " is " not in name:
        # The next attempt (what a rerun begins with) keeps b's checkpoints.
        folder = Store(store).stage_dir("b", b.fingerprint)
        folder.begin("local", command=[], reasons=[], inputs={})
        assert (folder.checkpoints / "ckpt").exists()
        return
    # The CLI run repairs (reruns what is not verifiably done) with no traceback, and the
    # checkpoints of b's unfinished attempt are resumed from, never discarded.
    done = phi4("run", str(root / "pipeline.yaml"), store=store, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (root / "resumed_b").exists()
    assert counts(root).get("b") == 1


def _cache_entries(store: Path) -> list[Path]:
    return [p for p in (store / "cache" / "sha256").rglob("*") if p.is_file()]


@pytest.mark.parametrize("damage", ["garbage", "empty", "wrong digest", "old format wrong",
                                    "folder"])
def test_damaged_hash_cache_entries_are_not_trusted_nor_restart_good_stages(
        pristine: Path, tmp_path: Path, damage: str) -> None:
    root, store = _copy(pristine, tmp_path)
    phi4("run", str(root / "pipeline.yaml"), store=store, check=0)
    time.sleep(2.2)  # no longer "racy": the next run caches every hash it computes
    phi4("run", str(root / "pipeline.yaml"), store=store, check=0)
    entries = _cache_entries(store)
    assert entries
    for entry in entries:
        if damage == "folder":
            entry.unlink()
            entry.mkdir()
        else:
            entry.write_text({"garbage": "\x00zz", "empty": "",
                              "wrong digest": "0" * 64 + " " + "0" * 16,
                              "old format wrong": "0" * 64}[damage])
    before = counts(root)
    done = phi4("run", str(root / "pipeline.yaml"), store=store)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert counts(root) == before  # nothing started over
    assert "2 stages up to date" in done.stdout


def test_a_lock_or_record_that_is_a_folder_is_exit_2_with_the_path(pristine: Path,
                                                                   tmp_path: Path) -> None:
    for what in (".lock", "status.json", "latest"):
        root, store = _copy(pristine, tmp_path)
        path = (_stage(store, "b") / what) if what != "latest" else \
            store / "stages" / "b" / "latest"
        _set(path, "")
        path.unlink()
        path.mkdir()
        done = phi4("run", str(root / "pipeline.yaml"), store=store)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{path} is a folder, not a file" in done.stderr
        status = phi4("status", store=store)
        assert status.returncode == 0 and "Traceback" not in status.stderr
        path.rmdir()  # as the message says: move it away
        phi4("run", str(root / "pipeline.yaml"), store=store, check=0)
        assert (root / "resumed_b").exists()


@pytest.mark.parametrize("pointer", ["garbage", "0123456789abcdef", "", "../../etc"])
def test_a_bad_latest_pointer_does_not_hide_a_stage(pristine: Path, tmp_path: Path,
                                                    pointer: str) -> None:
    root, store = _copy(pristine, tmp_path)
    (store / "stages" / "b" / "latest").write_text(pointer)
    rows = {r["stage"]: r for r in json.loads(
        phi4("status", "--format", "json", store=store, check=0).stdout)["stages"]}
    assert rows["b"]["state"] == "failed"
    phi4("run", str(root / "pipeline.yaml"), store=store, check=0)
    assert (store / "stages" / "b" / "latest").read_text() == _stage(store, "b").name


def test_an_unusable_store_is_exit_2(tmp_path: Path, monkeypatch) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    regular = tmp_path / "file"
    regular.write_text("")
    for store, said in ((regular, "is a file, not a folder"),
                        (regular / "store", f"{regular} is a file, not a folder")):
        for command in (["run", str(pipeline)], ["plan", str(pipeline)], ["status"]):
            done = phi4(*command, store=store)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert said in done.stderr, (command, done.stderr)
    # A read-only folder (root writes anywhere, so the refusal is simulated).
    real = Path.write_text

    def refuse(self, *args, **kwargs):
        if ".probe." in self.name:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(StoreError, match="cannot be written: Permission denied"):
        Store(tmp_path / "ro").ensure_writable()
    assert not os.path.exists(tmp_path / "ro" / "stages" / ".probe")
