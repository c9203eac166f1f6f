"""Run a plan on Slurm: one batch job per stage, chained with --dependency, submitted at once.

Each stage's script (sbatch.py renders it) starts with `phi4 stage-hook begin` and ends with
`phi4 stage-hook end` (hooks.py), so a finished job leaves a verified, published artifact and
a `succeeded` status, or `failed` with its exit code, without anyone watching. On exit 75 (the
stage checkpointed on USR1/TERM) the job requeues itself and resumes when it starts again.

A rerun submits what the plan says must run; a stage whose job is still queued or running is
kept (its job id becomes its descendants' dependency), except a pending job that can never
start (its upstream failed) or that waits on an upstream being resubmitted now: that one is
cancelled and submitted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi4core.exitcodes import PREEMPTED

from .. import launch
from ..config import ConfigError
from ..config.cluster import Cluster, LoadedCluster, stage_problems, stage_time
from ..plan import Plan, StagePlan
from ..store import starts_over, write_json
from . import slurm_cli
from .attempts import Outcome, consumed
from .sbatch import BatchScript, Raw, directive_value, render
from .slurm_status import reconcile

SCRIPT_NAME = "job.sbatch"


def rendezvous_exports(port: int) -> list[str]:
    """The head node and a port; ports differ between jobs so that two sharing a node do not
    collide."""
    return [Raw('MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'),
            Raw(f'MASTER_PORT="$(( {port} + SLURM_JOB_ID % 1000 ))"')]


def stage_command(sp: StagePlan, cluster: Cluster) -> list[str]:
    """What one task of the stage runs on a cluster node: a command stage's `cmd`; the trainer
    (one process, or one per rank under the srun launcher); or torchrun, one per node, with a
    c10d rendezvous on the head node when there are several nodes."""
    recipe = sp.loaded.recipe
    if recipe.kind == "command":
        return list(recipe.cmd or [])
    res = recipe.resources
    train = [cluster.stage_python(), "-m", "phi4core", "train", str(sp.attempt.spec)]
    if res.world_size == 1 or cluster.launcher == "srun":
        return train
    per_node = res.gpus_per_node or res.procs_per_node or 1
    rdzv = ["--standalone"] if res.nodes == 1 else [
        Raw('--nnodes="$SLURM_JOB_NUM_NODES"'), "--rdzv-backend=c10d",
        Raw('--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"'), Raw('--rdzv-id="$SLURM_JOB_ID"')]
    return [train[0], "-m", launch.TORCHRUN, *rdzv, f"--nproc-per-node={per_node}",
            *train[1:]]


class StoreNotUsable(ValueError):
    """The store's path cannot be written into an sbatch directive."""


@dataclass
class Submission:
    name: str
    job_id: str
    action: str  # submitted | kept
    dependency: str | None
    detail: str = ""


class SlurmExecutor:
    def __init__(self, plan: Plan, cluster: LoadedCluster, job_prefix: str,
                 say: Callable[[str], None] = print):
        self.plan = plan
        self.lc = cluster
        self.cluster = cluster.cluster
        self.prefix = job_prefix
        self.say = say

    # ------------------------------------------------------------------------------------
    # checks and rendering
    # ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that would make a submission fail, before anything is submitted."""
        problems = [p for n in self.plan.to_run()
                    for p in stage_problems(self.plan.stages[n].loaded, self.lc)]
        if problems:
            raise ConfigError(problems)
        root = str(self.plan.store.root)
        try:
            directive_value(root)
        except ValueError as err:
            raise StoreNotUsable(f"the store {root} cannot be used with Slurm: {err}") from None
        if "%" in root:
            raise StoreNotUsable(f"the store {root} cannot be used with Slurm: '%' starts a "
                                 "Slurm filename pattern")

    def script(self, name: str) -> str:
        return render(self.batch_script(name))

    def batch_script(self, name: str) -> BatchScript:
        sp = self.plan.stages[name]
        c = self.cluster
        step, nodes, tasks_per_node, cpus, exports = self._step(sp)
        gpus = sp.loaded.recipe.resources.gpus_per_node
        log = str(sp.attempt.log_file)
        directives: list[tuple[str, str | None]] = [
            ("--job-name", f"{self.prefix}.{name}" if self.prefix != name else name),
            ("--nodes", str(nodes)),
            ("--ntasks-per-node", str(tasks_per_node)),
            *([("--gpus-per-node", str(gpus))] if gpus else []),
            ("--cpus-per-task", str(cpus)),
            *([("--mem-per-cpu", c.mem_per_cpu)] if c.mem_per_cpu else []),
            ("--time", stage_time(sp.loaded, c)),
            *[(f"--{key}", getattr(c, key)) for key in ("partition", "account", "qos",
                                                        "reservation") if getattr(c, key)],
            ("--output", log), ("--error", log), ("--open-mode", "append"),
            ("--requeue", None), ("--signal", f"B:USR1@{c.signal_lead_s}"),
        ]
        env = {**c.env, **sp.env}  # the recipe's env wins over the cluster's
        return BatchScript(
            title=f"phi4 stage {name} ({sp.attempt.fingerprint}) of {self.prefix} on cluster "
                  f"{c.name}",
            trust_note=str(self.lc.path), directives=directives,
            stage_dir=str(sp.attempt.dir), host_python=c.bookkeeping_python(), step=step,
            setup=list(c.setup), env=env, exports=exports, release_now=c.requeue_release_now)

    def _step(self, sp: StagePlan) -> tuple[list[str], int, int, int, list[str]]:
        """The srun line, and the allocation it needs: nodes, tasks per node, CPUs per task;
        and the rendezvous variables to export."""
        c = self.cluster
        container = []
        if c.container_image:
            container.append(f"--container-image={c.container_image}")
        if c.container_mounts:
            container.append(f"--container-mounts={','.join(c.container_mounts)}")
        argv = stage_command(sp, c)
        res = sp.loaded.recipe.resources
        if sp.loaded.recipe.kind == "command" or res.world_size == 1:
            return (["srun", "--nodes=1", "--ntasks=1", *container, "--", *argv],
                    1, 1, c.cpus_per_task, [])
        per_node = res.gpus_per_node or res.procs_per_node or 1
        exports = rendezvous_exports(c.rdzv_port) if res.nodes > 1 or c.launcher == "srun" else []
        if c.launcher == "srun":
            return (["srun", f"--nodes={res.nodes}", f"--ntasks-per-node={per_node}",
                     *container, "--", *argv], res.nodes, per_node, c.cpus_per_task, exports)
        return (["srun", f"--nodes={res.nodes}", "--ntasks-per-node=1", *container, "--", *argv],
                res.nodes, 1, c.cpus_per_task * per_node, exports)

    def dependency(self, name: str, job_of: dict[str, str]) -> str | None:
        """`afterok:1:2,afterany:3` on the upstream stages queued in this run (finished ones
        need none). An input's `dependency:` overrides the cluster's type; afterok wins when
        two inputs from one stage disagree."""
        kinds: dict[str, str] = {}
        recipe = self.plan.stages[name].loaded.recipe
        for edge in self.plan.graph.inputs_of(name):
            if edge.upstream not in job_of:
                continue
            kind = recipe.inputs[edge.input].dependency or self.cluster.dependency
            if kinds.get(edge.upstream) != "afterok":
                kinds[edge.upstream] = kind
        by_kind: dict[str, list[str]] = {}
        for upstream, kind in kinds.items():
            by_kind.setdefault(kind, []).append(job_of[upstream])
        return ",".join(f"{kind}:{':'.join(ids)}" for kind, ids in sorted(by_kind.items())) or None

    def dry_run(self) -> str:
        """Every script that `run` would submit, dependencies named by stage."""
        out = []
        todo = self.plan.to_run()
        placeholders = {n: f"<job of {n}>" for n in todo}
        for name in todo:
            dep = self.dependency(name, placeholders)
            script = self.plan.stages[name].attempt.dir / SCRIPT_NAME
            out.append(f"# ===== {name}: sbatch --parsable"
                       f"{f' --dependency={dep}' if dep else ''} {script}\n")
            out.append(self.script(name))
        return "".join(out)

    # ------------------------------------------------------------------------------------
    # submission
    # ------------------------------------------------------------------------------------

    def submit(self) -> list[Submission]:
        todo = self.plan.to_run()
        statuses = {n: self.plan.stages[n].attempt.status() or {} for n in todo}
        recorded = [s.get("job_id") for s in statuses.values() if s.get("executor") == "slurm"]
        jobs = slurm_cli.query([j for j in recorded if j])
        job_of: dict[str, str] = {}
        fresh: set[str] = set()
        done: list[Submission] = []
        for name in todo:
            status = statuses[name]
            job = jobs.get(status.get("job_id") or "") if status.get("executor") == "slurm" \
                else None
            if job is not None and job.active:
                ups = {e.upstream for e in self.plan.graph.inputs_of(name)}
                stale = job.state == "PENDING" and (job.never_runs or bool(ups & fresh))
                if not stale:
                    job_of[name] = job.job_id
                    done.append(Submission(name, job.job_id, "kept", status.get("dependency"),
                                           f"already {job.state.lower()}"))
                    self.say(f"kept       {name}: job {job.job_id} is already "
                             f"{job.state.lower()}")
                    continue
                slurm_cli.cancel([job.job_id])
                self.plan.stages[name].attempt.update_status(
                    state="cancelled", ended=time.time(),
                    error=f"stale job {job.job_id} cancelled: its upstream is resubmitted")
                self.say(f"cancelled  {name}: stale job {job.job_id} "
                         f"({job.reason or job.state.lower()})")
            dependency = self.dependency(name, job_of)
            job_id = self._submit_one(name, dependency, job_of)
            job_of[name] = job_id
            fresh.add(name)
            done.append(Submission(name, job_id, "submitted", dependency))
            self.say(f"submitted  {name}: job {job_id}"
                     + (f" (--dependency={dependency})" if dependency else ""))
        return done

    def _submit_one(self, name: str, dependency: str | None, job_of: dict[str, str]) -> str:
        sp = self.plan.stages[name]
        attempt = sp.attempt
        script = self.batch_script(name)
        for folder in (attempt.logs, attempt.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        path = attempt.dir / SCRIPT_NAME
        path.write_text(render(script))
        write_json(attempt.spec, launch.spec_document(sp.loaded, attempt, sp.inputs))
        write_json(attempt.fields_file, sp.fields)
        attempt.update_status(
            # the job's `stage-hook begin` discards the checkpoints of a finished attempt
            start_over=starts_over(attempt.status() or {}),
            # ... and runs a published stage again only when forced or an input changed
            force=self.plan.selection.forces(name) and sp.selected,
            state="pending", executor="slurm", cluster=self.cluster.name, job_id=None,
            submitted=time.time(), started=None, ended=None, exit_code=None, error=None,
            blocked_by=None, script=str(path), dependency=dependency,
            depends_on={e.upstream: job_of[e.upstream] for e in self.plan.graph.inputs_of(name)
                        if e.upstream in job_of},
            command=script.step, reasons=sp.reasons, inputs=consumed(self.plan.store, sp.inputs))
        self.plan.store.set_latest(name, attempt.fingerprint)
        try:
            job_id = slurm_cli.submit(path, dependency)
        except slurm_cli.SlurmError as err:
            attempt.update_status(state="failed", ended=time.time(), error=str(err))
            raise
        attempt.update_status(job_id=job_id)
        return job_id

    # ------------------------------------------------------------------------------------
    # --wait
    # ------------------------------------------------------------------------------------

    def wait(self, submitted: list[Submission], poll: float = 1.0) -> dict[str, Outcome]:
        """Follow the jobs (requeues included) until each has ended or can never start."""
        job_of = {s.name: s.job_id for s in submitted}
        attempts = {n: self.plan.stages[n].attempt for n in job_of}
        outcomes: dict[str, Outcome] = {}
        shown: dict[str, str] = {}
        while True:
            left = [n for n in job_of if n not in outcomes]
            if not left:
                return outcomes
            jobs = slurm_cli.query([job_of[n] for n in left])
            reconcile([attempts[n] for n in left], jobs)
            for name in left:
                job = jobs[job_of[name]]
                if not job.active:
                    outcomes[name] = _outcome(attempts[name].status() or {}, job)
                    self._event(name, job.job_id, outcomes[name].state, outcomes[name].detail)
                    continue
                root = self._failed_upstream(name, outcomes)
                if job.state == "PENDING" and (root or job.never_runs):
                    why = f"upstream {root} failed" if root else "an upstream job failed"
                    outcomes[name] = Outcome("blocked", f"never ran: {why}", blocked_by=root)
                    self._event(name, job.job_id, "blocked", f"never ran: {why} (left pending: "
                                "a rerun replaces it, phi4 cancel removes it)")
                    continue
                requeued = (attempts[name].status() or {}).get("state") == "preempted"
                state = "requeued" if requeued and job.state == "PENDING" else job.state.lower()
                if shown.get(name) != state:
                    shown[name] = state
                    self._event(name, job.job_id, state)
            time.sleep(poll)

    def _event(self, name: str, job_id: str, state: str, detail: str = "") -> None:
        self.say(f"{state:<10} {name}: job {job_id}" + (f": {detail}" if detail else ""))

    def _failed_upstream(self, name: str, outcomes: dict[str, Outcome]) -> str | None:
        """The stage at the root of a failure that keeps `name` from ever starting."""
        for edge in self.plan.graph.inputs_of(name):
            o = outcomes.get(edge.upstream)
            if o is not None and o.state not in ("succeeded", "up to date"):
                return o.blocked_by or edge.upstream
        return None


def _outcome(status: dict, job: slurm_cli.Job) -> Outcome:
    state = status.get("state") or "failed"
    code = status.get("exit_code")
    if state == "succeeded":
        return Outcome("succeeded", exit_code=0)
    detail = status.get("error") or f"Slurm says {job.state}"
    if state == "preempted":
        return Outcome("preempted", detail, code if code is not None else PREEMPTED)
    if state in ("failed", "cancelled"):
        log = Path(status.get("script") or "").parent / "logs" / "stdout.log"
        return Outcome(state, f"{detail}; log: {log}" if state == "failed" and "log:" not in
                       detail else detail, code)
    return Outcome("failed", f"job ended ({job.state}) but the stage recorded {state}", code)
