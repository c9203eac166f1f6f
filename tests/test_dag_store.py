"""The store's pieces: content hashes and their cache, publishing, verification, locks."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator import manifest as mf
from orchestrator.fingerprint import content_digest, describe_changes, expand, flatten
from orchestrator.records import State
from orchestrator.store import Store, resolve_root


def _old(path: Path, seconds: float = 60) -> None:
    """Backdate a file so that its hash may be cached (it is no longer "racy")."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_store_root_from_flag_env_or_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHI4_STORE", raising=False)
    assert resolve_root(None) == tmp_path / "phi4_runs"
    monkeypatch.setenv("PHI4_STORE", str(tmp_path / "env"))
    assert resolve_root(None) == tmp_path / "env"
    assert resolve_root("flag") == tmp_path / "flag"


def test_hash_cache_skips_rereads_yet_sees_rewrites(tmp_path: Path, monkeypatch) -> None:
    cache = mf.HashCache(tmp_path / "cache")
    data = tmp_path / "weights.bin"
    data.write_bytes(b"x" * 1000)
    first = cache.sha256(data)
    assert not (tmp_path / "cache").exists()  # just written: too fresh to trust a cache entry
    time.sleep(0.01)
    monkeypatch.setattr(mf, "RACY_SECONDS", 0.0)
    assert cache.sha256(data) == first
    assert len(list((tmp_path / "cache").rglob("*"))) == 2  # fan-out folder and one entry
    reads = []
    monkeypatch.setattr(mf, "hash_file", lambda p, rel=None: reads.append(p) or "cached?")
    assert cache.sha256(data) == first and reads == []
    # Same size, mtime put back: ctime still moves, so the cache entry no longer applies.
    st = data.stat()
    data.write_bytes(b"y" * 1000)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(data) == "cached?" and reads == [data]


def test_manifest_check_names_the_first_difference(tmp_path: Path) -> None:
    cache = mf.HashCache(None)
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"aaaa")
    (root / "sub" / "b.bin").write_bytes(b"bb")
    built = mf.build(root, cache)
    assert sorted(built) == ["a.bin", "sub/b.bin"] and built["a.bin"]["size"] == 4
    assert mf.check(root, built, cache) is None
    (root / "a.bin").write_bytes(b"aaab")
    assert mf.check(root, built, cache) == "a.bin sha256 mismatch"
    (root / "a.bin").write_bytes(b"a")
    assert mf.check(root, built, cache) == "a.bin size 1 != 4"
    (root / "a.bin").unlink()
    assert mf.check(root, built, cache) == "a.bin missing"
    (root / "a.bin").write_bytes(b"aaaa")
    (root / "extra").write_bytes(b"")
    assert mf.check(root, built, cache) == "extra not in the manifest"


def test_publish_swaps_artifacts_and_begin_keeps_checkpoints(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    folder = store.stage_dir("s", "f" * 16)
    folder.begin("test", command=[], reasons=[], inputs={})
    assert folder.status().state == State.RUNNING and folder.status().attempt == 1
    assert store.latest("s").fingerprint == "f" * 16
    (folder.checkpoints / "step_10").write_text("ckpt")
    (folder.staging / "model").mkdir()
    (folder.staging / "model" / "w.bin").write_bytes(b"w")
    assert folder.artifact_problem(["model"]) == "artifact missing"
    assert "did not write $PHI4_OUTPUT_DIR/speech/" in folder.publish(["model", "speech"])
    assert folder.publish(["model"]) is None
    assert not folder.staging.exists() and folder.artifact_problem(["model"]) is None
    assert folder.manifest().artifacts["model"]["w.bin"]["size"] == 1
    # A new attempt keeps the published output until it publishes its own, and keeps the
    # checkpoints of an attempt that did not finish.
    folder.begin("test", command=[], reasons=[], inputs={})
    assert folder.status().attempt == 2
    assert folder.artifact_problem(["model"]) is None
    assert (folder.checkpoints / "step_10").read_text() == "ckpt"
    (folder.staging / "model").mkdir()
    (folder.staging / "model" / "w.bin").write_bytes(b"w2")
    assert folder.publish(["model"]) is None
    assert folder.manifest().artifacts["model"]["w.bin"]["size"] == 2
    assert (folder.artifacts / "model" / "w.bin").read_bytes() == b"w2"
    assert not any(p.name.startswith((".trash", ".manifest")) for p in folder.path.iterdir())
    # After a finished attempt, a rerun (forced, or an input republished) starts over.
    folder.end(State.SUCCEEDED, exit_code=0)
    folder.begin("test", command=[], reasons=[], inputs={})
    assert folder.checkpoints.is_dir() and not any(folder.checkpoints.iterdir())
    assert folder.status().start_over is False


def test_lock_is_exclusive_and_released_by_close(tmp_path: Path) -> None:
    folder = Store(tmp_path).stage_dir("s", "0" * 16)
    first, second = folder.lock(), folder.lock()
    assert first.try_acquire()
    assert not second.try_acquire() and second.is_held_elsewhere()
    folder.begin("local", command=[], reasons=[], inputs={})
    assert folder.state() == State.RUNNING
    first.release()
    assert folder.state() == State.INTERRUPTED  # running, but nobody holds the lock
    assert second.try_acquire()
    second.release()


def test_newest_succeeded_skips_corrupt_attempts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for i, fp in enumerate(("a" * 16, "b" * 16)):
        folder = store.stage_dir("s", fp)
        folder.begin("test", command=[], reasons=[], inputs={})
        (folder.staging / "out").mkdir()
        (folder.staging / "out" / "f").write_text(fp)
        folder.publish(["out"])
        folder.end(State.SUCCEEDED, exit_code=0, ended=1000.0 + i)
    assert store.newest_succeeded("s", "out").fingerprint == "b" * 16
    (store.stage_dir("s", "b" * 16).artifacts / "out" / "f").write_text("x" * 16)
    assert store.newest_succeeded("s", "out").fingerprint == "a" * 16
    assert store.newest_succeeded("s", "nope") is None


def test_data_patterns_expand_like_shards_globs_and_prefixes(tmp_path: Path) -> None:
    for name in ("00.tar", "01.tar", "02.tar", "web.bin", "web.idx"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in expand(f"{tmp_path}/{{00..01}}.tar")] == ["00.tar", "01.tar"]
    assert len(expand(f"{tmp_path}/*.tar")) == 3
    assert [p.name for p in expand(f"{tmp_path}/web")] == ["web.bin", "web.idx"]
    assert expand(f"{tmp_path}/nothing") == []
    cache = mf.HashCache(None)
    assert content_digest(f"{tmp_path}/{{00..01}}.tar", cache) != content_digest(
        f"{tmp_path}/{{00..02}}.tar", cache)


def test_glob_over_folders_keeps_same_named_files_apart(tmp_path: Path) -> None:
    for shard in ("a", "b"):
        (tmp_path / shard).mkdir()
        (tmp_path / shard / "s.txt").write_text("one")
    cache = mf.HashCache(None)
    pattern = f"{tmp_path}/*/s.txt"
    before = content_digest(pattern, cache)
    (tmp_path / "a" / "s.txt").write_text("two")  # same size, other bytes
    assert content_digest(pattern, cache) != before
    # Shards in one folder are keyed by their bare names, as before.
    for name in ("00.tar", "01.tar"):
        (tmp_path / name).write_text(name)
    assert content_digest(f"{tmp_path}/*.tar", cache) == mf.digest(
        {n: mf.build(tmp_path / n, cache)[n] for n in ("00.tar", "01.tar")})


def test_fields_and_their_changes() -> None:
    old = flatten({"train": {"steps": 40, "lr": 1e-3}, "data": {"sources": [{"kind": "x"}]},
                   "env": {}, "inputs": {"b": {"stage": "b", "fingerprint": "1234567890"}}})
    assert old["data.sources[0].kind"] == "x" and "env" not in old
    new = {**old, "train.steps": 50, "inputs.b.fingerprint": "abcdefabcdef", "env.X": "1"}
    assert describe_changes(old, new) == ['env.X: (unset) -> "1"',
                                          "input b changed (b fingerprint 12345678 -> abcdefab)",
                                          "train.steps: 40 -> 50"]
    many = {f"k{i}": i for i in range(10)}
    assert describe_changes({}, many)[-1] == "and 4 more fields"
