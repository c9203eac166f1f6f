"""Reaching a cluster's login node over SSH (a cluster file's `ssh:`).

Slurm's commands run there as `ssh ... user@host -- 'squeue ...'`, non-interactively
(BatchMode: a password prompt would hang a `phi4 status`) and only to a host whose key the
system `ssh` already knows: NeMo-Run's rsync step runs plain `ssh`, which refuses an unknown
key, so phi4 refuses it first, with the command that fixes it. `preflight` says what is
missing (host key, rsync on either end, sbatch, the host itself) before anything is written.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..records import LoginRecord

# What ssh itself prints (it exits 255) when it did not reach the remote command.
_HOST_KEY = ("Host key verification failed", "host key is known", "No matching host key")
_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
_DENIED = "Permission denied"


class SshProblem(Exception):
    """The login node cannot be used: one line saying why and what to do."""


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    user: str
    identity: str | None = None

    @classmethod
    def of(cls, record: LoginRecord) -> Login:
        return cls(record.host, int(record.port), record.user, record.identity)

    def record(self) -> LoginRecord:
        return LoginRecord(host=self.host, port=self.port, user=self.user,
                           identity=self.identity)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def argv(self, command: list[str], timeout_s: float = 15) -> list[str]:
        """`ssh` running `command` (quoted for the remote shell) on the login node."""
        identity = ["-i", str(Path(self.identity).expanduser())] if self.identity else []
        return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={max(1, int(timeout_s))}", "-p", str(self.port),
                *identity, f"{self.user}@{self.host}", "--", shlex.join(command)]

    def problem(self, said: str) -> str | None:
        """What ssh's own error (exit 255) means, with what to do; None for another error."""
        text = " ".join(said.split())
        if _CHANGED in said:
            return (f"the host key of {self.host}:{self.port} has CHANGED since it was "
                    f"recorded in known_hosts: check with the cluster's admins, then "
                    f"`ssh-keygen -R '[{self.host}]:{self.port}'` and connect once")
        if any(mark in said for mark in _HOST_KEY):
            return (f"the host key of {self.host}:{self.port} is not known to ssh: connect "
                    f"once with `ssh -p {self.port} {self.user}@{self.host}` and accept it "
                    "(NeMo-Run's rsync uses the system ssh, which refuses unknown hosts)")
        if _DENIED in said:
            key = f" with the key {self.identity}" if self.identity else ""
            return (f"{self.where} refused the login{key} ({text[-160:]}): check ssh.user "
                    "and ssh.identity in the cluster file")
        return f"cannot reach {self.where}: {text[-200:] or 'ssh failed'}"


def preflight(login: Login, needs: tuple[str, ...] = ("rsync", "sbatch")) -> None:
    """SshProblem unless ssh reaches the login node and both ends have what NeMo-Run uses."""
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise SshProblem(f"{tool} is not installed on this machine (NeMo-Run's SSHTunnel "
                             f"copies its job folders with rsync over ssh)")
    probe = "; ".join(f"command -v {shlex.quote(t)} >/dev/null || echo missing:{t}"
                      for t in needs)
    try:
        r = subprocess.run(login.argv(["sh", "-c", probe]), capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SshProblem(f"cannot reach {login.where}: ssh did not answer in 60 s") from None
    if r.returncode == 255:
        raise SshProblem(login.problem(r.stderr) or f"ssh to {login.where} failed")
    missing = [line.split(":", 1)[1] for line in r.stdout.split() if line.startswith("missing:")]
    if r.returncode != 0 or missing:
        what = ", ".join(missing) or f"the check itself (exit {r.returncode}: {r.stderr.strip()})"
        raise SshProblem(f"{login.where} lacks {what}: NeMo-Run needs rsync and Slurm's "
                         "commands on the login node (install them, or fix its PATH)")
