"""Safe YAML reading that remembers the file:line of every key.

PyYAML's composer keeps source marks on nodes; we build Python values from the node graph
ourselves so that (a) only plain YAML types are produced (no Python object tags), (b) an alias
bomb is refused by counting the nodes an expansion would create, (c) nothing nests deeper than
`MAX_DEPTH` (so no later recursive walk can overflow the stack), and (d) every key path maps
to the line where it was written. Files come through `files.read_bytes` (regular files of
bounded size); `--set` values through `parse_value`, under the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Loc, Origin, Positions
from .files import read_bytes

# libyaml's composer when PyYAML was built with it (several times faster; same nodes and marks).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Enough for any real recipe; a billion-laughs document needs millions.
MAX_EXPANDED_NODES = 100_000
# Keys and list indices from the top to the deepest value; real recipes need about 6
# (a profile's stages.NAME.data.sources[0].path).
MAX_DEPTH = 32

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq", "tag:yaml.org,2002:timestamp",
}


class _Builder:
    def __init__(self, file: str, fixed: Origin | None = None):
        self.file = file
        self.fixed = fixed  # every node's origin (a --set value), else file:line
        self.count = 0
        self.positions: Positions = {}
        self._scalars = yaml.SafeLoader("")  # only for construct_scalar-type helpers

    def origin(self, node: yaml.Node) -> Origin:
        return self.fixed or Origin(self.file, node.start_mark.line + 1)

    def build(self, node: yaml.Node, loc: Loc, active: tuple[int, ...] = ()) -> Any:
        self.count += 1
        if len(loc) > MAX_DEPTH:
            raise ConfigError.single(self.origin(node), loc[:1],
                                     f"nested deeper than {MAX_DEPTH} levels")
        if self.count > MAX_EXPANDED_NODES:
            # Aliases share nodes, so blame the top-level key being expanded, not the anchor.
            raise ConfigError.single(
                self.positions.get(loc[:1], self.origin(node)), loc[:1],
                f"document expands to more than {MAX_EXPANDED_NODES} nodes (an alias bomb?)",
            )
        if id(node) in active:
            raise ConfigError.single(self.origin(node), loc, "recursive alias")
        if node.tag not in _PLAIN_TAGS:
            raise ConfigError.single(
                self.origin(node), loc, f"tag {node.tag!r} is not allowed: recipes are plain YAML"
            )
        self.positions.setdefault(loc, self.origin(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConfigError.single(
                        self.origin(key_node), loc,
                        "'<<' merge keys are not supported; use extends:"
                    )
                key = self.build(key_node, loc + ("<key>",))
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise ConfigError.single(self.origin(key_node), loc, "keys must be strings",
                                             key)
                key = str(key)
                if key in out:
                    raise ConfigError.single(self.origin(key_node), loc + (key,), "duplicate key")
                self.positions[loc + (key,)] = self.origin(key_node)
                out[key] = self.build(value_node, loc + (key,), active + (id(node),))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [
                self.build(item, loc + (i,), active + (id(node),))
                for i, item in enumerate(node.value)
            ]
        return self._scalars.construct_object(node, deep=True)


def _compose(text: str, origin: Origin) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Origin(origin.file, mark.line + 1 if mark else 1, origin.override)
        what = " ".join(s for s in (exc.context, exc.problem) if s)
        raise ConfigError.single(where, (), f"YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(origin, (), f"YAML error: {exc}") from None
    except RecursionError:  # the pure-Python composer, on nesting far beyond MAX_DEPTH
        raise ConfigError.single(origin, (), f"nested deeper than {MAX_DEPTH} levels") from None


def read_yaml(path: Path) -> tuple[Any, Positions]:
    """Parse one YAML file into plain Python values and the origin of every key path."""
    file = str(path)
    raw = read_bytes(path)
    if b"\x00" in raw:
        raise ConfigError.single(Origin(file, 1), (), "binary file, expected YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError.single(Origin(file, line), (), "not UTF-8 text, expected YAML") from None
    node = _compose(text, Origin(file, 1))
    if node is None:
        raise ConfigError.single(Origin(file, 1), (), "file is empty")
    builder = _Builder(file)
    value = builder.build(node, ())
    if not isinstance(value, dict):
        raise ConfigError.single(
            builder.origin(node), (), "expected a mapping of keys at the top level", value
        )
    return value, builder.positions


def parse_value(text: str, origin: Origin, at: Loc = ()) -> Any:
    """A `--set` value, typed as YAML and held to the rules of a file; `at` is the key path it
    is set at (its depth counts towards MAX_DEPTH). Empty text is the empty string."""
    if not text.strip():
        return ""
    node = _compose(text, origin)
    if node is None:
        return None
    return _Builder(origin.file, fixed=origin).build(node, tuple(at))
