"""The learning-rate scaling law LR* = B x D^a, fitted from sweeps (Phi-4-Mini: a = -0.32).

A sweep is a CSV with a header: `tokens` and `lr` columns, and optionally `loss`. With a loss
column every row is one run and the best LR of each budget (lowest loss) is picked; without
one, each budget must have exactly one row (its best LR). A fit is refused (ConfigError, so
exit 2) rather than printed when it cannot mean anything: a non-finite or non-positive value,
fewer than two budgets, several LRs of one budget and no loss to choose, or points that do not
follow a power law (R^2 below `MIN_R2`, e.g. a raw sweep read as if every row were a best LR).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .config.errors import ConfigError, Origin, Problem
from .config.files import read_bytes

TOKEN_COLUMNS = ("tokens", "D", "d")
LR_COLUMNS = ("lr", "best_lr", "LR")
LOSS_COLUMNS = ("loss", "val_loss", "eval_loss", "final_loss")
MIN_R2 = 0.5


@dataclass
class Sweep:
    points: list[tuple[float, float]]  # (tokens, best lr), one per budget, by tokens
    runs: int  # rows read; more than len(points) when the best LR was picked by loss
    path: str = ""


@dataclass
class Fit:
    B: float
    exponent: float
    r2: float
    points: list[tuple[float, float]]  # (tokens, lr)
    fixed_exponent: bool

    def predict(self, tokens: float) -> float:
        return self.B * tokens**self.exponent


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    return next((header.index(c) for c in names if c in header), None)


def read_sweep(path: Path) -> Sweep:
    """One (tokens, best lr) point per budget from a sweep CSV; see the module docstring."""
    file = str(path)
    try:
        text = read_bytes(path, expected="a CSV file").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError.single(Origin(file), (), "not UTF-8 text, expected a CSV file") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise ConfigError.single(Origin(file, 1), (), "file is empty")
    header = [h.strip() for h in rows[0]]
    tok, lr, loss = (_column(header, TOKEN_COLUMNS), _column(header, LR_COLUMNS),
                     _column(header, LOSS_COLUMNS))
    if tok is None or lr is None:
        raise ConfigError.single(Origin(file, 1), ("header",),
                                 "needs a 'tokens' column and an 'lr' (or 'best_lr') column, "
                                 "and a 'loss' column for a sweep of several LRs per budget",
                                 header)
    runs: dict[float, list[tuple[float, float, int]]] = {}  # tokens -> (loss, lr, line)
    count = 0
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [tok, lr] + ([loss] if loss is not None else [])
        try:
            values = [float(row[i]) for i in cells]
        except (ValueError, IndexError):
            raise ConfigError.single(Origin(file, line), ("row",),
                                     f"expected {len(cells)} numbers", row) from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError.single(Origin(file, line), ("row",), "not a finite number", row)
        d, rate = values[0], values[1]
        if d <= 0 or rate <= 0:
            raise ConfigError.single(Origin(file, line), ("row",),
                                     "tokens and lr must be positive", row)
        runs.setdefault(d, []).append((values[2] if loss is not None else 0.0, rate, line))
        count += 1
    if loss is None:
        several = [(d, rs) for d, rs in runs.items() if len(rs) > 1]
        if several:
            d, rs = several[0]
            lines = ", ".join(str(r[2]) for r in rs)
            raise ConfigError.single(
                Origin(file, rs[1][2]), ("row",),
                f"{len(rs)} rows for the budget {d:g} tokens (lines {lines}) and no 'loss' "
                "column to pick the best LR", hint="add the runs' final loss as a 'loss' "
                "column, or keep only the best LR of each budget")
    if len(runs) < 2:
        raise ConfigError.single(Origin(file), ("tokens",),
                                 f"need rows at two or more token budgets (got {len(runs)})",
                                 hint="the law relates the best LR to the budget: sweep at "
                                      "least two budgets")
    points = [(d, min(rs)[1]) for d, rs in sorted(runs.items())]
    return Sweep(points, count, file)


def fit(sweep: Sweep | list[tuple[float, float]], exponent: float | None = None,
        min_r2: float = MIN_R2) -> Fit:
    """Least squares of log lr = log B + a log D; with `exponent` given, only B is fitted.
    Refuses a fit whose R^2 is below `min_r2` or whose B is not a finite positive number."""
    if not isinstance(sweep, Sweep):
        sweep = Sweep(list(sweep), len(sweep))
    points = sweep.points
    xs = [math.log(d) for d, _ in points]
    ys = [math.log(lr) for _, lr in points]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    origin = Origin(sweep.path or "<sweep>")
    if sxx == 0:
        raise ConfigError.single(origin, ("tokens",), "need rows at two or more token budgets")
    if exponent is None:
        a = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    else:
        a = exponent
    log_b = mean_y - a * mean_x
    ss_res = sum((y - (log_b + a * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-12 else 0.0)
    problems = []
    if r2 < min_r2:
        problems.append(Problem(origin, ("fit",), f"the best LRs do not follow a power law of the "
                                            f"budget (R^2 = {r2:.3f} < {min_r2})",
                                hint="is this a raw sweep? add a 'loss' column so the best LR "
                                     "of each budget is picked (or pass --min-r2)"))
    if not -700 < log_b < 700:
        problems.append(Problem(origin, ("fit",), f"the fitted B = e^{log_b:.4g} is not a usable "
                                            "number"))
    if problems:
        raise ConfigError(problems)
    return Fit(math.exp(log_b), a, r2, points, exponent is not None)
