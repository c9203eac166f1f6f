"""Links and special files in outputs: links that resolve inside their artifact are kept as
copies (a linked folder included); links that leave it, dangling links, loops, FIFOs, devices
and sockets fail the stage at publish with a clear message, never a hang; every reader (plan,
status, verification, fingerprint hashing of inputs) calls such a file "corrupt"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dag_helpers import REPO, phi4

from orchestrator import manifest as mf
from orchestrator.records import State
from orchestrator.store import Store

FP = "f" * 16


def _staged(tmp_path: Path):
    folder = Store(tmp_path / "store").stage_dir("s", FP)
    folder.begin("local", command=[], reasons=[], inputs={})
    out = folder.staging / "out"
    (out / "real").mkdir(parents=True)
    (out / "real" / "f").write_text("inside")
    (out / "top").write_text("top")
    (folder.staging / "other").mkdir()
    (folder.staging / "other" / "g").write_text("outside")
    return folder, out


ALLOWED = {
    "relative link to a file": (lambda out: os.symlink("top", out / "ln"), {"ln": "top"}),
    "absolute link into the artifact": (lambda out: os.symlink(out / "real" / "f", out / "ln"),
                                        {"ln": "inside"}),
    "linked folder": (lambda out: os.symlink("real", out / "dirlink"), {"dirlink/f": "inside"}),
    "link to a link inside": (lambda out: (os.symlink("top", out / "a"),
                                           os.symlink("a", out / "b")), {"a": "top", "b": "top"}),
}


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_links_inside_the_artifact_are_published_as_regular_files(tmp_path: Path,
                                                                  case: str) -> None:
    folder, out = _staged(tmp_path)
    make, expected = ALLOWED[case]
    make(out)
    assert folder.publish(["out"]) is None
    files = folder.manifest().artifacts["out"]
    for rel, text in expected.items():
        path = folder.artifacts / "out" / rel
        assert not path.is_symlink() and path.read_text() == text
        assert files[rel]["size"] == len(text)
    assert folder.artifact_problem(["out"]) is None
    # Nothing in the published tree is a link any more.
    assert all(not p.is_symlink() for p in (folder.artifacts / "out").rglob("*"))


def _fifo(out: Path) -> None:
    os.mkfifo(out / "pipe")


def _socket(out: Path) -> None:
    sock, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
    os.chdir(out)  # a relative name: AF_UNIX paths are short
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()


REFUSED = {
    "absolute link into staging/": (lambda out: os.symlink(out.parent / "other" / "g",
                                                           out / "ln"), "outside its artifact"),
    "linked folder outside": (lambda out: os.symlink(out.parent / "other", out / "ln"),
                              "outside its artifact"),
    "dangling link": (lambda out: os.symlink("nowhere", out / "ln"), "dangling link"),
    "link to /dev/zero": (lambda out: os.symlink("/dev/zero", out / "ln"),
                          "outside its artifact"),
    "loop": (lambda out: os.symlink(".", out / "real" / "ln"), "loop of links"),
    "FIFO": (_fifo, "is a FIFO"),
    "socket": (_socket, "is a socket"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_links_leaving_the_artifact_and_special_files_are_refused(tmp_path: Path,
                                                                  case: str) -> None:
    # In a process of its own with a timeout: a FIFO must never make publish hang.
    code = f"""
import os, socket, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_store_links import _staged, REFUSED
folder, out = _staged(Path({str(tmp_path)!r}))
REFUSED[{case!r}][0](out)
print(folder.publish(["out"]))
print(folder.published_version())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    problem, published = done.stdout.splitlines()
    assert problem.startswith("output out/") and REFUSED[case][1] in problem, problem
    assert "links are kept, as copies, only when they point inside" in problem
    assert published == "None"


BROKEN = {
    "FIFO": lambda f: (f.unlink(), os.mkfifo(f)),
    "link to /dev/zero": lambda f: (f.unlink(), os.symlink("/dev/zero", f)),
    "dangling link": lambda f: (f.unlink(), os.symlink("gone", f)),
    "folder": lambda f: (f.unlink(), f.mkdir()),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_readers_call_a_special_file_in_a_published_artifact_corrupt(tmp_path: Path,
                                                                     case: str) -> None:
    pipeline = tmp_path / "p.yaml"
    (tmp_path / "a.yaml").write_text(
        "name: a\nkind: command\noutputs: [out]\nresources: {gpus_per_node: 0}\n"
        f"cmd: [{json.dumps(sys.executable)}, -c, \"import os; d = os.environ['PHI4_OUTPUT_DIR']"
        " + '/out'; os.makedirs(d); open(d + '/data.txt', 'w').write('a'); "
        "open(d + '/empty', 'w').close()\"]\n")
    pipeline.write_text("name: p\nstages: [a.yaml]\n")
    store = tmp_path / "store"
    phi4("run", str(pipeline), store=store, check=0)
    # An empty file: a FIFO or /dev/zero in its place has the size the manifest says.
    BROKEN[case](next((store / "stages" / "a").glob("*/artifacts/out/empty")))
    plan = phi4("plan", str(pipeline), "--format", "json", store=store, check=0, timeout=60)
    (stage,) = json.loads(plan.stdout)["stages"]
    assert stage["verdict"] == "run"
    assert any(r.startswith("artifact corrupt: out/empty") for r in stage["reasons"]), stage
    status = phi4("status", store=store, check=0, timeout=60)
    assert "Traceback" not in status.stderr
    # The rerun rebuilds it.
    phi4("run", str(pipeline), store=store, check=0, timeout=60)
    empty = next((store / "stages" / "a").glob("*/artifacts/out/empty"))
    assert empty.is_file() and not empty.is_symlink() and empty.stat().st_size == 0


@pytest.mark.parametrize("case", ["FIFO", "dangling link", "link to /dev/zero"])
def test_hashing_an_input_folder_with_a_special_file_is_a_clear_error(tmp_path: Path,
                                                                     case: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "x").write_text("x")
    BROKEN[case](data / "x")
    (tmp_path / "a.yaml").write_text(
        "name: a\nkind: command\noutputs: [out]\nresources: {gpus_per_node: 0}\n"
        f"inputs: {{d: {{path: {json.dumps(str(data))}}}}}\ncmd: [\"true\"]\n")
    planned = phi4("plan", str(tmp_path / "a.yaml"), store=tmp_path / "store", timeout=60)
    assert planned.returncode == 0 and "1 blocked" in planned.stdout
    assert f"cannot hash {data / 'x'}" in planned.stdout
    done = phi4("run", str(tmp_path / "a.yaml"), store=tmp_path / "store", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot hash {data / 'x'}" in done.stderr


# A stage that writes a bad output beside a slow good stage, under -j 2: the bad one fails
# at publish; the good one goes on and succeeds (it is never left `running`).
STAGE = r'''
import os, sys, time
out = os.path.join(os.environ["PHI4_OUTPUT_DIR"], "out")
os.makedirs(out)
open(os.path.join(out, "data.txt"), "w").write(sys.argv[1])
if sys.argv[1] == "bad":
    if os.environ["MODE"] == "fifo":
        os.mkfifo(os.path.join(out, "pipe"))
    else:
        os.symlink(os.path.join(os.environ["PHI4_OUTPUT_DIR"], "gone"), os.path.join(out, "l"))
else:
    time.sleep(2)
'''


@pytest.mark.parametrize("mode", ["fifo", "dangling"])
def test_a_stage_failing_at_publish_does_not_abandon_the_other(tmp_path: Path,
                                                               mode: str) -> None:
    (tmp_path / "stage.py").write_text(STAGE)
    for name in ("bad", "good"):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nkind: command\noutputs: [out]\nresources: {{gpus_per_node: 0}}\n"
            f"cmd: [{json.dumps(sys.executable)}, {json.dumps(str(tmp_path / 'stage.py'))}, "
            f"{name}]\nenv: {{MODE: {mode}}}\n")
    (tmp_path / "p.yaml").write_text("name: p\nstages: [bad.yaml, good.yaml]\n")
    store = tmp_path / "store"
    done = phi4("run", str(tmp_path / "p.yaml"), "-j", "2", "--keep-going", store=store,
                timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    rows = {r["stage"]: r for r in json.loads(
        phi4("status", "--format", "json", store=store, check=0).stdout)["stages"]}
    assert rows["good"]["state"] == State.SUCCEEDED
    assert rows["bad"]["state"] == State.FAILED
    assert "output out/" in rows["bad"]["note"], rows["bad"]


def test_manifest_walk_never_opens_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(mf.UnreadableFile, match="is a FIFO"):
        mf.build(tmp_path, mf.HashCache(None))
    assert mf.check(tmp_path, {}, mf.HashCache(None)) == "pipe is a FIFO, not a regular file"


def test_an_output_folder_that_is_itself_a_link_is_refused(tmp_path: Path) -> None:
    folder, out = _staged(tmp_path)
    os.rename(out, folder.staging / "elsewhere")
    os.symlink(folder.staging / "elsewhere", out)
    assert folder.publish(["out"]).startswith("output out is a symbolic link")
    assert folder.published_version() is None
