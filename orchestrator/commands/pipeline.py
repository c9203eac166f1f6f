"""`phi4 plan | run | status | graph`: the DAG of stages against the artifact store."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..cli import FiniteFloat, UsageProblem, _report_config_errors, cli, config_options
from ..config import LoadedPipeline, load_any
from ..config.errors import did_you_mean


def store_option(fn: Callable) -> Callable:
    return click.option("--store", "store_dir", default=None, metavar="DIR",
                        help="Artifact store (default: $PHI4_STORE, else ./phi4_runs).")(fn)


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


def _load_plan(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
               with_deps: bool = False, only: tuple[str, ...] = (), from_: str | None = None,
               until: str | None = None, force: str | None = None, read_only: bool = False):
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
    return make_plan(graph, Store(store_dir, read_only), selection, rerun_args), title, prefix


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------


def plan_json(plan, source: str) -> dict[str, Any]:
    stages = []
    for name, sp in plan.stages.items():
        stages.append({
            "name": name, "kind": sp.loaded.recipe.kind, "verdict": sp.verdict,
            "reasons": sp.reasons, "selected": sp.selected, "fingerprint": sp.fingerprint,
            "inputs": {k: {"source": i.source, "path": i.path, "stage": i.stage,
                           "artifact": i.artifact, "frozen": i.frozen,
                           "fingerprint": i.fingerprint} for k, i in sp.inputs.items()},
            "command": sp.command, "command_text": shlex.join(sp.command) if sp.command else None,
            "env": {k: v for k, v in sp.env.items()},
            "stage_dir": str(sp.attempt.dir) if sp.attempt else None,
        })
    return {"source": source, "store": str(plan.store.root), "stages": stages,
            "summary": _summary(plan)}


def _summary(plan) -> dict[str, int]:
    from ..plan import BLOCKED, RUN, SKIP, UP_TO_DATE

    return {v: plan.count(v) for v in (RUN, UP_TO_DATE, BLOCKED, SKIP)}


def plan_text(plan, title: str) -> str:
    lines = [f"{title}: {len(plan.stages)} stages, store {plan.store.root}"]
    for name, sp in plan.stages.items():
        fp = f"  {sp.fingerprint}" if sp.fingerprint else ""
        lines.append(f"{sp.verdict:>12}  {name}{fp}")
        for reason in sp.reasons:
            lines.append(f"{'':>14}why: {reason}")
        for input_name, inp in sp.inputs.items():
            origin = f"{inp.stage}.{inp.artifact}" if inp.source == "stage" else inp.source
            frozen = " (frozen)" if inp.frozen else ""
            lines.append(f"{'':>14}input {input_name} <- {origin}{frozen}: {inp.path}")
        if sp.command:
            lines.append(f"{'':>14}$ {shlex.join(sp.command)}")
    counts = _summary(plan)
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items() if n or v != "not selected"))
    return "\n".join(lines) + "\n"


@cli.command()
@click.argument("path")
@config_options
@store_option
@selection_options
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@_report_config_errors
def plan(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
         fmt: str, **selection: Any) -> None:
    """What `phi4 run` would do and why; runs nothing."""
    planned, title, _ = _load_plan(path, profile, overrides, store_dir, read_only=True,
                                   **selection)
    if fmt == "json":
        click.echo(json.dumps(plan_json(planned, path), indent=1))
    else:
        click.echo(plan_text(planned, title), nl=False)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


@cli.command()
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
@click.option("--executor", type=click.Choice(["local", "slurm", "nemo_run"]), default="local",
              show_default=True, help="Where stages run: here, as Slurm batch jobs, or as a "
                                      "NeMo-Run experiment.")
@click.option("--cluster", "cluster_file", default=None, metavar="FILE",
              help="clusters/NAME.yaml: partition, account, container, env (slurm, nemo_run).")
@click.option("--wait", is_flag=True,
              help="slurm: follow the submitted jobs until they end (default: return at once).")
@click.option("--poll", type=FiniteFloat(positive=True), default=1.0, hidden=True)
@_report_config_errors
def run(path: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
        jobs: int, keep_going: bool, dry_run: bool, grace: float, executor: str,
        cluster_file: str | None, wait: bool, poll: float, **selection: Any) -> None:
    """Run the stages that are not up to date, in dependency order."""
    from ..executors.local import LocalExecutor, exit_status
    from ..plan import resolve_or_raise
    from ..progress import Display

    if executor == "local" and (cluster_file or wait):
        raise UsageProblem("--cluster and --wait go with --executor slurm or nemo_run")
    if executor == "slurm" and not dry_run:
        from ..executors.slurm_status import reconcile_store
        from ..store import Store

        reconcile_store(Store(store_dir))  # jobs that ended unrecorded: the plan must know
    planned, title, prefix = _load_plan(path, profile, overrides, store_dir,
                                        read_only=dry_run, **selection)
    if executor == "slurm":
        from .slurm import run_on_slurm

        resolve_or_raise(planned)  # a script cannot be shown for a stage with missing inputs
        run_on_slurm(planned, prefix, title, cluster_file, dry_run, wait, poll)
        return
    if executor == "nemo_run":
        from .nemo import run_on_nemo

        resolve_or_raise(planned)
        run_on_nemo(planned, prefix, title, cluster_file, dry_run)
        return
    if dry_run:
        click.echo(plan_text(planned, title), nl=False)
        return
    resolve_or_raise(planned)
    todo = planned.to_run()
    too_big = [n for n in todo if planned.stages[n].loaded.recipe.resources.nodes > 1]
    if too_big:
        raise UsageProblem(f"stage {too_big[0]} needs "
                           f"{planned.stages[too_big[0]].loaded.recipe.resources.nodes} nodes; "
                           "the local executor runs on this machine only (try --profile tiny)")
    if not todo:
        click.echo(f"nothing to run: {planned.count('up to date')} stages up to date "
                   f"(store {planned.store.root})")
        return
    click.echo(f"{title}: running {len(todo)} of {len(planned.stages)} stages "
               f"(store {planned.store.root})", err=True)
    executor = LocalExecutor(planned, jobs=jobs, keep_going=keep_going, grace_seconds=grace,
                             display=Display(todo, stream=sys.stdout))
    outcomes = executor.run()
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing ran", err=True)
    sys.exit(exit_status(outcomes, executor.stop_signal))


# ---------------------------------------------------------------------------------------------
# status and graph
# ---------------------------------------------------------------------------------------------


@cli.command()
@store_option
@click.option("--all", "every", is_flag=True, help="Every fingerprint, not only the latest.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def status(store_dir: str | None, every: bool, fmt: str) -> None:
    """Every stage in the store: state, duration, last loss, artifacts."""
    from ..status import collect, format_rows
    from ..store import Store

    store = Store(store_dir)
    if not (store.root / "stages").is_dir():
        raise UsageProblem(f"no store at {store.root} (use --store or $PHI4_STORE)")
    rows = collect(store, every)
    if any(r.executor == "slurm" for r in rows):
        from ..executors.slurm_status import annotate

        rows = annotate(store, rows)
    if fmt == "json":
        click.echo(json.dumps({"store": str(store.root), "stages": [r.as_json() for r in rows]},
                              indent=1))
        return
    for line in format_rows(rows):
        click.echo(line)


@cli.command()
@click.argument("path")
@config_options
@store_option
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot", "svg"]),
              default="text")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to FILE instead of standard output.")
@_report_config_errors
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
