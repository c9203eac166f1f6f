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
from .config.errors import Origin

DEFAULT = "default"


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
    not give it (the base read alone, before pipeline, profile and --set layers)."""
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
    return [(key, base.get(key), mine.get(key)) for key in sorted(set(base) | set(mine))
            if base.get(key) != mine.get(key)]


def attempt_diff(store, name: str, fingerprint: str | None) -> tuple[str | None, list[str]]:
    """(the previous fingerprint of stage `name`, its fingerprinted fields that differ from
    `fingerprint`'s), from the store's fields.json records; (None, []) when there is none."""
    from .fingerprint import describe_changes
    from .store import _mtime

    if fingerprint is None:
        return None, []
    current = store.stage_dir(name, fingerprint)
    others = [(t, d) for d in store.stage_dirs(name) if d.fingerprint != fingerprint
              for t in [_mtime(d.status_file) or _mtime(d.fields_file)] if t is not None]
    if not others:
        return None, []
    previous = max(others, key=lambda pair: pair[0])[1]
    old, new = previous.fields() or {}, current.fields() or {}
    if not new:
        return previous.fingerprint, ["this fingerprint has no record yet"]
    return previous.fingerprint, describe_changes(old, new, limit=10**6)


def explain_lines(loaded: LoadedRecipe, pipeline: Path | None = None,
                  profile: Path | None = None) -> list[str]:
    """`phi4 show --explain`: one line per value, `key = value   file:line (layer)`, then
    what differs from the extends base."""
    import json

    from .config.errors import short_repr

    def show(value: Any) -> str:
        text = json.dumps(value)
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
