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
dependencies passed to sbatch, from this machine or (the cluster file's `ssh:`) through a
login node with NeMo-Run's SSHTunnel. The driver reports each task's Slurm job (or why it could
not be submitted); the stage records name the job, so `phi4 status`, `phi4 cancel` and
`--wait` follow it as they follow `--executor slurm` jobs.

NeMo-Run (0.11) replaces every `/nemo_run` in a non-container sbatch script with the job's
folder (its own placeholder): its home here is `<store>/nemorun`, and any other `/nemo_run`
that would reach a script is refused before anything is submitted (`check_rundir`).
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
from ..config import ConfigError
from ..config.cluster import Cluster, LoadedCluster, SshLogin, load_cluster, stage_time
from ..config.errors import Problem
from ..exitcodes import BAD_INPUT, FAILURE
from ..plan import Plan, StagePlan
from ..records import State
from ..shell import shell_words
from ..store import write_json
from . import slurm_cli, slurm_status
from .base import ExecutorError, RunOptions, Say, Submission, nothing_to_run
from .outcomes import Outcome
from .sbatch import BEGIN, WITHOUT_LOCK, hook_lines
from .slurm_wait import FollowsSlurmJobs
from .ssh import Login, SshProblem, preflight

INSTALL_HINT = "NeMo-Run is not installed: pip install 'phi4[nemo-run]'"
# NeMo-Run's own placeholder for a job's folder, replaced wherever it appears in its scripts.
RUNDIR = "/nemo_run"
HOME_NAME = "nemorun"  # <store>/nemorun: NEMORUN_HOME, which must not hold RUNDIR


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


class NemoRunExecutor(FollowsSlurmJobs):
    name = "nemo_run"

    def __init__(self, plan: Plan, options: RunOptions, say: Say = print, note: Say = print):
        super().__init__(plan, options, say, note)
        self.lc = load_cluster(options.cluster_file) if options.cluster_file else None
        self.cluster = self.lc.cluster if self.lc else None
        self.detached = self.cluster is not None  # NeMo-Run's SlurmExecutor returns at once
        ssh = self.cluster.ssh if self.cluster else None
        self.login = Login(ssh.host, ssh.port, ssh.user, ssh.identity) if ssh else None
        self.home = plan.store.root / HOME_NAME  # NEMORUN_HOME
        self._driver_code = 0

    @classmethod
    def runs_elsewhere(cls, options: RunOptions) -> bool:
        return options.cluster_file is not None  # through NeMo-Run's SlurmExecutor

    def check(self) -> None:
        super().check()
        if not available():
            raise NemoRunMissing()
        if self.lc is not None:
            self.check_fits(self.lc)
        check_rundir(self.plan, self.lc, str(self.home), self.options.prefix)

    def _check_submission(self) -> None:
        """Before a real submission: no job of a stage to run is still queued or running (a
        second copy must not run beside it), and the login node has what NeMo-Run uses."""
        if self.login is not None:
            try:
                preflight(self.login)
            except SshProblem as err:
                raise ExecutorError(f"cluster {self.cluster.name}: {err}") from None
        folders = [self.plan.stages[n].stage_dir for n in self.plan.to_run()]
        try:
            jobs = slurm_status.query_stage_dirs(folders)
        except slurm_cli.SlurmError as err:
            raise ExecutorError(f"not submitting: Slurm cannot say whether earlier jobs of "
                                f"these stages still run ({err})") from None
        for folder in folders:
            job = jobs.get(slurm_status.slurm_job(folder) or "")
            if job is not None and job.active:
                raise ExecutorError(f"stage {folder.name}: its job {job.job_id} is still "
                                    f"{job.state.lower()}; wait for it, or `phi4 cancel "
                                    f"{folder.name}` first")

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
        experiment: to its end locally, until its jobs are queued on a cluster. On a cluster
        each stage's record gets its job, or fails with the reason NeMo-Run could not submit
        it; without --wait that is an error (exit 2), as is a driver that failed."""
        if self.cluster is not None:
            self._check_submission()
        todo = self.plan.to_run()
        for name in todo:
            sp = self.plan.stages[name]
            folder = sp.stage_dir
            folder.prepare(self.spec_document(name), sp.fields)
            folder.queue(self.name, force=self.plan.selection.forces(name) and sp.selected,
                         command=list(sp.launcher(self.cluster).layout().argv),
                         reasons=sp.reasons, inputs=sp.lineage_records(),
                         cluster=self.cluster.name if self.cluster else None,
                         login=self.login.record() if self.login else None)
        result_file = self.home / f"result-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        doc = {**self._document(str(self.home), dryrun=False), "result": str(result_file)}
        self._driver_code, _ = _drive(doc, self.home)
        if self.cluster is None:
            return [Submission(name) for name in todo]
        result = _read_result(result_file, self._driver_code)
        submitted = self._record_jobs(todo, result)
        not_submitted = [s.name for s in submitted if s.job_id is None]
        for s in submitted:
            if s.job_id:
                self.say(f"submitted  {s.name}: job {s.job_id}")
            else:
                status = self.plan.stages[s.name].stage_dir.status()
                self.say(f"{status.state if status else State.FAILED:<10} {s.name}: "
                         f"{status.error if status else ''}")
        if not_submitted and not self.options.wait:
            failed = result.get("failed") or {}
            said = "; ".join(f"{n}: {why}" for n, why in failed.items()) or result.get("error")
            rest = [n for n in not_submitted if n not in failed]
            raise ExecutorError(
                f"NeMo-Run could not submit {', '.join(failed) or 'the stages'}"
                + (f" ({said})" if said else "")
                + (f"; not submitted after it: {', '.join(rest)}" if rest and failed else "")
                + (f"; {len(todo) - len(not_submitted)} submitted, phi4 status follows them"
                   if len(not_submitted) < len(todo) else ""))
        return submitted

    def _record_jobs(self, todo: list[str], result: dict[str, Any]) -> list[Submission]:
        """Each stage's job in its record; a stage without one ends failed (NeMo-Run could not
        submit it, or the driver failed before trying) or blocked (an upstream was not
        submitted)."""
        jobs, failed = result.get("jobs", {}), result.get("failed", {})
        done: list[Submission] = []
        for name in todo:
            folder = self.plan.stages[name].stage_dir
            if name in jobs:
                ups = {e.upstream for e in self.plan.graph.inputs_of(name)}
                folder.record_job(str(jobs[name]["job_id"]), job_log=jobs[name].get("log"),
                                  depends_on={u: str(jobs[u]["job_id"]) for u in sorted(ups)
                                              if u in jobs})
                done.append(Submission(name, str(jobs[name]["job_id"])))
                continue
            if name in failed:
                folder.end(State.FAILED, error=f"NeMo-Run could not submit it: {failed[name]}")
            else:
                root = next((u for u in sorted(self.plan.graph.ancestors(name)) if u in failed),
                            None)
                if root:
                    folder.end(State.BLOCKED, blocked_by=root,
                               error=f"not submitted: upstream {root} could not be")
                else:
                    why = result.get("error") or f"the NeMo-Run driver exited {self._driver_code}"
                    folder.end(State.FAILED, error=f"not submitted: {why}")
            done.append(Submission(name))
        return done

    def follow_hint(self) -> str:
        return f"submitted; follow with: phi4 status --store {self.plan.store.root}"

    def wait(self, submitted: list[Submission]) -> dict[str, Outcome]:
        """On a cluster: follow the jobs as `--executor slurm --wait` does. Locally the
        experiment has ended: each stage's outcome is what its hooks recorded."""
        if self.cluster is not None:
            outcomes = super().wait([s for s in submitted if s.job_id])
            return {s.name: outcomes.get(s.name) or self._recorded(s.name) for s in submitted}
        outcomes = {}
        for s in submitted:
            outcomes[s.name] = outcome = self._recorded(s.name)
            self.say(f"{outcome.state:<10} {s.name}"
                     + (f": {outcome.detail}" if outcome.detail else ""))
        return outcomes

    def _recorded(self, name: str) -> Outcome:
        """A stage's outcome as its record says (its hooks, or a submission that failed)."""
        status = self.plan.stages[name].stage_dir.status()
        state = status.state if status is not None else State.NOT_RUN
        return Outcome(State.NOT_RUN if state == State.PENDING else state,
                       (status.error or "") if status else "",
                       status.exit_code if status else None,
                       blocked_by=status.blocked_by if status else None)

    def exit_code(self, outcomes: dict[str, Outcome]) -> int:
        return super().exit_code(outcomes) or (FAILURE if self._driver_code else 0)

    def _document(self, home: str, dryrun: bool) -> dict[str, Any]:
        return tasks_document(self.plan, self.options.prefix, self.cluster, home, dryrun)


def check_rundir(plan: Plan, lc: LoadedCluster | None, home: str, prefix: str) -> None:
    """Refuse (exit 2, naming the field) any `/nemo_run` that would reach NeMo-Run's sbatch
    scripts, where NeMo-Run 0.11 would replace it with the job's folder: a path mangled so
    points at nothing (the job fails at launch, or the stage reads the wrong thing)."""
    why = (f"NeMo-Run replaces every '{RUNDIR}' in its sbatch scripts with the job's folder, "
           "so this value would be mangled")
    for what, value in (("the store", str(plan.store.root)), ("NEMORUN_HOME", home)):
        if RUNDIR in value:
            raise ExecutorError(f"{what} {value} holds '{RUNDIR}': {why}; use another path")
    if f"/{prefix}".startswith(RUNDIR):  # <home>/experiments/<name>/...
        raise ExecutorError(f"the pipeline name {prefix} makes NeMo-Run's experiment folder "
                            f"hold '{RUNDIR}': {why}; rename the pipeline")
    problems: list[Problem] = []
    if lc is not None:
        c = lc.cluster
        fields = [*((("setup", i), v) for i, v in enumerate(c.setup)),
                  *((("env", k), v) for k, v in c.env.items()),
                  *((("container_mounts", i), v) for i, v in enumerate(c.container_mounts)),
                  (("container_image",), c.container_image), (("python",), c.python),
                  (("host_python",), c.host_python),
                  (("ssh", "job_dir"), c.ssh.job_dir if c.ssh else None)]
        problems += [Problem(lc.origin(loc), loc, f"holds '{RUNDIR}': {why}", got=value)
                     for loc, value in fields if value and RUNDIR in value]
    todo = plan.to_run()
    for name in todo:
        loaded = plan.stages[name].loaded
        fields = [*((("env", k), v) for k, v in loaded.recipe.env.items()),
                  *((("cmd", i), v) for i, v in enumerate(loaded.recipe.cmd or ()))]
        problems += [Problem(loaded.origin(loc), loc, f"holds '{RUNDIR}': {why}", got=value)
                     for loc, value in fields if RUNDIR in value]
    if problems:
        raise ConfigError(problems)
    # Anything else a task's script gets (an input's or a data file's path): by stage.
    cluster = lc.cluster if lc is not None else None
    for name in todo:
        sp = plan.stages[name]
        layout = sp.launcher(cluster).layout()
        for key, value in layout.env.items():
            if RUNDIR in value:
                raise ExecutorError(f"stage {name}: its environment variable {key}={value} "
                                    f"holds '{RUNDIR}': {why}; move that file")
        for word in layout.argv:
            if RUNDIR in word:
                raise ExecutorError(f"stage {name}: its command's argument {word} holds "
                                    f"'{RUNDIR}': {why}")


def _read_result(path: Path, code: int) -> dict[str, Any]:
    """What the driver reported: {"jobs": {stage: {job_id, log}}, "failed": {stage: reason},
    "error": why it stopped}; a driver that died before writing it submitted nothing we know."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": f"the NeMo-Run driver exited {code} without saying what it submitted "
                         "(see above)"}


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
    result: dict[str, Any] = {"jobs": {}, "failed": {}, "error": None}
    try:
        with run.Experiment(doc["title"], base_dir=doc["home"], log_level="WARN") as exp:
            ids: dict[str, str] = {}
            for task in doc["tasks"]:
                executor = _executor(run, task, cluster, doc["title"], doc["dryrun"])
                if doc["dryrun"] and cluster is not None:
                    # Handles exist only once upstream jobs are submitted: show them by name.
                    executor.dependencies = [f"slurm://dryrun/<job-of-{u}>"
                                             for u in task["after"]]
                ids[task["name"]] = exp.add(run.Script(inline=task["script"]),
                                            executor=executor, name=task["name"],
                                            dependencies=[ids[u] for u in task["after"]])
            if doc["dryrun"]:
                exp.dryrun(log=True)
                return 0
            try:
                exp.run(sequential=False, detach=cluster is not None)
            except Exception as err:  # whatever sbatch, ssh or rsync raised through NeMo-Run
                result["error"] = failure_reason(err)
            if cluster is not None:
                _collect_jobs(exp, doc["tasks"], ids, result)
    finally:
        if doc.get("result"):
            write_json(Path(doc["result"]), result)
    return FAILURE if result["error"] else 0


def _collect_jobs(exp, tasks: list[dict[str, Any]], ids: dict[str, str],
                  result: dict[str, Any]) -> None:
    """Each launched task's Slurm job (and NeMo-Run's log of it); a task not launched whose
    upstream tasks all were is one NeMo-Run tried and failed to submit."""
    by_id = {job.id: job for job in exp.jobs}
    for task in tasks:
        job = by_id.get(ids[task["name"]])
        if job is not None and job.launched and job.handle:
            job_id = job.handle.rstrip("/").rsplit("/", 1)[-1]  # slurm_tunnel://nemo_run/ID
            details = job.executor.job_details
            log = str(details.stdout).replace("%j", job_id) if details.folder else None
            result["jobs"][task["name"]] = {"job_id": job_id, "log": log}
    for task in tasks:
        if task["name"] not in result["jobs"] and \
                all(u in result["jobs"] for u in task["after"]):
            result["failed"][task["name"]] = result["error"] or "NeMo-Run did not launch it"


def failure_reason(err: BaseException) -> str:
    """One line from an exception NeMo-Run passed on: what the failed command said on stderr
    (sbatch's `error: ...` line first), else the exception's last line."""
    said = getattr(getattr(err, "result", None), "stderr", "") or ""
    lines = [line.strip() for line in (said or str(err)).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or lines or [type(err).__name__])[-1])[:300]


def _executor(run, task: dict[str, Any], cluster: Cluster | None, title: str, dryrun: bool):
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
        additional_parameters=_sbatch_extras(task, c) or None,
        tunnel=_tunnel(run, None if dryrun else c.ssh),
        packager=run.Packager())


def _sbatch_extras(task: dict[str, Any], c: Cluster) -> dict[str, str]:
    extras = {"reservation": c.reservation} if c.reservation else {}
    if task["after"]:  # as --executor slurm: Slurm removes a job that can never start
        extras["kill_on_invalid_dep"] = "yes"
    return extras


def _tunnel(run, ssh: SshLogin | None):
    """Where sbatch runs: here (and a dry run, which connects nowhere), or on the login node
    (NeMo-Run copies its job folders there with rsync over ssh)."""
    if ssh is None:
        return run.LocalTunnel(job_dir="")
    identity = str(Path(ssh.identity).expanduser()) if ssh.identity else None
    return run.SSHTunnel(host=ssh.host, user=ssh.user, port=ssh.port, identity=identity,
                         job_dir=ssh.job_dir)
