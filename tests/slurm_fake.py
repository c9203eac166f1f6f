"""A fake Slurm on PATH for tests that need Slurm to misbehave on cue (no controller needed).

Jobs live in `<bin>/jobs`, one `ID|STATE|REASON` line each, which tests edit. `sbatch` appends
a PENDING job (its argv to `sbatch.log`), `scancel` marks jobs CANCELLED (ids to
`scancel.log`), `squeue -j` and `scontrol show job` read the table, `scontrol ping` is UP,
`sacct` says accounting is disabled. While `<bin>/down` exists, squeue and `scontrol show job`
misbehave as it says: `fail` (exit 1, controller unreachable), `garbage` (exit 0, an HTML
page) or `hang` (no answer for 5 s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_DOWN = r'''
if [ -e "$FAKE/down" ]; then
  case "$(cat "$FAKE/down")" in
    fail) echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2
          exit 1 ;;
    garbage) echo "<html><body>502 Bad Gateway</body></html>"; exit 0 ;;
    hang) exec sleep 5 ;;
  esac
fi
'''

SCRIPTS = {
    "sbatch": r'''
echo "$*" >> "$FAKE/sbatch.log"
n=$(( $(cat "$FAKE/next" 2>/dev/null || echo 200) + 1 ))
echo "$n" > "$FAKE/next"
echo "$n|PENDING|None" >> "$FAKE/jobs"
echo "$n"
''',
    "scancel": r'''
echo "$*" >> "$FAKE/scancel.log"
for id in "$@"; do sed -i "s/^$id|[^|]*|.*/$id|CANCELLED|None/" "$FAKE/jobs"; done
''',
    "squeue": _DOWN + r'''
ids=""
while [ $# -gt 0 ]; do [ "$1" = "-j" ] && ids="$2"; shift; done
found=0
for id in ${ids//,/ }; do
  line=$(grep "^$id|" "$FAKE/jobs" 2>/dev/null) && { echo "$line"; found=1; }
done
if [ $found = 0 ] && [ "${ids//,/}" = "$ids" ]; then
  echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
fi
''',
    "scontrol": r'''
if [ "$1" = "ping" ]; then echo "Slurmctld(primary) at fake is UP"; exit 0; fi
''' + _DOWN + r'''
id="${@: -1}"
line=$(grep "^$id|" "$FAKE/jobs" 2>/dev/null) || {
  echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
IFS='|' read -r _ state reason <<< "$line"
echo "JobId=$id JobName=x JobState=$state Reason=$reason ExitCode=0:0"
''',
    "sacct": r'''
echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1
''',
}


@dataclass
class FakeSlurm:
    bin: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE": str(self.bin),
                "PHI4_SLURM_TIMEOUT_S": "1", "PHI4_SLURM_RETRY_S": "1.5"}

    def add_job(self, job_id: str, state: str, reason: str = "None") -> None:
        with open(self.bin / "jobs", "a") as f:
            f.write(f"{job_id}|{state}|{reason}\n")

    def set_job(self, job_id: str, state: str) -> None:
        lines = [ln for ln in self.jobs_text().splitlines() if not ln.startswith(f"{job_id}|")]
        (self.bin / "jobs").write_text("".join(f"{ln}\n" for ln in lines)
                                       + f"{job_id}|{state}|None\n")

    def jobs_text(self) -> str:
        return _read(self.bin / "jobs")

    def down(self, mode: str | None) -> None:
        if mode is None:
            (self.bin / "down").unlink(missing_ok=True)
        else:
            (self.bin / "down").write_text(mode)

    @property
    def submitted(self) -> list[str]:
        """The argv of each sbatch call."""
        return _read(self.bin / "sbatch.log").splitlines()

    @property
    def cancelled(self) -> list[str]:
        return _read(self.bin / "scancel.log").split()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def fake_slurm(folder: Path) -> FakeSlurm:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in SCRIPTS.items():
        path = folder / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return FakeSlurm(folder)
