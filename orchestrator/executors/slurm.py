"""Run a plan on Slurm: one batch job per stage, chained with --dependency, submitted at once.

Each stage's script (sbatch.py renders it) starts with `phi4 stage-hook begin` and ends with
`phi4 stage-hook end` (hooks.py), so a finished job leaves a verified, published artifact and
a `succeeded` status, or `failed` with its exit code, without anyone watching. On PREEMPTED (the
stage checkpointed on USR1/TERM) the job requeues itself and resumes when it starts again. The
process layout (nodes, tasks, CPUs, the srun step's argv, the rendezvous) is launch.py's.

A rerun submits what the plan says must run; a stage whose job is still queued or running is
kept (its job id becomes its descendants' dependency), except a pending job that can never
start (its upstream failed) or that waits on an upstream being resubmitted now, and a job that
is ending (cancelled or killed, still completing): those are cancelled and submitted again.
While Slurm cannot say what became of a stage's job, nothing is submitted (exit 2): a second
copy of a job that is still running would be worse than waiting.
"""

from __future__ import annotations

from ..config.cluster import load_cluster, stage_time
from ..plan import Plan
from ..records import LIVE, State
from ..shell import shell_words
from . import slurm_cli
from .base import ExecutorError, RunOptions, Say, Submission, nothing_to_run
from .sbatch import BatchScript, directive_value, render
from .slurm_wait import FollowsSlurmJobs

SCRIPT_NAME = "job.sbatch"


class SlurmExecutor(FollowsSlurmJobs):
    """Submits every stage at once, each waiting on its upstream jobs; detached: `wait`
    (`phi4 run --wait`) follows the jobs, `phi4 status` asks Slurm about them."""

    name = "slurm"
    detached = True

    def __init__(self, plan: Plan, options: RunOptions, say: Say = print, note: Say = print):
        super().__init__(plan, options, say, note)
        assert options.cluster_file is not None  # check_options
        self.lc = load_cluster(options.cluster_file)
        self.cluster = self.lc.cluster
        self.prefix = options.prefix

    @classmethod
    def check_options(cls, options: RunOptions) -> None:
        if options.cluster_file is None:
            raise ExecutorError("--executor slurm needs --cluster FILE (e.g. clusters/local.yaml)")

    @classmethod
    def runs_elsewhere(cls, options: RunOptions) -> bool:
        return True

    # ------------------------------------------------------------------------------------
    # checks and rendering
    # ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that would make a submission fail, before anything is submitted."""
        super().check()
        self.check_fits(self.lc)
        root = str(self.plan.store.root)
        try:
            directive_value(root)
        except ValueError as err:
            raise ExecutorError(f"the store {root} cannot be used with Slurm: {err}") from None
        if "%" in root:
            raise ExecutorError(f"the store {root} cannot be used with Slurm: '%' starts a "
                                "Slurm filename pattern")

    def script(self, name: str) -> str:
        return render(self.batch_script(name))

    def batch_script(self, name: str) -> BatchScript:
        sp = self.plan.stages[name]
        c = self.cluster
        layout = sp.launcher(c).layout()
        container = [f"--container-image={c.container_image}"] if c.container_image else []
        if c.container_mounts:
            container.append(f"--container-mounts={','.join(c.container_mounts)}")
        step = ["srun", f"--nodes={layout.nodes}", f"--ntasks-per-node={layout.tasks_per_node}",
                *container, "--", *layout.argv]
        log = str(sp.stage_dir.log_file)
        directives: list[tuple[str, str | None]] = [
            ("--job-name", f"{self.prefix}.{name}" if self.prefix != name else name),
            ("--nodes", str(layout.nodes)),
            ("--ntasks-per-node", str(layout.tasks_per_node)),
            *([("--gpus-per-node", str(layout.gpus_per_node))] if layout.gpus_per_node else []),
            ("--cpus-per-task", str(layout.cpus_per_task)),
            *([("--mem-per-cpu", c.mem_per_cpu)] if c.mem_per_cpu else []),
            ("--time", stage_time(sp.loaded, c)),
            *[(f"--{key}", getattr(c, key)) for key in ("partition", "account", "qos",
                                                        "reservation") if getattr(c, key)],
            ("--output", log), ("--error", log), ("--open-mode", "append"),
            ("--requeue", None), ("--signal", f"B:USR1@{c.signal_lead_s}"),
        ]
        return BatchScript(
            title=f"phi4 stage {name} ({sp.stage_dir.fingerprint}) of {self.prefix} on cluster "
                  f"{c.name}",
            trust_note=str(self.lc.path), directives=directives,
            stage_dir=str(sp.stage_dir.path), host_python=c.bookkeeping_python(), step=step,
            setup=list(c.setup), env=layout.env, exports=list(layout.exports),
            release_now=c.requeue_release_now)

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
        self.check()
        todo = self.plan.to_run()
        if not todo:
            return nothing_to_run(self.plan) + "\n"
        out = []
        for name in todo:
            out.append(f"# ===== {name}: {self._sbatch_line(name)}\n")
            out.append(self.script(name))
        return "".join(out)

    def _sbatch_line(self, name: str) -> str:
        """How the stage is submitted; upstream jobs named by stage (their ids come later)."""
        dep = self.dependency(name, {n: f"<job of {n}>" for n in self.plan.to_run()})
        script = self.plan.stages[name].stage_dir.path / SCRIPT_NAME
        return " ".join(["sbatch", "--parsable", *slurm_cli.dependency_args(dep), str(script)])

    def launch_lines(self, name: str) -> list[str]:
        """sbatch, what the script asks of Slurm (its #SBATCH lines, bookkeeping left out),
        and the srun step it runs."""
        job = self.batch_script(name)
        asks = " ".join(option + ("" if value is None else f"={directive_value(value)}")
                        for option, value in job.directives
                        if option not in ("--job-name", "--output", "--error", "--open-mode"))
        return [self._sbatch_line(name), f"#SBATCH {asks}", shell_words(job.step)]

    def headline(self) -> str:
        return super().headline("submitting", f" to {self.cluster.name}")

    # ------------------------------------------------------------------------------------
    # submission
    # ------------------------------------------------------------------------------------

    def submit(self) -> list[Submission]:
        """Submit what the plan runs. A stage whose job is still queued or running is kept (its
        job id becomes its descendants' dependency), except a pending job that can never
        start or that waits on an upstream resubmitted now: that one is cancelled first."""
        down = slurm_cli.ping()
        if down:
            raise ExecutorError(f"Slurm is not answering: {down}")
        try:
            return self._submit_all()
        except slurm_cli.SlurmError as err:
            raise ExecutorError(str(err)) from None

    def _submit_all(self) -> list[Submission]:
        todo = self.plan.to_run()
        statuses = {n: self.plan.stages[n].stage_dir.status() for n in todo}
        live = {n: s.job_id for n, s in statuses.items() if s is not None and
                s.executor == self.name and s.job_id and s.state in LIVE}
        try:
            jobs = slurm_cli.query(list(live.values()))
        except slurm_cli.SlurmUnavailable as err:
            raise ExecutorError(_unknown_jobs(live, str(err))) from None
        job_of: dict[str, str] = {}
        fresh: set[str] = set()
        done: list[Submission] = []
        for name in todo:
            job = jobs.get(live.get(name) or "")  # a finished attempt's job is not kept
            if job is not None and job.active:
                ups = {e.upstream for e in self.plan.graph.inputs_of(name)}
                stale = job.state == "PENDING" and (job.never_runs or bool(ups & fresh))
                if not stale and not job.ending:
                    job_of[name] = job.job_id
                    done.append(Submission(name, job.job_id))
                    self.say(f"kept       {name}: job {job.job_id} is already "
                             f"{job.state.lower()}")
                    continue
                # Replaced: a requeue must not bring the old job back beside the new one.
                slurm_cli.cancel([job.job_id])
                what = f"stale job {job.job_id}" if stale else f"ending job {job.job_id}"
                why = "its upstream is resubmitted" if stale else \
                    f"it was {job.state.lower()}; a new job replaces it"
                self.plan.stages[name].stage_dir.end(State.CANCELLED,
                                                     error=f"{what} cancelled: {why}")
                self.say(f"cancelled  {name}: {what} ({job.reason or job.state.lower()})")
            dependency = self.dependency(name, job_of)
            job_id = self._submit_one(name, dependency, job_of)
            job_of[name] = job_id
            fresh.add(name)
            done.append(Submission(name, job_id))
            self.say(f"submitted  {name}: job {job_id}"
                     + (f" (--dependency={dependency})" if dependency else ""))
        return done

    def _submit_one(self, name: str, dependency: str | None, job_of: dict[str, str]) -> str:
        sp = self.plan.stages[name]
        folder = sp.stage_dir
        script = self.batch_script(name)
        folder.prepare(self.spec_document(name), sp.fields)
        path = folder.path / SCRIPT_NAME
        path.write_text(render(script))
        folder.queue(
            self.name, force=self.plan.selection.forces(name) and sp.selected,
            command=script.step, reasons=sp.reasons, inputs=sp.lineage_records(),
            cluster=self.cluster.name, script=str(path), dependency=dependency,
            depends_on={e.upstream: job_of[e.upstream] for e in self.plan.graph.inputs_of(name)
                        if e.upstream in job_of})
        try:
            job_id = slurm_cli.submit(path, dependency)
        except slurm_cli.SlurmError as err:
            folder.end(State.FAILED, error=str(err))
            raise
        folder.record_job(job_id)
        return job_id


def _unknown_jobs(live: dict[str, str], why: str) -> str:
    jobs = ", ".join(f"{name} (job {job_id})" for name, job_id in live.items())
    return (f"not submitting: Slurm cannot say whether the jobs of {jobs} are still queued or "
            f"running ({why}), and a second copy must not run beside them. Try again when "
            "`scontrol ping` answers; `phi4 status` shows what the store knows, `phi4 cancel` "
            "ends those jobs for good")
