"""`phi4 cancel`, and the hooks a job script calls (`phi4 stage-hook begin|end`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import LoadedPipeline, load_any
from .common import UsageProblem, config_options, existing_store, report_config_errors, store_option


@click.command()
@click.argument("target")
@config_options
@store_option
@click.option("--descendants/--no-descendants", default=True, show_default=True,
              help="Also cancel the jobs queued to run after TARGET's.")
@report_config_errors
def cancel(target: str, profile: str | None, overrides: tuple[str, ...], store_dir: str | None,
           descendants: bool) -> None:
    """Cancel the Slurm jobs of a pipeline (PATH) or of a STAGE and the stages queued after it;
    mark them cancelled."""
    from ..executors import slurm_cli
    from ..executors.slurm_status import cancel as cancel_jobs

    store = existing_store(store_dir)
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


@click.group("stage-hook", hidden=True)
def stage_hook() -> None:
    """Called by a stage's batch script on the node: not for people."""


@stage_hook.command("begin")
@click.argument("stage_dir")
@report_config_errors  # a damaged record: one line in the job log, exit 2, no traceback
def hook_begin(stage_dir: str) -> None:
    from ..executors.hooks import begin

    sys.exit(begin(stage_dir))


@stage_hook.command("end")
@click.option("--exit-code", type=int, required=True)
@click.argument("stage_dir")
@report_config_errors
def hook_end(stage_dir: str, exit_code: int) -> None:
    from ..executors.hooks import end

    sys.exit(end(stage_dir, exit_code))
