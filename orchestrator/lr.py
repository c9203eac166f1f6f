"""The learning-rate scaling law LR* = B x D^a, fitted from sweeps (Phi-4-Mini: a = -0.32)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .config.errors import ConfigError, Origin

TOKEN_COLUMNS = ("tokens", "D", "d")
LR_COLUMNS = ("lr", "best_lr", "LR")


@dataclass
class Fit:
    B: float
    exponent: float
    r2: float
    points: list[tuple[float, float]]  # (tokens, lr)
    fixed_exponent: bool

    def predict(self, tokens: float) -> float:
        return self.B * tokens**self.exponent


def read_sweep(path: Path) -> list[tuple[float, float]]:
    """(tokens, best lr) rows from a CSV with a header naming both columns."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.single(Origin(file), (), "file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise ConfigError.single(Origin(file), (), "not a CSV text file") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise ConfigError.single(Origin(file, 1), (), "file is empty")
    header = [h.strip() for h in rows[0]]
    tok = next((header.index(c) for c in TOKEN_COLUMNS if c in header), None)
    lr = next((header.index(c) for c in LR_COLUMNS if c in header), None)
    if tok is None or lr is None:
        raise ConfigError.single(Origin(file, 1), ("header",),
                                 "needs a 'tokens' column and an 'lr' (or 'best_lr') column",
                                 header)
    points = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            d, best = float(row[tok]), float(row[lr])
        except (ValueError, IndexError):
            raise ConfigError.single(Origin(file, line), ("row",), "expected two numbers",
                                     row) from None
        if d <= 0 or best <= 0:
            raise ConfigError.single(Origin(file, line), ("row",),
                                     "tokens and lr must be positive", row)
        points.append((d, best))
    if len({d for d, _ in points}) < 2:
        raise ConfigError.single(Origin(file), (), "need rows at two or more token budgets",
                                 len(points))
    return points


def fit(points: list[tuple[float, float]], exponent: float | None = None) -> Fit:
    """Least squares of log lr = log B + a log D; with `exponent` given, only B is fitted."""
    xs = [math.log(d) for d, _ in points]
    ys = [math.log(lr) for _, lr in points]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    if exponent is None:
        sxx = sum((x - mean_x) ** 2 for x in xs)
        a = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    else:
        a = exponent
    log_b = mean_y - a * mean_x
    ss_res = sum((y - (log_b + a * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(math.exp(log_b), a, r2, points, exponent is not None)
