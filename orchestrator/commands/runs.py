"""`phi4 diff | metrics | gc`: compare attempts, show their curves, clean the store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import UsageProblem, config_options, existing_store, report_config_errors, store_option


def _attempt(store, ref: str):
    from ..runs import RunsError, resolve

    try:
        return resolve(store, ref)
    except RunsError as err:
        raise UsageProblem(str(err)) from None


@click.command()
@click.argument("a")
@click.argument("b")
@store_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@report_config_errors
def diff(a: str, b: str, store_dir: str | None, fmt: str) -> None:
    """What differs between two attempts: fields (with their sources where recorded), inputs,
    data, and results side by side. A and B: a stage (its latest attempt), a fingerprint (or
    its first 6+ digits), STAGE@N (the stage's N-th attempt; -1 the last) or FINGERPRINT@N."""
    from ..compare import compare, diff_json, diff_text

    store = existing_store(store_dir)
    comparison = compare(_attempt(store, a), _attempt(store, b))
    if fmt == "json":
        click.echo(json.dumps(diff_json(comparison), indent=1))
        return
    for line in diff_text(comparison):
        click.echo(line)


def _selected(store, refs: tuple[str, ...], profile: str | None, overrides: tuple[str, ...],
              latest: bool):
    """The attempts named: every attempt of every stage when none is; a pipeline or recipe
    file gives its stages; a stage all its attempts; an attempt reference that attempt."""
    from ..runs import attempts_of, stage_attempts

    names: list[str] = []
    chosen = []
    for ref in refs or tuple(store.stage_names()):
        if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
            from ..config import LoadedPipeline, load_any

            loaded = load_any(ref, profile, list(overrides))
            names += list(loaded.stages) if isinstance(loaded, LoadedPipeline) \
                else [loaded.recipe.name]
        elif "@" not in ref and ref in store.stage_names():
            names.append(ref)
        else:
            chosen.append(_attempt(store, ref))
    for name in dict.fromkeys(names):
        if latest:
            folder = store.latest(name)
            found = attempts_of(folder)[-1:] if folder is not None else []
        else:
            found = stage_attempts(store, name)
        chosen += found
    unique = list({(a.folder.path, a.number): a for a in chosen}.values())
    if not unique:
        raise UsageProblem("no attempt in the store matches"
                           + (f" {' '.join(refs)}" if refs else "") + f" ({store.root})")
    return unique


@click.command()
@click.argument("refs", nargs=-1, metavar="[PIPELINE|STAGE|ATTEMPT]...")
@store_option
@config_options
@click.option("--latest", is_flag=True, help="Only each stage's latest attempt.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Draw loss, LR, grad-norm and tokens/s curves of the "
                                   "attempts on one figure (.png, .svg or .pdf).")
@click.option("--curve", default="loss", show_default=True, metavar="KEY",
              help="The metric of the terminal curves (a metrics.jsonl key).")
@report_config_errors
def metrics(refs: tuple[str, ...], store_dir: str | None, profile: str | None,
            overrides: tuple[str, ...], latest: bool, fmt: str, plot: Path | None,
            curve: str) -> None:
    """The metrics of many attempts: a table (final and best loss, tokens/s, peak memory,
    duration, evaluations) with each one's curve, or with --plot their curves on one figure."""
    from ..curves import (
        PlotError,
        figure,
        rows,
        save_figure,
        table_csv,
        table_text,
        terminal_curves,
    )

    store = existing_store(store_dir)
    attempts = _selected(store, refs, profile, overrides, latest)
    summaries = rows(attempts)
    if fmt == "json":
        click.echo(json.dumps({"store": str(store.root),
                               "attempts": [s.as_json() for s in summaries]}, indent=1))
    elif fmt == "csv":
        click.echo(table_csv(summaries), nl=False)
    else:
        for line in table_text(summaries):
            click.echo(line)
        if plot is None:
            click.echo("")
            for line in terminal_curves(attempts, curve):
                click.echo(line)
    if plot is not None:
        try:
            save_figure(figure(attempts), plot)
        except PlotError as err:
            raise UsageProblem(str(err)) from None
        click.echo(f"wrote {plot} ({len(attempts)} attempts)", err=True)


@click.command()
@click.argument("pipelines", nargs=-1, metavar="[PIPELINE]...")
@store_option
@config_options
@click.option("--keep-last", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="Keep each stage's N most recent fingerprints.")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be removed; remove nothing.")
@report_config_errors
def gc(pipelines: tuple[str, ...], store_dir: str | None, profile: str | None,
       overrides: tuple[str, ...], keep_last: int, dry_run: bool) -> None:
    """Remove the stage folders and checkpoints nothing refers to: kept are each stage's
    latest (and --keep-last N) folders, those the PIPELINEs given would use, everything they
    were made from, and anything running or queued."""
    from ..gc import collect, plan_gc, size_text

    store = existing_store(store_dir)
    pinned = _pipeline_folders(pipelines, profile, overrides, store_dir)
    planned = plan_gc(store, keep_last, pinned)
    outcomes = [(r, None) for r in planned.removals] if dry_run else collect(store, planned)
    freed = 0
    for removal, done in outcomes:
        kind = "stage folder" if removal.what == "folder" else "checkpoints"
        line = f"{removal.folder.name} {removal.folder.fingerprint}: {kind} " \
               f"{size_text(removal.bytes)}"
        if done is None:
            click.echo(f"would remove  {line}")
        elif done:
            click.echo(f"removed  {line}")
        else:
            click.echo(f"kept     {line} (its stage started running)")
        freed += removal.bytes if done is not False else 0
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {size_text(freed)}; kept {len(planned.kept)} stage folder(s)")


def _pipeline_folders(paths: tuple[str, ...], profile: str | None,
                      overrides: tuple[str, ...], store_dir: str | None
                      ) -> set[tuple[str, str]]:
    """(stage, fingerprint) of every stage the pipelines would use, as `phi4 plan` sees them."""
    from .pipeline import _load_plan

    pinned: set[tuple[str, str]] = set()
    for path in paths:
        planned, _, _ = _load_plan(path, profile, overrides, store_dir, read_only=True)
        pinned |= {(sp.name, sp.fingerprint) for sp in planned.stages.values()
                   if sp.fingerprint is not None}
    return pinned
