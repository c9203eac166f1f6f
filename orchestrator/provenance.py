"""Where each value of a resolved stage came from, and what changed: `phi4 show --explain` and
the HTML report.

The loader keeps the file:line (or `--set` flag) of every key path it merged
(LoadedRecipe.positions, built for error messages); here each resolved value is named with
it and with its layer: the recipe file, a file it `extends`, the pipeline's overrides, the
profile, a `--set` flag, or the schema's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LoadedRecipe
from .config.errors import Origin, format_loc

DEFAULT = "default"


class _Unset:
    """A key one side of a diff does not have."""

    def __repr__(self) -> str:
        return "(unset)"


UNSET = _Unset()


@dataclass(frozen=True)
class Source:
    key: str  # dotted key path, list items as [i]
    value: Any
    origin: Origin | None  # None: the schema's default
    layer: str  # recipe | extends | pipeline | profile | --set | default

    def where(self) -> str:
        return str(self.origin) if self.origin is not None else "(default)"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key path; lists are leaves (a recipe writes a list as one value)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _loc(key: str) -> tuple[str, ...]:
    return tuple(key.split("."))


def provenance_record(loaded: LoadedRecipe) -> dict[str, str]:
    """Every key path the layers wrote, as fields.json spells it (`data.sources[0].path`), ->
    its file:line or --set flag: a stage folder's provenance.json, read by `phi4 diff`."""
    return {format_loc(loc): str(origin) for loc, origin in loaded.positions.items()
            if loc and "<key>" not in loc}


def layer_of(origin: Origin | None, loaded: LoadedRecipe, pipeline: Path | None,
             profile: Path | None) -> str:
    if origin is None:
        return DEFAULT
    if origin.override is not None:
        return "--set" if origin.override.startswith("--set") else "profile"
    file = Path(origin.file)
    if file == Path(loaded.path):
        return "recipe"
    if pipeline is not None and file == Path(pipeline):
        return "pipeline"
    if profile is not None and file.resolve() == profile.resolve():
        return "profile"
    return "extends"


def sources(loaded: LoadedRecipe, pipeline: Path | None = None, profile: Path | None = None
            ) -> list[Source]:
    """Every resolved value of the stage (defaults filled in) with its origin and layer."""
    resolved = flatten(loaded.recipe.model_dump(mode="json"))
    out = []
    for key, value in resolved.items():
        origin = loaded.positions.get(_loc(key))
        out.append(Source(key, value, origin, layer_of(origin, loaded, pipeline, profile)))
    return out


def extends_diff(loaded: LoadedRecipe) -> list[tuple[str, Any, Any]]:
    """(key, base value, this stage's value) for every value the stage's `extends` base does
    not give it (the base read alone, before pipeline, profile and --set layers); UNSET where
    one side has no such key."""
    from .config.loader import read_with_extends
    from .config.yamlio import read_yaml

    raw, _ = read_yaml(Path(loaded.path))
    parents = raw.get("extends")
    if not parents:
        return []
    base: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        doc, _ = read_with_extends(Path(loaded.path).parent / parent)
        base.update(flatten(doc))
    mine = flatten(loaded.document)
    keys = sorted(set(base) | set(mine))
    return [(k, base.get(k, UNSET), mine.get(k, UNSET)) for k in keys
            if base.get(k, UNSET) != mine.get(k, UNSET)]


def attempt_diff(store, name: str, fingerprint: str | None) -> tuple[str | None, list[str]]:
    """(the label of the attempt of stage `name` before the latest one of `fingerprint`, what
    differs: `key: old -> new  (source)` per field, through `phi4 diff`'s field diff
    (orchestrator/compare.py)); (None, []) when there is none."""
    from .compare import field_changes, folder_fields, folder_sources, show_value
    from .runs import stage_attempts

    attempts = stage_attempts(store, name)
    mine = [i for i, a in enumerate(attempts) if a.fingerprint == fingerprint and a.current]
    if not mine or mine[0] == 0:
        return None, []
    before, now = attempts[mine[0] - 1], attempts[mine[0]]
    label = f"attempt {before.number} of fingerprint {before.fingerprint}"
    if before.folder == now.folder:
        return label, ["same fingerprint: no field differs"]
    changes = field_changes(folder_fields(before.folder), folder_fields(now.folder),
                            folder_sources(before.folder), folder_sources(now.folder))
    return label, [f"{c.key}: {show_value(c.a)} -> {show_value(c.b)}"
                   + (f" ({c.source_b})" if c.source_b else "") for c in changes]


def explain_lines(loaded: LoadedRecipe, pipeline: Path | None = None,
                  profile: Path | None = None) -> list[str]:
    """`phi4 show --explain`: one line per value, `key = value   file:line (layer)`, then
    what differs from the extends base."""
    import json

    from .config.errors import short_repr

    def show(value: Any) -> str:
        text = repr(value) if value is UNSET else json.dumps(value)
        return text if len(text) <= 60 else short_repr(text, 60).strip("'")

    rows = sources(loaded, pipeline, profile)
    width = max((len(r.key) for r in rows), default=0)
    lines = [f"stage {loaded.recipe.name}  ({loaded.path})"]
    for r in rows:
        where = "(default)" if r.origin is None else f"{r.where()} ({r.layer})"
        lines.append(f"  {r.key:<{width}} = {show(r.value):<24} {where}")
    diff = extends_diff(loaded)
    if diff:
        lines.append("  differs from its extends base:")
        for key, old, new in diff:
            lines.append(f"    {key}: {show(old)} -> {show(new)}")
    return lines


def profile_path(profile: str | None, loaded) -> Path | None:
    """The profile file `--profile` named, found as the loader finds it."""
    from .config import LoadedPipeline
    from .config.loader import find_profile

    if not profile:
        return None
    if isinstance(loaded, LoadedPipeline):
        dirs = [loaded.path.parent] + [Path(s.path).parent for s in loaded.stages.values()]
    else:
        dirs = [Path(loaded.path).parent]
    return find_profile(profile, dirs)
