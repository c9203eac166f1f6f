"""`phi4 run --executor slurm`, `phi4 cancel`, and the hooks a batch script calls."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli import UsageProblem, _report_config_errors, cli, config_options
from ..config import LoadedPipeline, load_any


def run_on_slurm(planned, prefix: str, title: str, cluster_file: str | None, dry_run: bool,
                 wait: bool, poll: float) -> None:
    """Submit every stage that must run; with `wait`, follow them to the end."""
    from ..config.cluster import load_cluster
    from ..executors import slurm_cli
    from ..executors.local import exit_status
    from ..executors.slurm import SlurmExecutor, StoreNotUsable

    if cluster_file is None:
        raise UsageProblem("--executor slurm needs --cluster FILE (e.g. clusters/local.yaml)")
    executor = SlurmExecutor(planned, load_cluster(cluster_file), prefix,
                             say=lambda line: click.echo(line))
    try:
        executor.check()
    except StoreNotUsable as err:
        raise UsageProblem(str(err)) from None
    todo = planned.to_run()
    if dry_run:
        click.echo(executor.dry_run() if todo else f"nothing to run: "
                   f"{planned.count('up to date')} stages up to date", nl=False)
        return
    if not todo:
        click.echo(f"nothing to run: {planned.count('up to date')} stages up to date "
                   f"(store {planned.store.root})")
        return
    down = slurm_cli.ping()
    if down:
        raise UsageProblem(f"Slurm is not answering: {down}")
    click.echo(f"{title}: submitting {len(todo)} of {len(planned.stages)} stages to "
               f"{executor.cluster.name} (store {planned.store.root})", err=True)
    try:
        submitted = executor.submit()
    except slurm_cli.SlurmError as err:
        raise UsageProblem(str(err)) from None
    if not wait:
        click.echo(f"follow with: phi4 status --store {planned.store.root}", err=True)
        return
    outcomes = executor.wait(submitted, poll=poll)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()), err=True)
    sys.exit(exit_status(outcomes, None))


@cli.command()
@click.argument("target")
@config_options
@click.option("--store", "store_dir", default=None, metavar="DIR",
              help="Artifact store (default: $PHI4_STORE, else ./phi4_runs).")
@click.option("--descendants/--no-descendants", default=True, show_default=True,
              help="Also cancel the jobs queued to run after TARGET's.")
@_report_config_errors
def cancel(target: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
           descendants: bool) -> None:
    """Cancel the Slurm jobs of a pipeline (PATH) or of a STAGE and the stages queued after it;
    mark them cancelled."""
    from ..executors import slurm_cli
    from ..executors.slurm_status import cancel as cancel_jobs
    from ..store import Store

    store = Store(store_dir)
    if not (store.root / "stages").is_dir():
        raise UsageProblem(f"no store at {store.root} (use --store or $PHI4_STORE)")
    if Path(target).is_file():
        loaded = load_any(target, profile, list(overrides))
        names = list(loaded.stages) if isinstance(loaded, LoadedPipeline) \
            else [loaded.recipe.name]
    elif target in store.stage_names():
        names = [target]
    else:
        raise UsageProblem(f"{target} is neither a pipeline or recipe file nor a stage in the "
                           f"store {store.root} (stages: {', '.join(store.stage_names())})")
    try:
        cancelled = cancel_jobs(store, names, descendants)
    except slurm_cli.SlurmError as err:
        raise UsageProblem(str(err)) from None
    for name, job_id in cancelled:
        click.echo(f"cancelled  {name}: job {job_id}")
    if not cancelled:
        click.echo(f"nothing to cancel: no queued or running Slurm job for {', '.join(names)}")


@cli.group("stage-hook", hidden=True)
def stage_hook() -> None:
    """Called by a stage's batch script on the node: not for people."""


@stage_hook.command("begin")
@click.argument("stage_dir")
def hook_begin(stage_dir: str) -> None:
    from ..executors.hooks import begin

    sys.exit(begin(stage_dir))


@stage_hook.command("end")
@click.option("--exit-code", type=int, required=True)
@click.argument("stage_dir")
def hook_end(stage_dir: str, exit_code: int) -> None:
    from ..executors.hooks import end

    sys.exit(end(stage_dir, exit_code))
