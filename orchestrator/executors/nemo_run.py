"""Run a plan as a NeMo-Run experiment: one `run.Script` task per stage, with its dependencies.

The tasks are plain data (`tasks_document`, written to JSON by the CLI) so that the experiment
itself is built and run by `nemo_driver`, a small module with a main guard: NeMo-Run copies the
driver's `__main__` into each experiment and executes it again when it reloads one.

Each task's script takes the stage lock, calls `phi4 stage-hook begin`, runs the stage's own
command (the one `phi4 run` would run locally, or on a cluster the same command as the Slurm
executor's), then `phi4 stage-hook end`, which publishes the artifacts: NeMo-Run only launches.
With no cluster file the tasks run through NeMo-Run's LocalExecutor (one after another, in
dependency order); with one, through its SlurmExecutor, dependencies passed to sbatch.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from ..config.cluster import Cluster
from ..plan import Plan, StagePlan
from .sbatch import WITHOUT_LOCK, shell_words
from .slurm import rendezvous_exports, stage_command

INSTALL_HINT = "NeMo-Run is not installed: pip install 'phi4[nemo-run]'"


class NemoRunMissing(RuntimeError):
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


def task_script(sp: StagePlan, cluster: Cluster | None) -> str:
    """The bash a task runs. On several nodes only the first task (SLURM_PROCID 0) keeps the
    books; every task runs the stage's command."""
    argv = stage_command(sp, cluster) if cluster is not None else sp.command
    res = sp.loaded.recipe.resources
    several = cluster is not None and sp.loaded.recipe.kind == "train" and res.nodes > 1
    host_python = cluster.bookkeeping_python() if cluster is not None else sys.executable
    lines = [
        f"phi4_stage_dir={shlex.quote(str(sp.attempt.dir))}",
        f"phi4_python={shlex.quote(host_python)}",
        'phi4_hook() { "$phi4_python" -m orchestrator stage-hook "$@" "$phi4_stage_dir"; }',
        'phi4_first() { [[ "${SLURM_PROCID:-0}" == 0 ]]; }',
        "if phi4_first; then",
        '    exec > >(tee -a "$phi4_stage_dir/logs/stdout.log") 2>&1',
        '    if command -v flock >/dev/null; then exec 9>>"$phi4_stage_dir/.lock"; flock 9; fi',
        "    phi4_hook begin",
        "    case $? in 0) ;; 3) exit 0 ;; *) exit 1 ;; esac",
        "fi",
        *[f"export {line}" for line in (rendezvous_exports(cluster.rdzv_port) if several
                                        else [])],
        f"{shell_words(argv)} {WITHOUT_LOCK}",  # the lock stays with this script
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
        res = sp.loaded.recipe.resources
        ups = sorted({e.upstream for e in plan.graph.inputs_of(name) if e.upstream in todo})
        kinds = {sp.loaded.recipe.inputs[e.input].dependency for e in plan.graph.inputs_of(name)
                 if e.upstream in todo}
        per_node = res.gpus_per_node or res.procs_per_node or 1
        task: dict[str, Any] = {"name": name, "script": task_script(sp, cluster), "after": ups,
                                "env": {**(cluster.env if cluster else {}), **sp.env}}
        if cluster is not None:
            from ..config.cluster import stage_time

            single = sp.loaded.recipe.kind == "command" or res.world_size == 1
            srun_ranks = cluster.launcher == "srun" and not single
            task.update(
                nodes=1 if single else res.nodes,
                ntasks_per_node=per_node if srun_ranks else 1,
                gpus_per_node=res.gpus_per_node or None,
                cpus_per_task=cluster.cpus_per_task * (1 if single or srun_ranks else per_node),
                time=stage_time(sp.loaded, cluster),
                # One type per task in NeMo-Run: afterok unless every edge asks afterany.
                dependency_type="afterany" if kinds == {"afterany"} or (
                    not (kinds - {None}) and cluster.dependency == "afterany") else "afterok")
        tasks.append(task)
    return {"title": title, "home": home, "dryrun": dryrun, "tasks": tasks,
            "cluster": cluster.model_dump() if cluster is not None else None}


def run_document(doc: dict[str, Any]) -> int:
    """Build the experiment and run it (or print its dry run). Called by nemo_driver."""
    import os

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
