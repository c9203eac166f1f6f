"""What differs between two attempts: settings, inputs, data and results, side by side.

Used by `phi4 diff` and meant for any other view of two runs (an HTML report): the field diff
works on flat `key -> value` mappings, as `fields.json` holds them, and carries for each side
where the value came from when that is known. A stage folder's `provenance.json` (a flat
`key -> "file:line"` mapping, written where the loader records provenance) gives those
sources; a key without its own entry takes the nearest parent's (`train` for `train.lr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fingerprint import flatten
from .runs import Attempt, Summary, summarize
from .store import StageDir, read_json

# spec.json keys that change how a run is done or reported, never its result (so they are
# not in fields.json): shown as settings, never as a cause of a different result.
SETTINGS = ("logging.", "world_size", "data.num_workers", "train.max_skipped_steps")
GROUPS = ("field", "input", "data", "setting")
PROVENANCE_FILE = "provenance.json"


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


MISSING: Any = _Missing()  # a key one side does not have


@dataclass(frozen=True)
class FieldChange:
    key: str
    a: Any  # MISSING when only B has it
    b: Any
    group: str  # one of GROUPS
    source_a: str | None = None
    source_b: str | None = None


def group_of(key: str) -> str:
    if key.startswith("inputs."):
        return "input"
    if key.startswith(("data.", "tokenizer")):
        return "data"
    if key.startswith(SETTINGS):
        return "setting"
    return "field"


def source_of(sources: dict[str, str] | None, key: str) -> str | None:
    """The recorded source of `key`, or of its nearest parent key."""
    if not sources:
        return None
    probe = key
    while probe:
        if probe in sources:
            return str(sources[probe])
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return None


def field_changes(a: dict[str, Any], b: dict[str, Any],
                  sources_a: dict[str, str] | None = None,
                  sources_b: dict[str, str] | None = None) -> list[FieldChange]:
    """Every key whose value differs (or that only one side has), grouped, then by key."""
    changes = []
    for key in set(a) | set(b):
        left, right = a.get(key, MISSING), b.get(key, MISSING)
        if left == right and type(left) is type(right):
            continue
        changes.append(FieldChange(key, left, right, group_of(key), source_of(sources_a, key),
                                   source_of(sources_b, key)))
    # A section one side leaves out (`logging.wandb: null`) shows as its keys the other sets.
    keys = {c.key for c in changes}
    changes = [c for c in changes
               if not (_empty(c.a) and _empty(c.b)
                       and any(k.startswith(c.key + ".") for k in keys))]
    return sorted(changes, key=lambda c: (GROUPS.index(c.group), c.key))


def _empty(value: Any) -> bool:
    return value is None or value is MISSING


def folder_fields(folder: StageDir) -> dict[str, Any]:
    """fields.json, plus the settings of spec.json that the fingerprint leaves out."""
    fields = folder.fields() or {}
    spec = read_json(folder.spec_file)
    settings = {k: v for k, v in flatten(spec).items() if k.startswith(SETTINGS)} \
        if isinstance(spec, dict) else {}
    return {**settings, **fields}


def folder_sources(folder: StageDir) -> dict[str, str] | None:
    data = read_json(folder.path / PROVENANCE_FILE)
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None


@dataclass
class Comparison:
    a: Attempt
    b: Attempt
    changes: list[FieldChange]
    summary_a: Summary
    summary_b: Summary

    @property
    def same_fingerprint(self) -> bool:
        return self.a.folder == self.b.folder


def compare(a: Attempt, b: Attempt) -> Comparison:
    changes = field_changes(folder_fields(a.folder), folder_fields(b.folder),
                            folder_sources(a.folder), folder_sources(b.folder))
    return Comparison(a, b, changes, summarize(a), summarize(b))


# Results side by side: (row name, Summary attribute, format, lower is better).
RESULT_ROWS = (
    ("state", "state", "{}", None),
    ("steps", "steps", "{}", None),
    ("final loss", "final_loss", "{:.4f}", True),
    ("best loss", "best_loss", "{:.4f}", True),
    ("tokens/s", "tokens_per_s", "{:.0f}", False),
    ("peak memory MB", "peak_mem_mb", "{:.0f}", True),
    ("duration s", "duration_s", "{:.1f}", True),
)


def result_rows(a: Summary, b: Summary) -> list[tuple[str, Any, Any]]:
    """(name, A, B) for every result either side has: the RESULT_ROWS, then evaluations."""
    rows = [(name, getattr(a, attr), getattr(b, attr)) for name, attr, _, _ in RESULT_ROWS]
    for name in sorted(set(a.evaluations) | set(b.evaluations)):
        rows.append((f"eval {name}", a.evaluations.get(name), b.evaluations.get(name)))
    return [row for row in rows if row[1] is not None or row[2] is not None]


def show_value(value: Any) -> str:
    import json

    if value is MISSING:
        return "(unset)"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 48 else text[:45] + "..."


def diff_text(c: Comparison) -> list[str]:
    """The human view: a header per side, changed fields by group, results side by side."""
    lines = [f"A  {c.a.stage} {c.a.fingerprint} attempt {c.a.number}  ({c.a.folder.path})",
             f"B  {c.b.stage} {c.b.fingerprint} attempt {c.b.number}  ({c.b.folder.path})"]
    titles = {"field": "fields", "input": "inputs", "data": "data",
              "setting": "settings (not fingerprinted)"}
    if c.same_fingerprint:
        lines.append("same fingerprint: the same fields, inputs and data")
    elif not c.changes:
        lines.append("no field differs")
    for group in GROUPS:
        rows = [ch for ch in c.changes if ch.group == group]
        if not rows:
            continue
        lines.append("")
        lines.append(f"{titles[group]}:")
        for ch in rows:
            line = f"  {ch.key}: {show_value(ch.a)} -> {show_value(ch.b)}"
            if ch.source_a or ch.source_b:
                line += f"   (A: {ch.source_a or '?'}; B: {ch.source_b or '?'})"
            lines.append(line)
    results = result_rows(c.summary_a, c.summary_b)
    if results:
        lines.append("")
        table = [("results", "A", "B", "B-A")]
        formats = {name: fmt for name, _, fmt, _ in RESULT_ROWS}
        for name, left, right in results:
            fmt = formats.get(name, "{:.4g}")
            delta = ""
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) \
                    and name not in ("state",):
                delta = f"{right - left:+.4g}"
            table.append((name, _fmt(fmt, left), _fmt(fmt, right), delta))
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                  for r in table]
    return lines


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def diff_json(c: Comparison) -> dict:
    def side(x: Attempt) -> dict:
        return {"stage": x.stage, "fingerprint": x.fingerprint, "attempt": x.number,
                "path": str(x.folder.path)}

    def value(v: Any) -> Any:
        return None if v is MISSING else v

    return {
        "a": side(c.a), "b": side(c.b), "same_fingerprint": c.same_fingerprint,
        "changes": [{"key": ch.key, "group": ch.group, "a": value(ch.a), "b": value(ch.b),
                     "a_unset": ch.a is MISSING, "b_unset": ch.b is MISSING,
                     "source_a": ch.source_a, "source_b": ch.source_b} for ch in c.changes],
        "results": {"a": c.summary_a.as_json(), "b": c.summary_b.as_json()},
    }
