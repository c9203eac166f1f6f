"""`phi4 metrics`: many attempts as a table (text, JSON, CSV), their curves on one figure, or
compact curves in the terminal. Torch-free; matplotlib is imported only to draw a file."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .runs import Attempt, Summary, summarize

# What a figure draws, one panel each: (metrics.jsonl key, panel title, log scale).
CURVES = (("loss", "loss", False), ("lr", "learning rate", False),
          ("grad_norm", "gradient norm", True), ("tokens_per_s", "tokens/s", False))
COLUMNS = ("stage", "fingerprint", "attempt", "state", "steps", "final_loss", "best_loss",
           "tokens_per_s", "peak_mem_mb", "duration_s")
_BARS = "▁▂▃▄▅▆▇█"


class PlotError(Exception):
    """The figure cannot be drawn (matplotlib missing, an unknown format): exit 2."""


def series(attempt: Attempt, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; steps whose value is not a finite number are left out
    (a skipped step's loss is logged as null)."""
    steps, values = [], []
    for record in attempt.records():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def rows(attempts: list[Attempt]) -> list[Summary]:
    return [summarize(a) for a in attempts]


def table_text(summaries: list[Summary]) -> list[str]:
    head = ("STAGE", "FINGERPRINT", "TRY", "STATE", "STEPS", "LOSS", "BEST", "TOK/S", "MEM MB",
            "TIME S", "EVALUATIONS")
    table = [head]
    for s in summaries:
        evals = ", ".join(f"{k} {_num(v, '{:.4g}')}" for k, v in s.evaluations.items())
        table.append((s.stage, s.fingerprint, str(s.attempt), s.state or "-",
                      _num(s.steps, "{}"), _num(s.final_loss, "{:.4f}"),
                      _num(s.best_loss, "{:.4f}"), _num(s.tokens_per_s, "{:.0f}"),
                      _num(s.peak_mem_mb, "{:.0f}"), _num(s.duration_s, "{:.1f}"),
                      evals or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table]


def table_csv(summaries: list[Summary]) -> str:
    evals = sorted({k for s in summaries for k in s.evaluations})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *(f"eval:{k}" for k in evals)])
    for s in summaries:
        data = s.as_json()
        writer.writerow([_csv(data[c]) for c in COLUMNS]
                        + [_csv(s.evaluations.get(k)) for k in evals])
    return out.getvalue()


def _csv(value: object) -> str:
    return "" if value is None else str(value)


def _num(value: object, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def sparkline(values: list[float], width: int = 40) -> str:
    """A curve in one line of block characters: `width` buckets, each its mean value."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        chunk = values[i * len(values) // buckets:(i + 1) * len(values) // buckets]
        means.append(sum(chunk) / len(chunk))
    lo, hi = min(means), max(means)
    span = hi - lo or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((m - lo) / span * len(_BARS)))]
                   for m in means)


def terminal_curves(attempts: list[Attempt], key: str = "loss") -> list[str]:
    """One line per attempt: its label, the curve, first -> last value (a shared scale is not
    kept: each line shows its own shape; the numbers give the levels)."""
    labels = [a.label for a in attempts]
    width = max((len(label) for label in labels), default=0)
    lines = [f"{key}:"]
    for attempt, label in zip(attempts, labels):
        _, values = series(attempt, key)
        if not values:
            lines.append(f"  {label.ljust(width)}  (nothing logged)")
            continue
        lines.append(f"  {label.ljust(width)}  {sparkline(values)}  "
                     f"{values[0]:.4g} -> {values[-1]:.4g} (min {min(values):.4g})")
    return lines


def legend_labels(attempts: list[Attempt], most: int = 2) -> list[str]:
    """Each attempt's label, with the fields that set it apart from the others (`train.lr=
    0.001`): up to `most` of the fingerprinted fields whose values differ among them."""
    from .compare import folder_fields, group_of

    fields = {a.folder.path: folder_fields(a.folder) for a in attempts}
    keys = sorted({k for f in fields.values() for k in f if group_of(k) == "field"})
    differing = [k for k in keys if len({repr(f.get(k)) for f in fields.values()}) > 1]
    labels = []
    for attempt in attempts:
        own = fields[attempt.folder.path]
        shown = ", ".join(f"{k}={own.get(k)}" for k in differing[:most])
        labels.append(f"{attempt.label} {shown}".strip())
    return labels


def figure(attempts: list[Attempt]):
    """A matplotlib Figure: one panel per CURVES entry, one line per attempt (its label and
    the fields that set it apart)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("drawing a figure needs matplotlib: pip install 'phi4[plot]'") \
            from None
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    labels = legend_labels(attempts)
    for ax, (key, title, log) in zip(axes, CURVES):
        drawn = False
        for attempt, label in zip(attempts, labels):
            steps, values = series(attempt, key)
            if values:
                ax.plot(steps, values, label=label, linewidth=1.2)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log and drawn and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
                   fontsize="small")
    return fig


def save_figure(fig, path: Path) -> None:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("png", "svg", "pdf"):
        raise PlotError(f"--plot {path}: give a file ending in .png, .svg or .pdf")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=suffix, dpi=110)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"cannot write {path}: {err.strerror or err}") from None
