"""OmegaConf interpolation (`${train.seq_length}`, `${oc.env:VAR,default}`) with errors per key.

Only resolvers that read configuration or the environment are allowed; anything else
(a registered `eval`, say) is refused before OmegaConf sees it.

Most recipes interpolate nothing but `${oc.env:VAR,/a/path}`. A document whose every
interpolation has that plain shape, and whose variables are all set or defaulted to a path, is
resolved here without OmegaConf (whose grammar parser costs more than the rest of `phi4
validate`); the result is the one OmegaConf gives. Anything else, and every error, goes through
OmegaConf, so its messages stay exactly OmegaConf's.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import ConfigError, Loc, Origin, Positions, Problem, origin_of

ALLOWED_RESOLVERS = {"oc.env", "oc.select"}
# Patterns of the OmegaConf path, compiled (and cached by `re`) when first used.
_RESOLVER_CALL = r"\$\{\s*([A-Za-z_][\w.]*)\s*:"
_ENV_CALL = r"\$\{\s*oc\.env\s*:\s*([^,}]+?)\s*\}"
# `${oc.env:NAME}` or `${oc.env:NAME,DEFAULT}` with no spaces, quotes or escapes, DEFAULT a
# path (it holds a `/`): OmegaConf's grammar reads NAME as that string and such a DEFAULT as
# its own text (a path cannot parse as a number, bool or null). The text around holds no
# `$` or `\`, so it is literal.
_PLAIN_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([A-Za-z0-9_./+@%-]*/"
                        r"[A-Za-z0-9_./+@%-]*))?\}")
_GRAMMAR_WORDS = {"true", "false", "null", "nan", "inf"}  # names that would not read as strings
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a key `_dotted` spells the same way OmegaConf reads


def _strings(value: Any, loc: Loc = ()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, loc + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, loc + (i,))
    elif isinstance(value, str):
        yield loc, value


def _plain_env_value(text: str) -> str | None:
    """`text` resolved, when it only interpolates plain `${oc.env:...}` calls whose value
    OmegaConf would return unchanged; else None (let OmegaConf resolve it)."""
    out = []
    end = 0
    for match in _PLAIN_ENV.finditer(text):
        out.append(text[end:match.start()])
        name, fallback = match.group(1), match.group(2)
        if name.lower() in _GRAMMAR_WORDS:
            return None
        value = os.environ.get(name, fallback)
        if value is None:  # unset, no default: OmegaConf words the error
            return None
        out.append(value)
        end = match.end()
    out.append(text[end:])
    literal = "".join(out[::2])
    resolved = "".join(out)
    # `$` or `\` outside the calls is grammar; `$`, `\` or `?` in a value might be read again
    # (`???` is OmegaConf's missing value).
    if "$" in literal or "\\" in literal or any(c in resolved for c in "$\\?"):
        return None
    return resolved


class _NeedsOmegaConf(Exception):
    pass


def _resolve_plain_env(doc: dict) -> dict | None:
    """`doc` resolved without OmegaConf, or None when some string needs OmegaConf."""
    def walk(node: Any, under_plain_keys: bool) -> Any:
        if isinstance(node, dict):
            return {key: walk(item, under_plain_keys and isinstance(key, str)
                              and _PLAIN_KEY.fullmatch(key) is not None)
                    for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item, under_plain_keys) for item in node]
        if isinstance(node, str) and "${" in node:
            value = _plain_env_value(node) if under_plain_keys else None
            if value is None:
                raise _NeedsOmegaConf
            return value
        return node

    try:
        return walk(doc, True)
    except _NeedsOmegaConf:
        return None


def resolve(doc: dict, positions: Positions, default: Origin) -> dict:
    """`doc` with every interpolation resolved; all problems reported together."""
    if not any("${" in text for _, text in _strings(doc)):
        return doc
    plain = _resolve_plain_env(doc)
    if plain is not None:
        return plain
    return resolve_with_omegaconf(doc, positions, default)


def resolve_with_omegaconf(doc: dict, positions: Positions, default: Origin) -> dict:
    """`resolve` through OmegaConf for every document (the reference the fast path matches)."""
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
        for name in re.findall(_RESOLVER_CALL, text):
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

    # allow_objects: YAML timestamps (dates) are not OmegaConf primitives; they pass through
    # untouched, as they do without interpolation, and the schema reports them.
    cfg = OmegaConf.create(doc, flags={"allow_objects": True})

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
    env = re.search(_ENV_CALL, text)
    if env and "not found" in message:
        return (f"environment variable {env.group(1)} is not set; set it or give a default: "
                f"${{oc.env:{env.group(1)},DEFAULT}}")
    return f"cannot resolve interpolation: {message}"
