"""What every command shares: bad input as one line and exit 2, and the common options."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import click

from ..config import ConfigError
from ..exitcodes import BAD_INPUT


class UsageProblem(click.ClickException):
    """Bad input found outside the recipe language (a missing store, a wrong flag value)."""

    exit_code = BAD_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"phi4: {self.message}", err=True)


class FiniteFloat(click.ParamType):
    """A number option that refuses NaN and infinities (click's float accepts 'nan')."""

    name = "number"

    def __init__(self, minimum: float | None = None, positive: bool = False):
        self.minimum = minimum
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and number <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{value!r} must be at least {self.minimum:g}", param, ctx)
        return number


def report_config_errors(fn: Callable) -> Callable:
    """Bad input never shows a traceback: one line per problem, exit 2."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            for problem in err.problems:
                click.echo(str(problem), err=True)
            sys.exit(BAD_INPUT)
        except Exception as err:
            if not _is_store_error(err):
                raise
            click.echo(f"phi4: {err}", err=True)  # a damaged record, an unusable --store
            sys.exit(BAD_INPUT)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _is_store_error(err: Exception) -> bool:
    # Looked up, not imported: `validate` never loads the store, and a StoreError can only
    # come from a store module that some command has already imported.
    store = sys.modules.get("orchestrator.store")
    return store is not None and isinstance(err, store.StoreError)


def quiet_megatron() -> None:
    """Commands that load models: phi4core's explicit set-up (megatron's dozen CPU fallback
    warnings hidden, the CPU shims applied where there is no GPU)."""
    from phi4core import runtime

    runtime.init()


def config_options(fn: Callable) -> Callable:
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a field (typed like the file); in a pipeline, "
                           "STAGE.KEY=VALUE targets one stage.")(fn)
    fn = click.option("--profile", default=None, metavar="NAME|FILE",
                      help="Overlay profiles/NAME.yaml, found beside the recipes, on every "
                           "stage (e.g. tiny); or the profile file at a path.")(fn)
    return fn


def store_option(fn: Callable) -> Callable:
    return click.option("--store", "store_dir", default=None, metavar="DIR",
                        help="Artifact store (default: $PHI4_STORE, else ./phi4_runs).")(fn)


def existing_store(store_dir: str | None):
    """The store at --store (or $PHI4_STORE, ./phi4_runs); a usage problem when there is
    none, so that looking never creates one."""
    from ..store import Store

    store = Store(store_dir)
    if not (store.root / "stages").is_dir():
        raise UsageProblem(f"no store at {store.root} (use --store or $PHI4_STORE)")
    return store
