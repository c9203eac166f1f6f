"""`phi4 run --executor nemo_run`: the plan as a NeMo-Run experiment (an optional extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ..cli import EXIT_BAD_INPUT, UsageProblem


def run_on_nemo(planned, prefix: str, title: str, cluster_file: str | None,
                dry_run: bool) -> None:
    from .. import launch
    from ..config import ConfigError
    from ..config.cluster import load_cluster, stage_problems
    from ..executors.attempts import Outcome, consumed
    from ..executors.local import exit_status
    from ..executors.nemo_run import INSTALL_HINT, available, tasks_document
    from ..store import starts_over, write_json

    if not available():
        click.echo(INSTALL_HINT, err=True)
        sys.exit(EXIT_BAD_INPUT)
    lc = load_cluster(cluster_file) if cluster_file else None
    todo = planned.to_run()
    if lc is not None:
        problems = [p for n in todo for p in stage_problems(planned.stages[n].loaded, lc)]
        if problems:
            raise ConfigError(problems)
    if not todo:
        click.echo(f"nothing to run: {planned.count('up to date')} stages up to date "
                   f"(store {planned.store.root})")
        return
    cluster = lc.cluster if lc else None
    if dry_run:  # writes nothing in the store
        with tempfile.TemporaryDirectory(prefix="phi4-nemo-") as home:
            _drive(tasks_document(planned, prefix, cluster, home, True), Path(home))
        return
    home = planned.store.root / "nemo_run"
    for name in todo:  # what the Slurm executor records at submission
        sp = planned.stages[name]
        attempt = sp.attempt
        for folder in (attempt.logs, attempt.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        write_json(attempt.spec, launch.spec_document(sp.loaded, attempt, sp.inputs))
        write_json(attempt.fields_file, sp.fields)
        attempt.update_status(start_over=starts_over(attempt.status() or {}),
                              force=planned.selection.forces(name) and sp.selected,
                              state="pending", executor="nemo_run", job_id=None,
                              submitted=time.time(), started=None, ended=None, exit_code=None,
                              error=None, blocked_by=None, command=sp.command,
                              reasons=sp.reasons, inputs=consumed(planned.store, sp.inputs))
        planned.store.set_latest(name, attempt.fingerprint)
    click.echo(f"{title}: running {len(todo)} of {len(planned.stages)} stages with NeMo-Run "
               f"({'SlurmExecutor on ' + cluster.name if cluster else 'LocalExecutor'}; "
               f"NEMORUN_HOME {home})", err=True)
    code = _drive(tasks_document(planned, prefix, cluster, str(home), False), home)
    if cluster is not None:
        click.echo(f"submitted; follow with NeMo-Run (NEMORUN_HOME={home})", err=True)
        sys.exit(code)
    outcomes = {}
    for name in todo:
        status = planned.stages[name].attempt.status() or {}
        state = status.get("state") or "not run"
        outcomes[name] = Outcome("not run" if state == "pending" else state,
                                 status.get("error") or "", status.get("exit_code"))
        click.echo(f"{outcomes[name].state:<10} {name}"
                   + (f": {outcomes[name].detail}" if outcomes[name].detail else ""))
    sys.exit(exit_status(outcomes, None) or (1 if code else 0))


def _drive(doc: dict, home: Path) -> int:
    """The experiment runs in a driver process of its own (see executors/nemo_driver)."""
    home.mkdir(parents=True, exist_ok=True)
    tasks = home / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    tasks.write_text(json.dumps(doc, indent=1))
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "NEMORUN_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.executors.nemo_driver",
                           str(tasks)], env=env)
    if proc.returncode == EXIT_BAD_INPUT:
        raise UsageProblem("the NeMo-Run driver refused the experiment (see above)")
    return proc.returncode
