"""The one interface every executor implements, and the one way `phi4 run` drives it.

An executor is made for one plan and one set of run options. `check` raises what would make
the run fail before anything is written; `dry_run` returns what the run would launch, writing
nothing; `submit` records each stage to run in the store and starts (or queues) it; `wait`
follows them to their end; the class's `sync` and `status` bring the store's records of its
jobs up to date with what its scheduler knows. The store's bookkeeping is done here and in the
executors, never by the CLI.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError
from ..config.cluster import Cluster, LoadedCluster, stage_problems
from ..plan import UP_TO_DATE, Plan, resolve_or_raise
from ..records import State
from ..shell import shell_words
from ..store import Store
from ..words import count
from .outcomes import Outcome, exit_status, summary


class ExecutorError(Exception):
    """What keeps a run from starting (a flag that does not apply, a scheduler not
    answering): one line for the user, exit 2."""


@dataclass(frozen=True)
class RunOptions:
    title: str = "phi4"  # "pipeline NAME" or "stage NAME": for messages
    prefix: str = "phi4"  # job names: PREFIX.STAGE
    jobs: int = 1  # local: stages side by side
    keep_going: bool = False  # local: after a failure, finish independent stages
    grace: float = 30.0  # local: seconds to checkpoint after Ctrl-C before SIGKILL
    cluster_file: str | None = None
    wait: bool = False  # follow submitted jobs to their end
    poll: float = 1.0  # seconds between looks at the scheduler


@dataclass(frozen=True)
class Submission:
    name: str
    job_id: str | None = None  # None where the executor keeps no job of its own


Say = Callable[[str], None]


class Executor(ABC):
    name: ClassVar[str]  # its name in the registry (executors/__init__.py) and in status.json
    detached: bool = False  # submit returns while the stages still run

    def __init__(self, plan: Plan, options: RunOptions, say: Say = print, note: Say = print):
        """`say`: progress lines (standard output); `note`: remarks about the run (stderr)."""
        self.plan = plan
        self.options = options
        self.say = say
        self.note = note
        self.stop_signal: int | None = None  # set when a signal stopped the run
        self.cluster: Cluster | None = None  # where the stages run, when not on this machine

    @classmethod
    def check_options(cls, options: RunOptions) -> None:
        """Flags that do not go with this executor, before anything is planned."""
        return None  # every flag goes with an executor that does not say otherwise

    @classmethod
    def runs_elsewhere(cls, options: RunOptions) -> bool:
        """Whether the stages run on other machines (whose data this one may not have)."""
        return False

    @classmethod
    def sync(cls, store: Store) -> None:
        """Record the ends of this executor's jobs that its scheduler knows and the store does
        not yet (before planning a run on it)."""
        return None  # an executor without a scheduler: its records are written as it goes

    @classmethod
    def status(cls, store: Store, rows: list) -> list:
        """`phi4 status` rows, with what this executor's scheduler says of its live jobs."""
        return rows

    def check(self) -> None:
        """What would make the run fail, before anything is written: every selected stage's
        inputs found, no damaged record in the way of one to run, and what the executor
        adds."""
        resolve_or_raise(self.plan)
        for name in self.plan.to_run():
            problem = self.plan.stages[name].stage_dir.record_problem()
            if problem is not None:
                raise ExecutorError(f"stage {name}: {problem}")

    def check_fits(self, lc: LoadedCluster) -> None:
        """Every stage to run asks only what the cluster's nodes have (errors at the recipe
        field to change)."""
        problems = [p for n in self.plan.to_run()
                    for p in stage_problems(self.plan.stages[n].loaded, lc)]
        if problems:
            raise ConfigError(problems)

    def spec_document(self, name: str) -> dict:
        """spec.json of a stage to run: with the cluster's tracker settings, and its tracker
        run named after the pipeline."""
        from .. import launch

        sp = self.plan.stages[name]
        return launch.spec_document(sp.loaded, sp.stage_dir, sp.inputs, self.cluster,
                                    self.options.prefix)

    def command(self, name: str) -> list[str]:
        """What each of the stage's processes runs, laid out for where this executor runs it."""
        return list(self.plan.stages[name].launcher(self.cluster).layout().argv)

    def launch_lines(self, name: str) -> list[str]:
        """The exact launch of a (not blocked) stage, as `phi4 plan` shows it: the command
        run first, then, for a scheduler, what its job runs."""
        return [shell_words(self.command(name))]

    @abstractmethod
    def dry_run(self) -> str:
        """What `run` would launch, as text; writes nothing."""

    def headline(self, verb: str = State.RUNNING, where: str = "") -> str:
        """The line that starts a run: "pipeline P: running 2 of 3 stages (store S)"."""
        todo = self.plan.to_run()
        total = count(len(self.plan.stages), "stage")
        return (f"{self.options.title}: {verb} {len(todo)} of {total}{where} "
                f"(store {self.plan.store.root})")

    @abstractmethod
    def submit(self) -> list[Submission]:
        """Record and start (or queue) every stage the plan runs."""

    @abstractmethod
    def wait(self, submitted: list[Submission]) -> dict[str, Outcome]:
        """Follow the submitted stages until each has ended or can never start."""

    def follow_hint(self) -> str:
        """How to follow a detached run."""
        return f"follow with: phi4 status --store {self.plan.store.root}"

    def exit_code(self, outcomes: dict[str, Outcome]) -> int:
        return exit_status(outcomes, self.stop_signal)


def nothing_to_run(plan: Plan) -> str:
    return (f"nothing to run: {count(plan.count(UP_TO_DATE), 'stage')} up to date "
            f"(store {plan.store.root})")


def run(executor: Executor, *, dry_run: bool = False) -> int:
    """`phi4 run`, whichever the executor: returns the exit status."""
    plan, options = executor.plan, executor.options
    if dry_run:
        executor.say(executor.dry_run().rstrip("\n"))
        return 0
    executor.check()
    for stage in plan.stages.values():  # what killed publishes left, up-to-date stages too
        if stage.stage_dir is not None:
            stage.stage_dir.tidy()
    if not plan.to_run():
        executor.say(nothing_to_run(plan))
        return 0
    executor.note(executor.headline())
    submitted = executor.submit()
    if executor.detached and not options.wait:
        executor.note(executor.follow_hint())
        return 0
    outcomes = executor.wait(submitted)
    executor.note(summary(outcomes))
    return executor.exit_code(outcomes)
