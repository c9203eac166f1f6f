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


def merge(base: dict, base_pos: Positions, over: dict, over_pos: Positions,
          at: Loc = ()) -> tuple[dict, Positions]:
    """`over` layered on `base`; returns new values and positions, inputs untouched."""
    out = copy.deepcopy(base)
    positions = dict(base_pos)
    _merge_into(out, positions, over, over_pos, at)
    return out, positions


def _drop_positions(positions: Positions, loc: Loc) -> None:
    for key in [k for k in positions if k[: len(loc)] == loc]:
        del positions[key]


def _copy_positions(positions: Positions, src: Positions, loc: Loc) -> None:
    for key, origin in src.items():
        if key[: len(loc)] == loc:
            positions[key] = origin


def _merge_into(out: dict, positions: Positions, over: dict, over_pos: Positions, at: Loc) -> None:
    for key, value in over.items():
        loc = at + (key,)
        if value is None:
            out.pop(key, None)
            _drop_positions(positions, loc)
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _is_atomic(loc):
            if loc in over_pos:
                positions.setdefault(loc, over_pos[loc])
            _merge_into(out[key], positions, value, over_pos, loc)
            continue
        out[key] = copy.deepcopy(value)
        _drop_positions(positions, loc)
        _copy_positions(positions, over_pos, loc)


def set_path(doc: dict, loc: Loc, value: Any) -> None:
    """Set doc[a][b]... = value, creating mappings on the way (for --set)."""
    node = doc
    for key in loc[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[loc[-1]] = value
