"""What would run, what is up to date, and why: one verdict per stage, nothing executed.

A stage is up to date when its fingerprint's artifacts are published and verify, and the
upstream artifacts it consumed are still the ones published now (a forced upstream rerun that
produced different files makes its consumers stale even though fingerprints are unchanged).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import resume_text
from .config import ConfigError, LoadedRecipe, Problem
from .fingerprint import describe_changes, digest_or_problem, fingerprint, stage_fields
from .graph import Graph
from .launch import Launcher, ResolvedInput, environment
from .records import UNFINISHED, InputRecord, State
from .store import StageDir, Store

if TYPE_CHECKING:
    from .config.cluster import Cluster

# Verdicts: what this plan will do with a stage.
RUN, UP_TO_DATE, BLOCKED, SKIP = "run", State.UP_TO_DATE, State.BLOCKED, "not selected"


@dataclass
class Selection:
    """--only / --from / --until narrow what runs; --force reruns up-to-date stages."""

    only: tuple[str, ...] = ()
    from_: str | None = None
    until: str | None = None
    force: str | None = None  # a stage name, or "*" for all selected stages

    def names(self) -> tuple[str, ...]:
        named = [*self.only, self.from_, self.until]
        if self.force not in (None, "*"):
            named.append(self.force)
        return tuple(n for n in named if n is not None)

    def chosen(self, graph: Graph) -> set[str]:
        chosen = set(graph.stages)
        if self.only:
            chosen &= set(self.only)
        if self.from_:
            chosen &= {self.from_} | graph.descendants(self.from_)
        if self.until:
            chosen &= {self.until} | graph.ancestors(self.until)
        return chosen

    def forces(self, name: str) -> bool:
        return self.force == "*" or self.force == name


@dataclass
class StagePlan:
    name: str
    loaded: LoadedRecipe
    selected: bool
    inputs: dict[str, ResolvedInput] = field(default_factory=dict)
    fingerprint: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    verdict: str = RUN
    reasons: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # root causes of a block
    stage_dir: StageDir | None = None  # the folder of its fingerprint, once known
    published: bool = False  # its artifacts verified when planned (it runs for other reasons)

    def launcher(self, cluster: Cluster | None = None) -> Launcher:
        assert self.stage_dir is not None, f"stage {self.name} is blocked"
        return Launcher(self.loaded, self.stage_dir, self.inputs, cluster)

    @property
    def command(self) -> list[str]:
        """What `phi4 run` runs here (the local executor's argv)."""
        return list(self.launcher().layout().argv) if self.stage_dir else []

    @property
    def sources(self) -> dict[str, str]:
        """Where each value of the recipe was written (provenance.json)."""
        from .provenance import provenance_record

        return provenance_record(self.loaded)

    @property
    def env(self) -> dict[str, str]:
        return environment(self.loaded, self.stage_dir, self.inputs) if self.stage_dir else {}

    def lineage_records(self) -> dict[str, InputRecord]:
        """Lineage: exactly which upstream files the attempt reads (digests of the upstream
        manifests as published now; None for an upstream not published yet, filled in when
        the attempt starts)."""
        assert self.stage_dir is not None
        return self.stage_dir.store.with_digests(
            {name: inp.lineage() for name, inp in self.inputs.items()})


@dataclass
class Plan:
    graph: Graph
    store: Store
    selection: Selection
    stages: dict[str, StagePlan]  # topological order
    # Data not on this machine, tolerated for a look at what a cluster would run (make_plan's
    # `data_elsewhere`): the stages reading it have provisional fingerprints.
    absent_data: list[Problem] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(1 for s in self.stages.values() if s.verdict == verdict)

    def to_run(self) -> list[str]:
        return [n for n, s in self.stages.items() if s.verdict == RUN]

    def blocking_problems(self) -> list[Problem]:
        return [p for s in self.stages.values() if s.selected for p in s.problems]


def make_plan(graph: Graph, store: Store, selection: Selection | None = None,
              rerun_args: list[str] = (), data_elsewhere: bool = False) -> Plan:
    """`rerun_args` (e.g. --profile tiny --store X) go into suggested commands. With
    `data_elsewhere` (a look at what a cluster would run, from a machine without its data),
    data paths and tokenizers that are not here go into `absent_data` instead of blocking their
    stages, whose fingerprints are then provisional (the content is not known)."""
    selection = selection or Selection()
    chosen = selection.chosen(graph)
    plan = Plan(graph, store, selection, {})
    for name in graph.order:
        sp = StagePlan(name, graph.stages[name], name in chosen)
        plan.stages[name] = sp
        reasons = _resolve(plan, sp, list(rerun_args), data_elsewhere)
        sp.fields, missing = stage_fields(sp.loaded, _input_fields(sp), store.hashes)
        for loc, text in missing:
            problem = Problem(sp.loaded.origin(loc), loc, text)
            (plan.absent_data if data_elsewhere else sp.problems).append(problem)
        reasons += [p.message + (f"; {p.hint}" if p.hint else "") for p in sp.problems]
        if reasons:
            _block(sp, list(dict.fromkeys(reasons)))
            continue
        sp.fingerprint = fingerprint(sp.fields)
        sp.stage_dir = store.stage_dir(name, sp.fingerprint)
        assess(plan, sp, upstream_pending=True)
    return plan


def _resolve(plan: Plan, sp: StagePlan, rerun_args: list[str], data_elsewhere: bool = False
             ) -> list[str]:
    """Find each input's folder. Inputs that cannot be found become problems (root causes);
    returns the other reasons the stage is blocked (blocked upstream stages)."""
    recipe = sp.loaded.recipe
    blocked_upstream = []
    for name, inp in recipe.inputs.items():
        loc = ("inputs", name, inp.stage and "stage" or ("path" if inp.path else "hf"))
        if inp.stage is None:
            where = inp.path or inp.hf or ""
            digest, why = digest_or_problem(where, plan.store.hashes)
            if digest is None:
                problem = Problem(sp.loaded.origin(loc), loc,
                                  why or f"no file or folder at {where}")
                if why or not data_elsewhere:  # unreadable here is never "elsewhere"
                    sp.problems.append(problem)
                    continue
                plan.absent_data.append(problem)
            sp.inputs[name] = ResolvedInput("path" if inp.path else "hf", where, inp.frozen,
                                            fingerprint=digest)
            continue
        upstream = plan.stages.get(inp.stage)
        if upstream is not None:
            if upstream.fingerprint is None:
                blocked_upstream.append(f"upstream {inp.stage} is blocked")
                if sp.selected and not upstream.selected:
                    sp.problems.append(Problem(sp.loaded.origin(loc), loc,
                                               f"upstream {inp.stage} is blocked (not selected)"))
                continue
            producer = upstream.stage_dir
        else:
            producer = plan.store.newest_succeeded(inp.stage, inp.artifact or "")
            if producer is None:
                sibling = Path(sp.loaded.path).parent / f"{inp.stage}.yaml"
                hint = shlex.join(["phi4", "run", str(sibling), *rerun_args])
                sp.problems.append(Problem(
                    sp.loaded.origin(loc), loc,
                    f"no verified artifact {inp.artifact!r} of stage {inp.stage!r} in the store "
                    f"{plan.store.root}", hint=f"run it first: {hint} (or add --with-deps)"))
                continue
        sp.inputs[name] = ResolvedInput("stage", str(producer.artifacts / (inp.artifact or "")),
                                        inp.frozen, inp.artifact, inp.stage,
                                        producer.fingerprint)
    return blocked_upstream


def _input_fields(sp: StagePlan) -> dict[str, dict]:
    out = {}
    for name, inp in sp.inputs.items():
        if inp.source == "stage":
            out[name] = {"stage": inp.stage, "artifact": inp.artifact, "frozen": inp.frozen,
                         "fingerprint": inp.fingerprint}
        else:
            out[name] = {"source": inp.source, "frozen": inp.frozen, "content": inp.fingerprint}
    return out


def _block(sp: StagePlan, reasons: list[str]) -> None:
    sp.verdict = BLOCKED
    sp.reasons = reasons


def assess(plan: Plan, sp: StagePlan, upstream_pending: bool) -> None:
    """Set the verdict of a stage whose fingerprint is known. With `upstream_pending`, the
    verdicts of upstream stages in this plan are still to be carried out (planning time);
    without, they have been (the executor asks again just before launching)."""
    assert sp.stage_dir is not None
    reasons: list[str] = []
    upstream_runs = []
    if upstream_pending:
        ups = sorted({i.stage for i in sp.inputs.values() if i.stage in plan.stages})
        upstream_runs = [u for u in ups if plan.stages[u].verdict == RUN]
        unselected = [u for u in ups if plan.stages[u].verdict == SKIP]
        if sp.selected and unselected:
            for u in unselected:
                loc = next(("inputs", n, "stage") for n, i in sp.inputs.items() if i.stage == u)
                sp.problems.append(Problem(sp.loaded.origin(loc), loc,
                                           f"upstream {u} must run first but is not selected"))
            _block(sp, [p.message for p in sp.problems])
            return
    if plan.selection.forces(sp.name) and sp.selected:
        reasons.append("forced (--force)")
    problem = sp.stage_dir.artifact_problem(sp.loaded.recipe.outputs)
    if upstream_pending:
        sp.published = problem is None
    notes: list[str] = []
    status = sp.stage_dir.status()
    if problem is None:
        # A rerun leaves the published artifact in place until it succeeds itself.
        state = sp.stage_dir.state(status)
        if status is not None and (state == State.RUNNING or (
                state == State.PENDING and status.on_slurm)):
            reasons += _why_not_done(plan, sp, "")  # a rerun in flight: wait for it
        else:
            reasons += _republished_inputs(plan, sp)
            if status is not None and state in UNFINISHED:
                why = status.error or (f"exit code {status.exit_code}"
                                       if status.exit_code is not None else "")
                notes = [f"attempt {status.number} {state}" + (f" ({why})" if why else "")
                         + "; the artifact published before it still verifies and is used"]
    else:
        reasons += _why_not_done(plan, sp, problem)
    if not reasons and upstream_runs:
        reasons = [f"upstream {', '.join(upstream_runs)} will run (this stage is skipped then "
                   "if its inputs come out identical)"]
    if not reasons:
        sp.verdict, sp.reasons = UP_TO_DATE, notes
        return
    if status is not None and status.starts_over:
        reasons.append(START_OVER)
    sp.verdict, sp.reasons = (RUN if sp.selected else SKIP), reasons


START_OVER = "will start over (not from the finished attempt's checkpoints/)"


def _republished_inputs(plan: Plan, sp: StagePlan) -> list[str]:
    """The same test as a Slurm job's `stage-hook begin` (executors/hooks.py)."""
    now = {name: plan.store.stage_dir(inp.stage, inp.fingerprint).artifact_digest(inp.artifact)
           for name, inp in sp.inputs.items() if inp.source == "stage"}
    return [f"input {name} was republished with different files since this ran"
            for name in sp.stage_dir.changed_inputs(now)]


def _why_not_done(plan: Plan, sp: StagePlan, problem: str) -> list[str]:
    folder = sp.stage_dir
    status = folder.status()
    damage = folder.damaged_status() if status is None else None
    if damage is not None:
        resume = resume_text(folder.checkpoints)
        return [f"its record is damaged ({damage}); a new attempt is recorded"
                + (f"; {resume}" if resume != "will start over" else "")]
    if status is None:
        previous = plan.store.latest(sp.name)
        old = previous.fields() if previous and previous.fingerprint != sp.fingerprint else None
        if old is None:
            return ["new"]
        return describe_changes(old, sp.fields) or ["new fingerprint (same fields?)"]
    state, n = folder.state(status), status.number
    resume = resume_text(folder.checkpoints)
    if status.on_slurm and state in (State.PENDING, State.RUNNING):
        return [f"{state} as Slurm job {status.job_id}"]
    if state == State.RUNNING:
        return [f"running in another phi4 run (pid {status.pid} on {status.host}); "
                "will wait for it"]
    if state == State.INTERRUPTED:
        return [f"interrupted (attempt {n} died without finishing); {resume}"]
    if state == State.PREEMPTED:
        return [f"preempted (attempt {n}, exit {status.exit_code}); {resume}"]
    if state == State.CANCELLED:
        began = "" if status.began else ", before it started"
        return [f"cancelled (attempt {n}{began}); {resume}"]
    if state == State.FAILED:
        why = status.error or f"exit code {status.exit_code}"
        return [f"last attempt failed ({why})"
                + (f"; {resume}" if resume != "will start over" else "")]
    if state == State.BLOCKED:
        return [f"was blocked: {status.error or 'upstream failed'}"]
    return [problem]


def resolve_or_raise(plan: Plan) -> None:
    """Running needs every selected stage's inputs: otherwise one line each, exit 2."""
    problems = list(dict.fromkeys(plan.blocking_problems()))  # stages share base files
    if problems:
        raise ConfigError(problems)
