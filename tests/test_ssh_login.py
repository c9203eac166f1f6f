"""A cluster file's `ssh:` login node: what phi4 says when it cannot be used (a fake `ssh` on
PATH answers as OpenSSH does), how Slurm's commands are sent there, and what the cluster file
accepts. The real thing (an sshd on loopback) is tests/test_nemo_run_slurm.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.config.cluster import load_cluster
from orchestrator.executors import slurm_cli
from orchestrator.executors.ssh import Login, SshProblem, preflight

LOGIN = Login("login.example.org", 2222, "me", "/keys/id_ed25519")
# What OpenSSH prints (exit 255) when it does not reach the remote command.
UNKNOWN = ("No ED25519 host key is known for [login.example.org]:2222 and you have requested "
           "strict checking.\nHost key verification failed.\n")
CHANGED = ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n"
           "Host key verification failed.\n")
REFUSED = "ssh: connect to host login.example.org port 2222: Connection refused\n"
DENIED = "me@login.example.org: Permission denied (publickey).\n"


def fake_tools(tmp_path: Path, monkeypatch, stdout: str = "", stderr: str = "", code: int = 0,
               rsync: bool = True) -> Path:
    """`ssh` that logs its argv and answers with `stdout`, `stderr` and `code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ssh").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(tmp_path / 'argv'))}\n"
        f"printf %s {shlex.quote(stdout)}\nprintf %s {shlex.quote(stderr)} >&2\nexit {code}\n")
    (bin_dir / "ssh").chmod(0o755)
    if rsync:
        (bin_dir / "rsync").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "rsync").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path / "argv"


@pytest.mark.parametrize("stderr, said", [
    (UNKNOWN, "the host key of login.example.org:2222 is not known to ssh: connect once with "
              "`ssh -p 2222 me@login.example.org` and accept it"),
    (CHANGED, "the host key of login.example.org:2222 has CHANGED"),
    (REFUSED, "cannot reach me@login.example.org:2222: ssh: connect to host login.example.org "
              "port 2222: Connection refused"),
    (DENIED, "me@login.example.org:2222 refused the login with the key /keys/id_ed25519"),
])
def test_ssh_failures_say_what_to_do(tmp_path, monkeypatch, stderr, said) -> None:
    fake_tools(tmp_path, monkeypatch, stderr=stderr, code=255)
    with pytest.raises(SshProblem) as err:
        preflight(LOGIN)
    assert str(err.value).startswith(said), str(err.value)


def test_missing_rsync_is_named_on_either_end(tmp_path, monkeypatch) -> None:
    fake_tools(tmp_path / "here", monkeypatch, rsync=False)
    with pytest.raises(SshProblem, match="^rsync is not installed on this machine"):
        preflight(LOGIN)
    argv = fake_tools(tmp_path, monkeypatch, stdout="missing:rsync\n")
    with pytest.raises(SshProblem, match="^me@login.example.org:2222 lacks rsync: "):
        preflight(LOGIN)
    # Non-interactive, only to a known host, on the port, with the key, the probe quoted.
    words = argv.read_text().splitlines()
    assert words[:8] == ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                         "ConnectTimeout=15", "-p", "2222"]
    assert words[8:12] == ["-i", "/keys/id_ed25519", "me@login.example.org", "--"]
    assert shlex.split(words[12])[:2] == ["sh", "-c"]


def test_slurm_commands_run_on_the_login_node(tmp_path, monkeypatch) -> None:
    argv = fake_tools(tmp_path, monkeypatch, stdout="17|RUNNING|None\n")
    monkeypatch.setattr(slurm_cli, "has_accounting", lambda via=None: False)
    assert slurm_cli.query(["17"], budget=0, via=LOGIN)["17"].state == "RUNNING"
    assert shlex.split(argv.read_text().splitlines()[-1]) == [
        "squeue", "-h", "-t", "all", "-j", "17", "-o", "%i|%T|%r"]
    fake_tools(tmp_path / "down", monkeypatch, stderr=REFUSED, code=255)
    with pytest.raises(slurm_cli.SlurmUnavailable, match="cannot reach me@login"):
        slurm_cli.query(["17"], budget=0, via=LOGIN)
    with pytest.raises(slurm_cli.SlurmError, match="cannot reach me@login"):
        slurm_cli.cancel(["17"], via=LOGIN)


@pytest.mark.parametrize("ssh, where", [
    ({"host": "-oProxyCommand=touch /tmp/x", "user": "me", "job_dir": "/j"}, "ssh.host"),
    ({"host": "login", "user": "me", "job_dir": "jobs"}, "ssh.job_dir"),
    ({"host": "login", "user": "me"}, "ssh.job_dir"),
    ({"host": "login", "user": "me", "job_dir": "/j", "port": 0}, "ssh.port"),
])
def test_cluster_file_ssh_is_checked(tmp_path, ssh, where) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"name: c\nssh: {ssh}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_cluster(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: c\nssh: {host: login.example.org, port: 2222, user: me, "
                  "identity: ~/.ssh/id_ed25519, job_dir: /lustre/me/nemorun}\n")
    assert load_cluster(ok).cluster.ssh.port == 2222
