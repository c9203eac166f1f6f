"""Run a plan as a NeMo-Run experiment: one `run.Script` task per stage, with its dependencies.

The tasks are plain data (`tasks_document`, written to JSON) so that the experiment itself is
built and run by `nemo_driver`, a small module with a main guard, in a process of its own:
NeMo-Run copies the driver's `__main__` into each experiment and executes it again when it
reloads one.

Each task's script takes the stage lock, calls `phi4 stage-hook begin`, runs the stage's own
processes as launch.py lays them out (the layout `phi4 run` uses locally, or on a cluster the
Slurm executor's), then `phi4 stage-hook end`, which publishes the artifacts: NeMo-Run only
launches. With no cluster file the tasks run through NeMo-Run's LocalExecutor (one after
another, in dependency order, while `phi4 run` waits); with one, through its SlurmExecutor,
dependencies passed to sbatch (detached: follow with NeMo-Run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import launch
from ..config.cluster import Cluster, load_cluster, stage_time
from ..exitcodes import BAD_INPUT, FAILURE
from ..plan import Plan, StagePlan
from ..records import State
from ..shell import shell_words
from .base import Executor, ExecutorError, RunOptions, Say, Submission, nothing_to_run
from .outcomes import Outcome
from .sbatch import BEGIN, WITHOUT_LOCK, hook_lines

INSTALL_HINT = "NeMo-Run is not installed: pip install 'phi4[nemo-run]'"


class NemoRunMissing(ExecutorError):
    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def available() -> bool:
    """Cheap: is the package there at all (the driver's import is the real test)?"""
    import importlib.util

    try:
        return importlib.util.find_spec("nemo_run") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["nemo_run"] is None
        return False


def import_nemo_run():
    """`nemo_run`, or NemoRunMissing (an optional extra; a broken leptonai fails the import)."""
    try:
        import nemo_run
    except ImportError:
        raise NemoRunMissing() from None
    return nemo_run


class NemoRunExecutor(Executor):
    name = "nemo_run"

    def __init__(self, plan: Plan, options: RunOptions, say: Say = print, note: Say = print):
        super().__init__(plan, options, say, note)
        self.lc = load_cluster(options.cluster_file) if options.cluster_file else None
        self.cluster = self.lc.cluster if self.lc else None
        self.detached = self.cluster is not None  # NeMo-Run's SlurmExecutor returns at once
        self.home = plan.store.root / "nemo_run"  # NEMORUN_HOME
        self._driver_code = 0

    @classmethod
    def runs_elsewhere(cls, options: RunOptions) -> bool:
        return options.cluster_file is not None  # through NeMo-Run's SlurmExecutor

    @classmethod
    def check_options(cls, options: RunOptions) -> None:
        if options.wait and options.cluster_file:
            raise ExecutorError("--wait goes with --executor slurm: follow a NeMo-Run "
                                "experiment on a cluster with NeMo-Run")

    def check(self) -> None:
        super().check()
        if not available():
            raise NemoRunMissing()
        if self.lc is not None:
            self.check_fits(self.lc)

    def dry_run(self) -> str:
        """NeMo-Run's own dry run of the experiment, built in a scratch NEMORUN_HOME."""
        self.check()
        if not self.plan.to_run():
            return nothing_to_run(self.plan) + "\n"
        with tempfile.TemporaryDirectory(prefix="phi4-nemo-") as home:
            code, said = _drive(self._document(home, dryrun=True), Path(home), capture=True)
        if code != 0:
            raise ExecutorError(f"NeMo-Run's dry run failed (exit {code}): "
                                f"{said.strip().splitlines()[-1] if said.strip() else ''}")
        return said

    def headline(self) -> str:
        where = f"SlurmExecutor on {self.cluster.name}" if self.cluster else "LocalExecutor"
        return super().headline(where=f" with NeMo-Run's {where} (NEMORUN_HOME {self.home})")

    def submit(self) -> list[Submission]:
        """Record every stage as the Slurm executor does at submission, then drive the
        experiment: to its end locally, until its jobs are queued on a cluster."""
        todo = self.plan.to_run()
        for name in todo:
            sp = self.plan.stages[name]
            folder = sp.stage_dir
            self.prepare(name)
            folder.queue(self.name, force=self.plan.selection.forces(name) and sp.selected,
                         command=list(sp.launcher(self.cluster).layout().argv),
                         reasons=sp.reasons, inputs=sp.lineage_records(),
                         cluster=self.cluster.name if self.cluster else None)
        self._driver_code, _ = _drive(self._document(str(self.home), dryrun=False), self.home)
        if self.detached and self._driver_code != 0:
            raise ExecutorError(f"the NeMo-Run driver failed (exit {self._driver_code}); "
                                "see above")
        return [Submission(name) for name in todo]

    def follow_hint(self) -> str:
        return f"submitted; follow with NeMo-Run (NEMORUN_HOME={self.home})"

    def wait(self, submitted: list[Submission]) -> dict[str, Outcome]:
        """The local experiment has ended: each stage's outcome is what its hooks recorded."""
        outcomes = {}
        for s in submitted:
            status = self.plan.stages[s.name].stage_dir.status()
            state = status.state if status is not None else State.NOT_RUN
            outcome = Outcome(State.NOT_RUN if state == State.PENDING else state,
                              (status.error or "") if status else "",
                              status.exit_code if status else None)
            outcomes[s.name] = outcome
            self.say(f"{outcome.state:<10} {s.name}"
                     + (f": {outcome.detail}" if outcome.detail else ""))
        return outcomes

    def exit_code(self, outcomes: dict[str, Outcome]) -> int:
        return super().exit_code(outcomes) or (FAILURE if self._driver_code else 0)

    def _document(self, home: str, dryrun: bool) -> dict[str, Any]:
        return tasks_document(self.plan, self.options.prefix, self.cluster, home, dryrun)


def _drive(doc: dict, home: Path, capture: bool = False) -> tuple[int, str]:
    """Run the experiment in a driver process of its own (see nemo_driver); its exit code, and
    with `capture` what it printed (rendered for this terminal's width)."""
    home.mkdir(parents=True, exist_ok=True)
    tasks = home / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    tasks.write_text(json.dumps(doc, indent=1))
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "NEMORUN_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    if capture:
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.executors.nemo_driver",
                           str(tasks)], env=env, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if proc.returncode == BAD_INPUT:
        said = (proc.stdout or "").strip().splitlines()
        raise ExecutorError("the NeMo-Run driver refused the experiment"
                            + (f": {said[-1]}" if said else " (see above)"))
    return proc.returncode, proc.stdout or ""


def task_script(sp: StagePlan, layout: launch.ProcessLayout, cluster: Cluster | None) -> str:
    """The bash a task runs. On several nodes (or one task per rank) only the first task
    (SLURM_PROCID 0) keeps the books; every task runs the stage's processes."""
    host_python = cluster.bookkeeping_python() if cluster is not None else sys.executable
    lines = [
        *hook_lines(str(sp.stage_dir.path), host_python),
        'phi4_first() { [[ "${SLURM_PROCID:-0}" == 0 ]]; }',
        "if phi4_first; then",
        '    exec > >(tee -a "$phi4_stage_dir/logs/stdout.log") 2>&1',
        '    if command -v flock >/dev/null; then exec 9>>"$phi4_stage_dir/.lock"; flock 9; fi',
        *(f"    {line}" for line in BEGIN.splitlines()),
        "fi",
        *[f"export {line}" for line in layout.exports],
        f"{shell_words(layout.argv)} {WITHOUT_LOCK}",  # the lock stays with this script
        "phi4_code=$?",
        'phi4_first || exit "$phi4_code"',
        'phi4_hook end --exit-code "$phi4_code"',
    ]
    return "\n".join(lines) + "\n"


def tasks_document(plan: Plan, title: str, cluster: Cluster | None, home: str,
                   dryrun: bool) -> dict[str, Any]:
    """Everything the driver needs, as JSON: one task per stage that must run."""
    todo = plan.to_run()
    tasks = []
    for name in todo:
        sp = plan.stages[name]
        layout = sp.launcher(cluster).layout()
        ups = sorted({e.upstream for e in plan.graph.inputs_of(name) if e.upstream in todo})
        kinds = {sp.loaded.recipe.inputs[e.input].dependency for e in plan.graph.inputs_of(name)
                 if e.upstream in todo}
        task: dict[str, Any] = {"name": name, "script": task_script(sp, layout, cluster),
                                "after": ups, "env": layout.env}
        if cluster is not None:
            task.update(
                nodes=layout.nodes, ntasks_per_node=layout.tasks_per_node,
                gpus_per_node=layout.gpus_per_node, cpus_per_task=layout.cpus_per_task,
                time=stage_time(sp.loaded, cluster),
                # One type per task in NeMo-Run: afterok unless every edge asks afterany.
                dependency_type="afterany" if kinds == {"afterany"} or (
                    not (kinds - {None}) and cluster.dependency == "afterany") else "afterok")
        tasks.append(task)
    return {"title": title, "home": home, "dryrun": dryrun, "tasks": tasks,
            "cluster": cluster.model_dump() if cluster is not None else None}


def run_document(doc: dict[str, Any]) -> int:
    """Build the experiment and run it (or print its dry run). Called by nemo_driver."""
    os.environ["NEMORUN_HOME"] = doc["home"]  # set before nemo_run reads it
    run = import_nemo_run()
    cluster = Cluster.model_validate(doc["cluster"]) if doc["cluster"] else None
    with run.Experiment(doc["title"], base_dir=doc["home"], log_level="WARN") as exp:
        ids: dict[str, str] = {}
        for task in doc["tasks"]:
            executor = _executor(run, task, cluster, doc["home"], doc["title"])
            if doc["dryrun"] and cluster is not None:
                # Handles exist only once upstream jobs are submitted: show them by name.
                executor.dependencies = [f"slurm://dryrun/<job-of-{u}>" for u in task["after"]]
            ids[task["name"]] = exp.add(run.Script(inline=task["script"]), executor=executor,
                                        name=task["name"],
                                        dependencies=[ids[u] for u in task["after"]])
        if doc["dryrun"]:
            exp.dryrun(log=True)
            return 0
        exp.run(sequential=False, detach=cluster is not None)
    return 0


def _executor(run, task: dict[str, Any], cluster: Cluster | None, home: str, title: str):
    if cluster is None:
        return run.LocalExecutor(env_vars=task["env"])
    c = cluster
    return run.SlurmExecutor(
        account=c.account, job_name_prefix=f"{title}.", partition=c.partition, qos=c.qos,
        time=task["time"],
        nodes=task["nodes"], ntasks_per_node=task["ntasks_per_node"],
        gpus_per_node=task["gpus_per_node"], cpus_per_task=task["cpus_per_task"],
        mem_per_cpu=c.mem_per_cpu, container_image=c.container_image,
        container_mounts=list(c.container_mounts),
        # NeMo-Run writes `export KEY=value` into its sbatch script unquoted: quote here.
        env_vars={k: shlex.quote(v) for k, v in task["env"].items()},
        setup_lines="\n".join(c.setup) or None, dependency_type=task["dependency_type"],
        additional_parameters={"reservation": c.reservation} if c.reservation else None,
        tunnel=run.LocalTunnel(job_dir=""), packager=run.Packager())
