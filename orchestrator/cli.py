"""`phi4`: validate, show, plan, run, graph, status, cancel and the tools around them.

The recipe-language commands (validate, show, lr) are defined here; the others in
commands/*, each registered below by name and imported only when it runs (or `--help` lists
it), so `phi4 validate` loads no executor. Start-up stays torch-free: commands that need torch
(model-info, convert, data) import it inside their bodies.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

import click

from .commands.common import FiniteFloat, UsageProblem, config_options, report_config_errors
from .config import ConfigError, LoadedPipeline, LoadedRecipe, load_any
from .config.checks import data_parallel_size
from .exitcodes import BAD_INPUT
from .words import count

# Every command of commands/*, by name: "module:attribute" (the modules define them;
# importing one registers nothing by itself).
LAZY_COMMANDS = {
    "plan": "pipeline:plan",
    "run": "pipeline:run",
    "status": "pipeline:status",
    "graph": "pipeline:graph",
    "cancel": "slurm:cancel",
    "diff": "runs:diff",
    "metrics": "runs:metrics",
    "gc": "runs:gc",
    "stage-hook": "slurm:stage_hook",
    "model-info": "model:model_info_cmd",
    "convert": "model:convert",
    "data": "data:data",
}


class _Phi4Group(click.Group):
    """A group whose commands from commands/* are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            module, attribute = LAZY_COMMANDS[name].split(":")
            command = getattr(importlib.import_module(f".commands.{module}", __package__),
                              attribute)
            if command.name != name:
                raise RuntimeError(f"LAZY_COMMANDS[{name!r}] names command {command.name!r}")
            self.add_command(command)
        return command


@click.group(cls=_Phi4Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi4")
def cli() -> None:
    """Train Phi-4-Mini and Phi-4-Multimodal from declarative recipes."""


# ---------------------------------------------------------------------------------------------
# validate / show
# ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@config_options
def validate(paths: tuple[str, ...], profile: str | None, overrides: tuple[str, ...]) -> None:
    """Check recipes, pipelines and cluster files; one line per problem, exit 2 if any."""
    failed = False
    for path in paths:
        try:
            loaded = load_any(path, profile, list(overrides), clusters=True)
        except ConfigError as err:
            failed = True
            for problem in err.problems:
                click.echo(str(problem), err=True)
            continue
        if isinstance(loaded, LoadedPipeline):
            click.echo(f"ok  {path}  (pipeline {loaded.pipeline.name}, "
                       f"{count(len(loaded.stages), 'stage')})")
        elif isinstance(loaded, LoadedRecipe):
            click.echo(f"ok  {path}  (stage {loaded.recipe.name})")
        else:
            click.echo(f"ok  {path}  (cluster {loaded.cluster.name})")
    if failed:
        sys.exit(BAD_INPUT)


def resolved_recipe(loaded: LoadedRecipe) -> dict[str, Any]:
    """The recipe with every default filled in, plus what follows from it."""
    recipe = loaded.recipe
    out = recipe.model_dump(mode="json")
    if recipe.kind == "train" and recipe.train is not None:
        t = recipe.train
        out["derived"] = {
            "world_size": recipe.resources.world_size,
            "data_parallel": data_parallel_size(recipe),
            "total_steps": t.total_steps,
            "tokens_per_step": t.tokens_per_step,
            "total_tokens": t.total_tokens,
            "peak_lr": t.peak_lr,
            "gradient_accumulation": t.global_batch_size
            // (t.micro_batch_size * data_parallel_size(recipe)),
        }
    return out


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


@cli.command()
@click.argument("path")
@config_options
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
@click.option("--explain", is_flag=True,
              help="Every value with the file:line it came from (recipe, extends base, "
                   "pipeline, profile, --set or default) and what differs from the extends "
                   "base.")
@report_config_errors
def show(path: str, profile: str | None, overrides: tuple[str, ...], fmt: str,
         explain: bool) -> None:
    """Print the fully resolved stage or pipeline."""
    loaded = load_any(path, profile, list(overrides))
    if explain:
        from .provenance import explain_lines, profile_path

        prof = profile_path(profile, loaded)
        pipeline = loaded.path if isinstance(loaded, LoadedPipeline) else None
        stages = loaded.stages.values() if pipeline else [loaded]
        for stage in stages:
            click.echo("\n".join(explain_lines(stage, pipeline, prof)))
        return
    if isinstance(loaded, LoadedPipeline):
        data: Any = {
            "name": loaded.pipeline.name,
            "description": loaded.pipeline.description,
            "stages": {name: resolved_recipe(s) for name, s in loaded.stages.items()},
        }
    else:
        data = resolved_recipe(loaded)
    click.echo(_dump(data, fmt), nl=False)


# ---------------------------------------------------------------------------------------------
# lr
# ---------------------------------------------------------------------------------------------


@cli.group()
def lr() -> None:
    """The LR scaling law LR* = B x D^a (D: training tokens)."""


@lr.command("fit")
@click.argument("sweep", type=click.Path(path_type=Path))
@click.option("--exponent", type=FiniteFloat(), default=None,
              help="Fix the exponent (the Phi-4-Mini report uses -0.32) and fit only B.")
@click.option("--min-r2", type=FiniteFloat(), default=0.5, show_default=True,
              help="Refuse a fit whose R^2 is below this.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@report_config_errors
def lr_fit(sweep: Path, exponent: float | None, min_r2: float, fmt: str) -> None:
    """Fit B and the exponent from a CSV of (tokens, best lr) rows, or of (tokens, lr, loss)
    runs (the best LR of each budget is picked)."""
    from .lr import fit, read_sweep

    runs = read_sweep(sweep)
    result = fit(runs, exponent, min_r2)
    if fmt == "json":
        import json

        click.echo(json.dumps({"B": result.B, "exponent": result.exponent, "r2": result.r2,
                               "fixed_exponent": result.fixed_exponent,
                               "points": len(result.points), "runs": runs.runs}))
        return
    fixed = " (fixed)" if result.fixed_exponent else ""
    source = (f"the best of {runs.runs} runs at {len(result.points)} budgets"
              if runs.runs > len(result.points) else f"{len(result.points)} runs")
    click.echo(f"LR* = {result.B:.6g} x D^{result.exponent:.4f}{fixed}   "
               f"R^2 = {result.r2:.4f}   from {source}")
    click.echo(f"{'tokens':>12}  {'best lr':>10}  {'fit':>10}  {'ratio':>6}")
    for d, best in result.points:
        pred = result.predict(d)
        click.echo(f"{d:12.4g}  {best:10.4g}  {pred:10.4g}  {best / pred:6.3f}")
    click.echo(f"recipe: lr: {{scaling_law: {{B: {result.B:.6g}, exponent: "
               f"{result.exponent:.4f}}}}}")


@lr.command("predict")
@click.option("--tokens", type=FiniteFloat(positive=True), required=True,
              help="Token budget D, e.g. 5e12.")
@click.option("--B", "b", type=FiniteFloat(positive=True), required=True,
              help="The law's coefficient.")
@click.option("--exponent", type=FiniteFloat(), default=-0.32, show_default=True)
def lr_predict(tokens: float, b: float, exponent: float) -> None:
    """LR* for a token budget."""
    try:
        lr = b * tokens**exponent
    except OverflowError:
        lr = math.inf
    if not (math.isfinite(lr) and lr > 0):
        raise UsageProblem(f"B x D^exponent = {b:g} x {tokens:g}^{exponent:g} is not a finite "
                           "positive number")
    click.echo(f"{lr:.6g}")


def main() -> None:
    cli(prog_name="phi4")


if __name__ == "__main__":
    main()
