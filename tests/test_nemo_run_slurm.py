"""`phi4 run --executor nemo_run --cluster` against the real local Slurm: NeMo-Run's
SlurmExecutor with a LocalTunnel, and with an SSHTunnel to an sshd on loopback (its own config
and keys in a scratch folder, stopped by pid at the end). Command stages only: each NeMo-Run
driver pays NeMo-Run's import. Skipped without Slurm up or without the `nemo-run` extra; the
SSH test also without sshd and rsync (scripts/ssh_deps.sh installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dag_helpers import counts, make_pipeline
from slurm_helpers import LOCAL_CLUSTER, phi4, recorded, status, why_not_up

pytestmark = pytest.mark.slurm
try:  # the import itself is what can break (a leptonai release it cannot import)
    import nemo_run  # noqa: F401
    HAVE_NEMO_RUN = True
except ImportError:
    HAVE_NEMO_RUN = False


@pytest.fixture(scope="module")
def slurm():
    if not HAVE_NEMO_RUN:
        pytest.skip("nemo_run is not importable: pip install 'phi4[nemo-run]'")
    reason = why_not_up()
    if reason:
        pytest.skip(reason)
    stores: list[Path] = []
    yield stores
    for store in stores:  # whatever a failed test left queued
        phi4("cancel", str(store.parent / "pipeline.yaml"), "--store", str(store))


def _cluster(path: Path, **values) -> Path:
    """A cluster file: clusters/local.yaml with `values` over it."""
    path.write_text(json.dumps({"extends": str(LOCAL_CLUSTER), **values}))
    return path


def _nemo(pipeline: Path, store: Path, cluster: Path, *args: str, env=None):
    return phi4("run", str(pipeline), "--store", str(store), "--executor", "nemo_run",
                "--cluster", str(cluster), *args, timeout=300, env=env)


def _wait_status(store: Path, done, what: str, env: dict[str, str], timeout: float = 120
                 ) -> dict[str, dict]:
    """Poll `phi4 status` (with `env`) until `done(rows)`."""
    deadline = time.monotonic() + timeout
    while True:
        out = phi4("status", "--format", "json", "--store", str(store), env=env, check=0)
        rows = {row["stage"]: row for row in json.loads(out.stdout)["stages"]}
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s: "
                        + json.dumps({k: (v["state"], v["note"]) for k, v in rows.items()}))
        time.sleep(0.3)


def _squeue(job_ids: list[str]) -> str:
    return subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True,
                          text=True, timeout=30).stdout.strip()


def test_two_stages_run_through_slurm_with_afterok(slurm, tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    slurm.append(store)
    out = _nemo(pipeline, store, LOCAL_CLUSTER, "--wait", "--poll", "0.2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = status(store)
    assert {n: (r["state"], r["executor"]) for n, r in rows.items()} == {
        "a": ("succeeded", "nemo_run"), "b": ("succeeded", "nemo_run")}
    a, b = recorded(store, "a"), recorded(store, "b")
    assert a["job_id"].isdigit() and b["depends_on"] == {"a": a["job_id"]}
    assert next((store / "stages" / "b").glob("*/artifacts/out/data.txt")).read_text() == \
        "b:[a:]"
    assert counts(tmp_path) == {"a": 1, "b": 1}
    # NeMo-Run's own sbatch script: afterok on a's job, removed by Slurm if a fails, and our
    # paths intact (its home is <store>/nemorun: nothing in it holds '/nemo_run').
    assert b["started"] >= a["ended"]  # afterok (on sbatch's command line)
    script = next((store / "nemorun" / "experiments").rglob("b_sbatch.sh")).read_text()
    assert "#SBATCH --kill-on-invalid-dep=yes" in script and "/nemo_run" not in script
    task = next((store / "nemorun" / "experiments").rglob("scripts/b.sh")).read_text()
    assert f"phi4_stage_dir={store / 'stages' / 'b'}/" in task
    assert Path(b["job_log"]).is_file()


def test_a_launch_failure_is_a_failure_with_its_reason(slurm, tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    # sbatch refuses the job: nothing queued, the run exits 2 naming sbatch's error.
    store = tmp_path / "refused"
    slurm.append(store)
    out = _nemo(pipeline, store, _cluster(tmp_path / "nosuch.yaml", partition="nosuch"))
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "phi4: NeMo-Run could not submit a (a: sbatch: error: " in out.stderr
    assert "Invalid partition name" in out.stderr and "not submitted after it: b" in out.stderr
    rows = status(store)
    assert rows["a"]["state"] == "failed" and "Invalid partition name" in rows["a"]["note"]
    assert (rows["b"]["state"], rows["b"]["note"]) == ("blocked",
                                                      "not submitted: upstream a could not be")
    # The job starts and dies before phi4's hooks (a setup line exits 7): --wait exits 1, the
    # stage is failed with Slurm's word and NeMo-Run's log, and nothing is left queued.
    store = tmp_path / "dies"
    slurm.append(store)
    out = _nemo(pipeline, store, _cluster(tmp_path / "dies.yaml", setup=["exit 7"]),
                "--wait", "--poll", "0.2")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    rows = status(store)
    a_job, b_job = recorded(store, "a")["job_id"], recorded(store, "b")["job_id"]
    assert rows["a"]["state"] == "failed" and rows["a"]["note"].startswith(
        f"Slurm job {a_job} ended FAILED (exit 7:0) without phi4's end record; log: ")
    assert rows["a"]["note"].endswith(recorded(store, "a")["job_log"])
    assert rows["b"]["state"] == "blocked"
    assert rows["b"]["note"].startswith("never ran: upstream a failed"), rows["b"]
    assert _squeue([a_job, b_job]) == ""
    assert counts(tmp_path) == {}


def test_a_nemo_run_path_is_refused_before_anything_is_submitted(slurm, tmp_path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]},
                             env={"b": {"WHERE": "/data/nemo_run/x"}})
    store = tmp_path / "nemo_run" / "store"
    out = _nemo(pipeline, store, LOCAL_CLUSTER)
    assert (out.returncode, out.stderr.splitlines()[-1]) == (2, (
        f"phi4: the store {store} holds '/nemo_run': NeMo-Run replaces every '/nemo_run' in "
        "its sbatch scripts with the job's folder, so this value would be mangled; use another "
        "path")), out.stderr
    assert not list(store.glob("stages/*/*/status.json"))
    out = _nemo(pipeline, tmp_path / "store", LOCAL_CLUSTER)  # a recipe's env: file:line
    assert out.returncode == 2 and f"{tmp_path / 'recipes' / 'b.yaml'}:" in out.stderr
    assert "env.WHERE: holds '/nemo_run'" in out.stderr, out.stderr
    out = _nemo(make_pipeline(tmp_path / "p2", {"a": []}), tmp_path / "store",
                _cluster(tmp_path / "c.yaml", container_mounts=["/x/nemo_run:/y"]))
    assert out.returncode == 2 and "container_mounts[0]: holds '/nemo_run'" in out.stderr
    assert not list((tmp_path / "store").glob("stages/*/*/status.json"))
    assert counts(tmp_path) == {}


# ------------------------------------------------------------------------------------------
# Submitting from "another machine": through an sshd on loopback
# ------------------------------------------------------------------------------------------

SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path: Path):
    """An sshd on 127.0.0.1 for this user, keys and config in a scratch folder; its host key is
    put in known_hosts by the test (and taken out again here)."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists() or shutil.which("rsync") is None:
        pytest.skip("sshd or rsync is missing: scripts/ssh_deps.sh installs them")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True, timeout=30)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(SSHD_CONFIG.format(port=port, d=d))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation folder
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=open(d / "sshd.log", "w"))
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not start listening"
            time.sleep(0.1)
    host_key = " ".join((d / "host_key.pub").read_text().split()[:2])
    try:
        yield {"port": port, "dir": d, "known": f"[127.0.0.1]:{port} {host_key}\n"}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{port}"], capture_output=True,
                       timeout=30)


def _no_local_slurm(tmp_path: Path) -> dict[str, str]:
    """PATH for a "laptop": Slurm's commands fail if ever run here (they come first)."""
    bin_dir = tmp_path / "laptop-bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "scontrol", "sacct", "scancel"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'no Slurm on the laptop' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_laptop_to_cluster_through_ssh(slurm, sshd, tmp_path: Path) -> None:
    # a -> b runs through and publishes; c is held running, for status and cancel over ssh.
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"], "c": []})
    store = tmp_path / "store"
    slurm.append(store)
    cluster = _cluster(tmp_path / "ssh.yaml", name="via_ssh", ssh={
        "host": "127.0.0.1", "port": sshd["port"], "user": os.environ.get("USER") or "root",
        "identity": str(sshd["dir"] / "user_key"), "job_dir": str(tmp_path / "jobs")})
    laptop = _no_local_slurm(tmp_path)
    out = _nemo(pipeline, store, cluster, env=laptop)  # its host key is not known yet
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"the host key of 127.0.0.1:{sshd['port']} is not known to ssh" in out.stderr
    assert not list(store.glob("stages/*/*/status.json"))

    known = Path.home() / ".ssh" / "known_hosts"
    known.parent.mkdir(mode=0o700, exist_ok=True)
    with known.open("a") as f:
        f.write(sshd["known"])
    (tmp_path / "hold_c").touch()
    out = _nemo(pipeline, store, cluster, env=laptop)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # `phi4 status` from the "laptop": Slurm is asked over ssh.
    rows = _wait_status(store, lambda r: r["a"]["state"] == r["b"]["state"] == "succeeded"
                        and r["c"]["state"] == "running", "a, b succeeded and c running",
                        laptop)
    assert recorded(store, "c")["login"]["port"] == sshd["port"]
    assert next((store / "stages" / "b").glob("*/artifacts/out/data.txt")).read_text() == \
        "b:[a:]"
    assert (tmp_path / "jobs").is_dir()  # NeMo-Run's job folders, copied with rsync
    c_job = rows["c"]["job"]
    out = phi4("cancel", "c", "--store", str(store), env=laptop, check=0)
    assert out.stdout.splitlines() == [f"cancelled  c: job {c_job}"]
    rows = _wait_status(store, lambda r: r["c"]["state"] == "cancelled", "c cancelled", laptop)
    assert rows["c"]["note"].startswith(f"cancelled by phi4 cancel (job {c_job})")
    deadline = time.monotonic() + 30
    while _squeue([c_job]):
        assert time.monotonic() < deadline, _squeue([c_job])
        time.sleep(0.2)
