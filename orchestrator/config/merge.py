"""Layering of configuration documents (extends, profiles, per-stage and --set overrides).

Mappings merge key by key; lists and scalars replace. Two rules make overlays expressive
without new syntax: `null` in an overlay removes the key (so a profile can drop an input), and
each entry of `inputs` is replaced whole (merging `{hf: ...}` into `{stage: ...}` would make
an input with two sources).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import Loc, Positions

# Paths whose children are replaced whole instead of merged ("*" matches any key).
_ATOMIC = (("inputs", "*"),)


def _is_atomic(loc: Loc) -> bool:
    return any(
        len(loc) == len(pattern) and all(p in ("*", part) for p, part in zip(pattern, loc))
        for pattern in _ATOMIC
    )


_IMMUTABLE = (str, int, float, bool, type(None))  # YAML's scalars but dates (rare: deep-copied)


def copy_document(value: Any) -> Any:
    """A deep copy of plain YAML values (mappings, lists, scalars), several times faster than
    `copy.deepcopy`; anything else is deep-copied the general way."""
    if isinstance(value, dict):
        return {key: copy_document(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_document(item) for item in value]
    if isinstance(value, _IMMUTABLE):
        return value
    return copy.deepcopy(value)


def merge(base: dict, base_pos: Positions, over: dict, over_pos: Positions,
          at: Loc = ()) -> tuple[dict, Positions]:
    """`over` layered on `base`; returns new values and positions, inputs untouched."""
    out = copy_document(base)
    positions = dict(base_pos)
    _merge_into(out, positions, over, over_pos, at)
    return out, positions


class _Below:
    """Key paths below one level of a merge (`depth` parts deep), grouped by their next part
    when first asked for. A level gets the paths of its parent's group, so each path is looked
    at once per level above it, not once per key replaced. Groups stay exact while each is used
    once and only the subtrees of other keys of the level change, as `_merge_into` does."""

    def __init__(self, paths: list[Loc], depth: int):
        self.paths = paths
        self.depth = depth
        self.groups: dict[Any, list[Loc]] | None = None

    def under(self, key: Any) -> list[Loc]:
        """Every path that continues with `key`, in the order of the positions it came from."""
        if self.groups is None:
            self.groups = {}
            for path in self.paths:
                if len(path) > self.depth:
                    self.groups.setdefault(path[self.depth], []).append(path)
        return self.groups.get(key, [])


def _merge_into(out: dict, positions: Positions, over: dict, over_pos: Positions, at: Loc,
                mine: _Below | None = None, theirs: _Below | None = None) -> None:
    if mine is None or theirs is None:
        mine = _Below([p for p in positions if p[:len(at)] == at], len(at))
        theirs = _Below([p for p in over_pos if p[:len(at)] == at], len(at))
    for key, value in over.items():
        loc = at + (key,)
        if value is None:
            out.pop(key, None)
            for path in mine.under(key):
                del positions[path]
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _is_atomic(loc):
            if loc in over_pos:
                positions.setdefault(loc, over_pos[loc])
            _merge_into(out[key], positions, value, over_pos, loc,
                        _Below(mine.under(key), len(loc)), _Below(theirs.under(key), len(loc)))
            continue
        out[key] = copy_document(value)
        for path in mine.under(key):
            del positions[path]
        for path in theirs.under(key):
            positions[path] = over_pos[path]


def drop_nulls(value: Any) -> Any:
    """The finished document with its remaining `null` keys removed: a null that found nothing
    to remove (the base had no such key) still means "no such key", never a None value.
    Layers keep their nulls until then, so a profile extending a profile still removes."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def set_path(doc: dict, loc: Loc, value: Any) -> None:
    """doc[a][b]... = value for --set, creating mappings on the way; integer parts index lists.
    `None` removes the key, as `null` does in an overlay. Raises KeyError naming the part of
    the path that cannot be followed."""
    node: Any = doc
    for depth, key in enumerate(loc[:-1]):
        if isinstance(node, list):
            if not isinstance(key, int) or not -len(node) <= key < len(node):
                raise KeyError(f"{key!r} is not an index of the list at {_path(loc[:depth])}")
            node = node[key]
            continue
        if not isinstance(node, dict):
            raise KeyError(f"{_path(loc[:depth])} is not a mapping")
        if node.get(key) is None:
            node[key] = {}
        elif not isinstance(node[key], (dict, list)):
            raise KeyError(f"{_path(loc[:depth + 1])} is not a mapping")
        node = node[key]
    last = loc[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise KeyError(f"{last!r} is not an index of the list at {_path(loc[:-1])}")
        node[last] = value
    elif not isinstance(node, dict):
        raise KeyError(f"{_path(loc[:-1])} is not a mapping")
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def _path(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "the top level"
