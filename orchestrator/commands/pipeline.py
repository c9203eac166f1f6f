"""`phi4 plan | run | status | graph`: the DAG of stages against the artifact store."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import executors
from ..config import LoadedPipeline, load_any
from ..config.errors import did_you_mean
from ..exitcodes import BAD_INPUT
from .common import (
    FiniteFloat,
    UsageProblem,
    config_options,
    existing_store,
    report_config_errors,
    store_option,
)


def selection_options(fn: Callable) -> Callable:
    options = [
        click.option("--with-deps", is_flag=True,
                     help="A single recipe: also run its upstream recipes (recipes/<stage>.yaml) "
                          "that are not up to date."),
        click.option("--force", default=None, is_flag=False, flag_value="*", metavar="[STAGE]",
                     help="Rerun STAGE (every selected stage if none is named) even if up to "
                          "date; put it after PATH."),
        click.option("--until", "until", default=None, metavar="STAGE",
                     help="Only STAGE and what it depends on."),
        click.option("--from", "from_", default=None, metavar="STAGE",
                     help="Only STAGE and what depends on it."),
        click.option("--only", multiple=True, metavar="STAGE", help="Only these stages."),
    ]
    for option in options:
        fn = option(fn)
    return fn


def executor_options(fn: Callable) -> Callable:
    options = [
        click.option("--executor", type=click.Choice(executors.NAMES), default="local",
                     show_default=True, help="Where stages run: here, as Slurm batch jobs, or "
                                             "as a NeMo-Run experiment."),
        click.option("--cluster", "cluster_file", default=None, metavar="FILE",
                     help="clusters/NAME.yaml: partition, account, container, env (slurm, "
                          "nemo_run)."),
    ]
    for option in options:
        fn = option(fn)
    return fn


def _warn_absent_data(planned) -> None:
    """Data the cluster is trusted to have, since this machine does not."""
    problems = list(dict.fromkeys(str(p) for p in planned.absent_data))
    for problem in problems:
        click.echo(f"phi4: warning: {problem} on this machine", err=True)
    if problems:
        click.echo("phi4: warning: shown anyway, assuming the cluster has that data; the stages "
                   "reading it get provisional fingerprints (its content is unknown here), so "
                   "their folders differ from those of a submission that can read it", err=True)


def _load_plan(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
               with_deps: bool = False, only: tuple[str, ...] = (), from_: str | None = None,
               until: str | None = None, force: str | None = None, read_only: bool = False,
               data_elsewhere: bool = False):
    from ..graph import build_graph, with_upstream
    from ..plan import Selection, make_plan
    from ..store import Store

    loaded = load_any(path, profile, list(overrides))
    if isinstance(loaded, LoadedPipeline):
        stages, title = loaded.stages, f"pipeline {loaded.pipeline.name}"
    elif with_deps:
        stages, title = with_upstream(loaded, profile), f"stage {loaded.recipe.name} and upstream"
    else:
        stages, title = {loaded.recipe.name: loaded}, f"stage {loaded.recipe.name}"
    graph = build_graph(stages)
    selection = Selection(only, from_, until, force)
    for name in selection.names():
        if name not in graph.stages:
            hint = did_you_mean(name, graph.stages) or f"stages: {', '.join(graph.stages)}"
            raise UsageProblem(f"no stage {name!r} in {path}; {hint}")
    rerun_args = [*(["--profile", profile] if profile else []),
                  *(["--store", store_dir] if store_dir else [])]
    prefix = loaded.pipeline.name if isinstance(loaded, LoadedPipeline) else "phi4"
    planned = make_plan(graph, Store(store_dir, read_only), selection, rerun_args,
                        data_elsewhere)
    return planned, title, prefix


def estimate_options(fn: Callable) -> Callable:
    from ..estimate import DEFAULT_GPU, DEFAULT_MFU, GPUS

    options = [
        click.option("--gpu", type=click.Choice(sorted(GPUS)), default=DEFAULT_GPU,
                     show_default=True, help="The GPU memory and peak FLOPs estimated for."),
        click.option("--mfu", type=FiniteFloat(positive=True), default=DEFAULT_MFU,
                     show_default=True, help="Model FLOPs utilisation assumed for step time."),
    ]
    for option in options:
        fn = option(fn)
    return fn


def _estimates(path: str, profile: str | None, overrides: tuple[str, ...], gpu: str,
               mfu: float, suggest: bool, fmt: str) -> None:
    """`plan --estimate | --suggest`: every train stage; exit 2 when one does not fit."""
    from ..estimate import Layout, estimate
    from ..estimate import suggest as search
    from ..estimate_text import estimate_lines, suggest_lines

    loaded = load_any(path, profile, list(overrides))
    pipeline = isinstance(loaded, LoadedPipeline)
    stages = loaded.stages if pipeline else {loaded.recipe.name: loaded}
    out, lines, misfits = [], [], []
    for name, stage in stages.items():
        if stage.recipe.kind != "train":
            continue
        est = estimate(stage.recipe, gpu, mfu)
        if not est.fits:
            misfits.append(name)
        record = est.as_json()
        lines += estimate_lines(est)
        if suggest:
            found = search(stage.recipe, gpu, mfu)
            base = Layout.of(stage.recipe)
            record["suggestions"] = [
                {**f.as_json(), "overrides": f.layout.overrides(base, name if pipeline else None)}
                for f in found]
            lines += suggest_lines(name, base, found, name if pipeline else None)
        out.append(record)
        lines.append("")
    if fmt == "json":
        click.echo(json.dumps({"gpu": gpu, "mfu": mfu, "stages": out}, indent=1))
    else:
        click.echo("\n".join(lines), nl=False)
    if misfits and not suggest:
        click.echo(f"phi4: {', '.join(misfits)} would not fit on a {gpu}; `phi4 plan {path} "
                   "--suggest` lists layouts that do", err=True)
        sys.exit(BAD_INPUT)


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------


@click.command()
@click.argument("path")
@config_options
@store_option
@selection_options
@executor_options
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--estimate", is_flag=True,
              help="Per train stage: parameters, memory per GPU, FLOPs, step time, GPU-hours; "
                   "exit 2 if one does not fit.")
@click.option("--suggest", is_flag=True,
              help="Per train stage: the fastest TP/PP/CP/micro-batch/recompute layouts that "
                   "fit, with the --set overrides selecting each.")
@estimate_options
@report_config_errors
def plan(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
         executor: str, cluster_file: str | None, fmt: str, estimate: bool, suggest: bool,
         gpu: str, mfu: float, **selection: Any) -> None:
    """What `phi4 run` would do and why, and how the executor would launch each stage; runs
    nothing."""
    from ..executors.base import ExecutorError, RunOptions
    from ..plan_text import plan_json, plan_text

    if estimate or suggest:
        _estimates(path, profile, overrides, gpu, mfu, suggest, fmt)
        return

    cls = executors.get(executor)
    options = RunOptions(cluster_file=cluster_file)
    try:
        cls.check_options(options)
        planned, title, prefix = _load_plan(path, profile, overrides, store_dir, read_only=True,
                                            data_elsewhere=cls.runs_elsewhere(options),
                                            **selection)
        chosen = cls(planned, dataclasses.replace(options, title=title, prefix=prefix))
    except ExecutorError as err:
        raise UsageProblem(str(err)) from None
    _warn_absent_data(planned)
    if fmt == "json":
        click.echo(json.dumps(plan_json(planned, path, chosen), indent=1))
    else:
        click.echo(plan_text(planned, title, chosen), nl=False)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


@click.command()
@click.argument("path")
@config_options
@store_option
@selection_options
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent stages run side by side, up to this many at once.")
@click.option("--keep-going", "-k", is_flag=True,
              help="After a failure, finish the stages that do not depend on it.")
@click.option("--dry-run", "-n", is_flag=True,
              help="Print the plan (slurm, nemo_run: every job script) and run nothing.")
@click.option("--grace", type=FiniteFloat(minimum=0), default=30.0, show_default=True,
              metavar="SECONDS",
              help="After Ctrl-C/SIGTERM, how long stages may take to checkpoint before SIGKILL.")
@executor_options
@click.option("--wait", is_flag=True,
              help="slurm: follow the submitted jobs until they end (default: return at once).")
@click.option("--poll", type=FiniteFloat(positive=True), default=1.0, hidden=True)
@click.option("--no-check", is_flag=True,
              help="Run stages even where the memory estimate says they do not fit.")
@estimate_options
@report_config_errors
def run(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
        jobs: int, keep_going: bool, dry_run: bool, grace: float, executor: str,
        cluster_file: str | None, wait: bool, poll: float, no_check: bool, gpu: str,
        mfu: float, **selection: Any) -> None:
    """Run the stages that are not up to date, in dependency order."""
    from ..executors.base import ExecutorError, RunOptions
    from ..executors.base import run as run_plan
    from ..store import Store

    cls = executors.get(executor)
    options = RunOptions(jobs=jobs, keep_going=keep_going, grace=grace,
                         cluster_file=cluster_file, wait=wait, poll=poll)
    try:
        cls.check_options(options)
        if not dry_run:
            Store(store_dir).ensure_writable()
            cls.sync(Store(store_dir))  # jobs that ended unrecorded: the plan must know
        planned, title, prefix = _load_plan(
            path, profile, overrides, store_dir, read_only=dry_run,
            data_elsewhere=dry_run and cls.runs_elsewhere(options), **selection)
        if not no_check:  # GPU stages that would run out of memory never reach a queue
            from ..estimate_text import check_fit

            gpu_stages = {n: s for n, s in planned.graph.stages.items()
                          if s.recipe.resources.gpus_per_node > 0}
            from ..plan import BLOCKED, RUN

            selected = [n for n, sp in planned.stages.items() if sp.verdict in (RUN, BLOCKED)]
            check_fit(gpu_stages, selected, gpu, mfu, title.startswith("pipeline "))
        chosen = cls(planned, dataclasses.replace(options, title=title, prefix=prefix),
                     say=click.echo, note=lambda line: click.echo(line, err=True))
        _warn_absent_data(planned)
        code = run_plan(chosen, dry_run=dry_run)
    except ExecutorError as err:
        raise UsageProblem(str(err)) from None
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# status and graph
# ---------------------------------------------------------------------------------------------


@click.command()
@store_option
@click.option("--all", "every", is_flag=True, help="Every fingerprint, not only the latest.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@report_config_errors
def status(store_dir: str | None, every: bool, fmt: str) -> None:
    """Every stage in the store: state, duration, last loss, artifacts."""
    from ..status import collect, format_rows

    store = existing_store(store_dir)
    rows = executors.status(store, collect(store, every))
    if fmt == "json":
        click.echo(json.dumps({"store": str(store.root), "stages": [r.as_json() for r in rows]},
                              indent=1))
        return
    for line in format_rows(rows):
        click.echo(line)


@click.command()
@click.argument("path")
@config_options
@store_option
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot", "svg"]),
              default="text")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to FILE instead of standard output.")
@report_config_errors
def graph(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
          fmt: str, output: Path | None) -> None:
    """The lineage: stages coloured by status, trained/frozen groups, artifacts on edges."""
    from ..render import render

    planned, title, _ = _load_plan(path, profile, overrides, store_dir, with_deps=True,
                                   read_only=True)
    drawing = render(planned, fmt, title)
    if output is None:
        click.echo(drawing, nl=False)
    else:
        output.write_text(drawing)
        click.echo(f"wrote {output}", err=True)
