"""Problems found in configuration, each tied to where it came from (file:line or --set)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file and 1-based line, or a command-line override."""

    file: str
    line: int = 0
    override: str | None = None  # the flag, e.g. `--set key=value`, when it came from one

    def __str__(self) -> str:
        if self.override is not None:
            return _shorten(self.override)
        file = _shorten(self.file)
        return f"{file}:{self.line}" if self.line else file


def _shorten(text: str, limit: int = 240) -> str:
    """An absurdly long path or flag stays one readable line: its start and its end."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 3:]}"


# Origins of every key path of one document (a recipe after extends/profile/overrides).
Positions = dict[Loc, Origin]


def origin_of(positions: Positions, loc: Loc, default: Origin) -> Origin:
    """The origin of `loc`, else of its nearest parent that has one."""
    for cut in range(len(loc), -1, -1):
        found = positions.get(tuple(loc[:cut]))
        if found is not None:
            return found
    return default


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_NOTHING = object()


@dataclass(frozen=True)
class Problem:
    origin: Origin
    loc: Loc
    message: str
    got: Any = _NOTHING
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.origin}: {format_loc(self.loc)}: {self.message}"
        if self.got is not _NOTHING:
            text += f" (got {short_repr(self.got)})"
        if self.hint:
            text += f"; {self.hint}"
        return text


@dataclass
class ConfigError(Exception):
    """One or more problems; the CLI prints one line each and exits 2."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    @classmethod
    def single(cls, origin: Origin, loc: Loc, message: str, got: Any = _NOTHING,
               hint: str | None = None) -> ConfigError:
        return cls([Problem(origin, loc, message, got, hint)])


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    import difflib  # only on the error path: start-up stays light

    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None
