"""Local paths in a recipe: anchored to the file that wrote them, recorded absolute.

A relative data path, `{path}`/`{hf}` input, tokenizer folder or evaluation set means the same
thing as a relative `extends:`: relative to the folder of the file it is written in (a recipe,
an `extends:` parent, a profile, a pipeline's overrides). Two exceptions, both relative to the
working directory: a `--set` value, and a value whose text starts with an environment variable
(`${oc.env:PHI4_DATA}/web`, the shell's idea of a path). After this step every local path in
the recipe, and so in the stage spec, is absolute.

An empty path (`{path: ""}`, an unset variable with an empty default) would name the working
directory itself: it is an error, as is a path longer than the OS accepts, or shard ranges
(`{000000..002047}`) naming more than MAX_SHARDS files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import Loc, Origin, Positions, Problem, origin_of

# Linux limits (PATH_MAX, NAME_MAX); longer paths fail every system call with ENAMETOOLONG.
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255
# Shard names a data path's `{lo..hi}` ranges may expand to (each range's names are built).
MAX_SHARDS = 1_000_000


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def path_fields(doc: dict) -> Iterator[Loc]:
    """Locations of the local-path fields of a recipe document (whatever their values)."""
    if isinstance(doc.get("tokenizer"), str) and doc["tokenizer"] != "demo":
        yield ("tokenizer",)
    inputs = doc.get("inputs")
    if isinstance(inputs, dict):
        for name, inp in inputs.items():
            for key in ("path", "hf"):
                if isinstance(inp, dict) and isinstance(inp.get(key), str):
                    yield ("inputs", name, key)
    data = doc.get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    if isinstance(sources, list):
        for i, source in enumerate(sources):
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                yield ("data", "sources", i, "path")
    evaluate = doc.get("evaluate")
    if isinstance(evaluate, dict):
        if isinstance(evaluate.get("heldout"), str):
            yield ("evaluate", "heldout")
        for key in ("tasks", "heldout_images"):
            items = evaluate.get(key)
            for i, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict) and isinstance(item.get("path"), str):
                    yield ("evaluate", key, i, "path")


def _get(doc: Any, loc: Loc) -> Any:
    for part in loc:
        doc = doc[part]
    return doc


def _set(doc: Any, loc: Loc, value: Any) -> None:
    _get(doc, loc[:-1])[loc[-1]] = value


def _too_long(path: str) -> bool:
    encoded = os.fsencode(path)
    return (len(encoded) > MAX_PATH_BYTES
            or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")))


def shard_count(path: str) -> int | None:
    """How many names the `{lo..hi}` ranges of a data path expand to; None when a bound has
    more digits than any shard number could (int() of those is refused or slow)."""
    sizes = []
    for lo, hi in re.findall(r"\{(\d+)\.\.(\d+)\}", path):
        if max(len(lo), len(hi)) > 12:
            return None
        sizes.append(max(0, int(hi) - int(lo) + 1))
    return math.prod(sizes)


def _base(origin: Origin, written: Any) -> Path:
    """The folder a relative path written at `origin` is relative to."""
    from_env = isinstance(written, str) and written.lstrip().startswith("${oc.env:")
    if origin.override is not None or from_env or not origin.file:
        return Path.cwd()
    return Path(os.path.abspath(Path(origin.file).parent))


def anchor_paths(raw: dict, resolved: dict, positions: Positions, default: Origin
                 ) -> list[Problem]:
    """Make every local path of `resolved` absolute, in place; `raw` is the same document
    before interpolation (to tell a path that came from an environment variable)."""
    problems = []
    for loc in path_fields(resolved):
        value: str = _get(resolved, loc)
        origin = origin_of(positions, loc, default)
        if not value.strip():
            problems.append(Problem(origin, loc, "empty path (an unset environment variable "
                                                 "with an empty default?)", value))
            continue
        if is_remote(value):
            continue
        if "\x00" in value or _too_long(value):
            problems.append(Problem(origin, loc, "not a usable path (too long for the OS, or "
                                                 "it holds a NUL byte)", value))
            continue
        shards = shard_count(value)
        if shards is None or shards > MAX_SHARDS:
            problems.append(Problem(origin, loc, f"shard ranges name more than {MAX_SHARDS} "
                                                 "files", value))
            continue
        path = os.path.expanduser(value)
        if not os.path.isabs(path):
            try:
                written = _get(raw, loc)
            except (KeyError, IndexError, TypeError):
                written = None
            path = str(_base(origin, written) / path)
        if _too_long(path):
            problems.append(Problem(origin, loc, "this path made absolute is too long for "
                                                 "the OS", path))
            continue
        _set(resolved, loc, path)
    return problems
