"""The text of one stage's batch script. Rendering only: what goes in is decided by slurm.py
(the process layout by launch.py). The hook lines are shared with NeMo-Run's task scripts.

Quoting rules, the whole point of this module:
- `#SBATCH` lines are parsed by sbatch, not by a shell: values are plain tokens (checked) or,
  for paths, double-quoted; a value holding a quote, a backslash or a control character is
  refused (ValueError) rather than guessed at.
- Everything in the body is `shlex.quote`d, except `Raw` fragments, which only phi4 writes
  (shell variables such as `$SLURM_JOB_ID`), and the cluster file's `setup:` lines, which are
  trusted shell written by the cluster's admin.
- The exit codes the script reads from `phi4 stage-hook` and gives Slurm are exitcodes.py's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..exitcodes import FAILURE, OK, PREEMPTED, SKIP
from ..shell import shell_words

_TOKEN = re.compile(r"[A-Za-z0-9_.,:+=/@-]+")  # fullmatch: `$` lets a final newline through
_UNQUOTABLE = re.compile(r'["\\\x00-\x1f\x7f]')


def directive_value(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    if _UNQUOTABLE.search(value) or not value:
        raise ValueError(f"cannot pass {value!r} to sbatch safely (quotes, backslashes and "
                         "control characters are refused)")
    return f'"{value}"'


@dataclass
class BatchScript:
    title: str  # one comment line
    trust_note: str  # where the setup lines come from
    directives: list[tuple[str, str | None]]  # ("--time", "01:00:00"), ("--requeue", None)
    stage_dir: str
    host_python: str
    step: list[str]  # srun and its options, then the stage's argv
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    exports: list[str] = field(default_factory=list)  # Raw `NAME=...` lines (rendezvous)
    release_now: bool = False


def render(job: BatchScript) -> str:
    lines = ["#!/bin/bash", f"# {_one_line(job.title)}",
             "# Rendered by phi4: every value is checked or shell-quoted, except the setup lines",
             f"# from {_one_line(job.trust_note)}, which are trusted shell."]
    for option, value in job.directives:
        lines.append(f"#SBATCH {option}" + ("" if value is None else f"={directive_value(value)}"))
    lines += ["", *hook_lines(job.stage_dir, job.host_python), _PRELUDE]
    if job.setup:
        lines.append(f"# setup, verbatim from {_one_line(job.trust_note)}")
        lines += job.setup
        lines.append("")
    for name, value in job.env.items():
        lines.append(f"export {_name(name)}={shlex.quote(value)}")
    lines += [f"export {line}" for line in job.exports]
    lines += ["", BEGIN, "", f"{shell_words(job.step)} {WITHOUT_LOCK} &", _END, "",
              _REQUEUE % (_RELEASE if job.release_now else "")]
    return "\n".join(lines) + "\n"


def hook_lines(stage_dir: str, host_python: str) -> list[str]:
    """`phi4_hook begin|end`: phi4's bookkeeping in the store, outside any container."""
    return [f"phi4_stage_dir={shlex.quote(stage_dir)}",
            f"phi4_python={shlex.quote(host_python)}",
            'phi4_hook() { "$phi4_python" -m orchestrator stage-hook "$@" "$phi4_stage_dir"; }']


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"not an environment variable name: {name!r}")
    return name


# Run a command without the stage lock (fd 9): only the batch script holds it, so nothing the
# stage leaves running keeps the stage locked.
WITHOUT_LOCK = "9>&-"

_PRELUDE = r'''phi4_step=

# The pre-timeout signal (--signal=B:USR1) and preemption or scancel (TERM) reach this shell:
# pass them on to the step, whose stage checkpoints and exits PREEMPTED.
phi4_forward() { if [[ -n $phi4_step ]]; then kill -s "$1" "$phi4_step" 2>/dev/null; fi; }
trap 'phi4_forward USR1' USR1
trap 'phi4_forward TERM' TERM

# `wait` returns 128+N when a trapped signal arrives: wait again until the step has ended.
phi4_wait() {
    local code next
    wait "$1"; code=$?
    while (( code > 128 )); do
        wait "$1"; next=$?
        (( next == 127 )) && break  # it had already ended: $code was its own status
        code=$next
    done
    return "$code"
}

# One attempt per stage at a time, the lock local runs take (if flock exists and the
# filesystem honours it). This script alone holds it: the step runs without fd 9.
if command -v flock >/dev/null; then
    exec 9>>"$phi4_stage_dir/.lock"
    flock 9 || echo "phi4: cannot lock $phi4_stage_dir/.lock; going on" >&2
fi
'''

# Run the stage, or end the job at once: successfully when another run published it.
BEGIN = f"""phi4_hook begin
case $? in
    {OK}) ;;
    {SKIP}) exit {OK} ;;  # already published (another run finished it)
    *) exit {FAILURE} ;;
esac"""

_END = r'''phi4_step=$!
phi4_wait "$phi4_step"
phi4_code=$?
phi4_step=

# Publishes when the stage succeeded; answers PREEMPTED when it checkpointed and the job should be
# requeued.
phi4_hook end --exit-code "$phi4_code"
phi4_verdict=$?'''

_REQUEUE = r'''if (( phi4_verdict == ''' + str(PREEMPTED) + r''' )); then
%s    scontrol requeue "$SLURM_JOB_ID" || echo "phi4: scontrol requeue failed; rerun to resume" >&2
fi
exit "$phi4_verdict"'''

# `scontrol requeue` holds a job ~2 minutes before it may start again, and the request ends
# this script: a detached helper releases the job once it is pending again. Not at once: the
# node refuses to relaunch a job within the second its credential was revoked (the requeue's
# kill), and the job would fail ("Job credential revoked").
_RELEASE = r'''    setsid -f bash -c 'for _ in $(seq 600); do
        if scontrol -o show job "$1" 2>/dev/null | grep -q "JobState=PENDING"; then
            sleep 2
            exec scontrol update JobId="$1" StartTime=now
        fi
        sleep 0.2
    done' phi4-release "$SLURM_JOB_ID" </dev/null >/dev/null 2>&1 9>&-
'''
