"""OmegaConf interpolation (`${train.seq_length}`, `${oc.env:VAR,default}`) with errors per key.

Only resolvers that read configuration or the environment are allowed; anything else
(a registered `eval`, say) is refused before OmegaConf sees it.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError, Loc, Origin, Positions, Problem, origin_of

ALLOWED_RESOLVERS = {"oc.env", "oc.select"}
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")
_ENV_CALL = re.compile(r"\$\{\s*oc\.env\s*:\s*([^,}]+?)\s*\}")


def _strings(value: Any, loc: Loc = ()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, loc + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, loc + (i,))
    elif isinstance(value, str):
        yield loc, value


def resolve(doc: dict, positions: Positions, default: Origin) -> dict:
    """`doc` with every interpolation resolved; all problems reported together."""
    from omegaconf import grammar_parser

    problems: list[Problem] = []
    has_interpolation = False
    for loc, text in _strings(doc):
        if "${" not in text:
            continue
        has_interpolation = True
        try:
            grammar_parser.parse(text)
        except Exception as exc:  # GrammarParseError: say where, not a traceback
            problems.append(Problem(origin_of(positions, loc, default), loc,
                                    f"malformed interpolation: {str(exc).splitlines()[0]}", text))
            continue
        for name in _RESOLVER_CALL.findall(text):
            if name not in ALLOWED_RESOLVERS:
                problems.append(Problem(
                    origin_of(positions, loc, default), loc,
                    f"resolver {name!r} is not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_RESOLVERS))})",
                    text,
                ))
    if problems:
        raise ConfigError(problems)
    if not has_interpolation:
        return doc

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(doc)

    def walk(node: Any, loc: Loc) -> Any:
        if isinstance(node, dict):
            return {k: walk_key(node, k, loc + (k,)) for k in node}
        if isinstance(node, list):
            return [walk_key(node, i, loc + (i,)) for i in range(len(node))]
        return node

    def walk_key(raw_parent: Any, key: Any, loc: Loc) -> Any:
        raw = raw_parent[key]
        if isinstance(raw, (dict, list)):
            return walk(raw, loc)
        if not (isinstance(raw, str) and "${" in raw):
            return raw
        try:
            return OmegaConf.select(cfg, _dotted(loc), throw_on_missing=True)
        except OmegaConfBaseException as exc:
            problems.append(Problem(origin_of(positions, loc, default), loc,
                                    _explain(raw, exc), raw))
            return None

    resolved = walk(doc, ())
    if problems:
        raise ConfigError(problems)
    return resolved


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(text: str, exc: Exception) -> str:
    message = str(exc).splitlines()[0]
    env = _ENV_CALL.search(text)
    if env and "not found" in message:
        return (f"environment variable {env.group(1)} is not set; set it or give a default: "
                f"${{oc.env:{env.group(1)},DEFAULT}}")
    return f"cannot resolve interpolation: {message}"
