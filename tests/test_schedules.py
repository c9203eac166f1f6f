"""LR schedules and the scaling law: pure functions of the step."""

from __future__ import annotations

import math

import pytest

from phi4core.config import Train
from phi4core.train.schedules import lr_at


def make(schedule: str, **kw) -> Train:
    base = dict(steps=100, global_batch_size=4, seq_length=8, lr=1.0, min_lr=0.1,
                warmup_steps=10, schedule=schedule)
    return Train(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd", "linear"])
def test_warmup_is_linear_to_the_peak(schedule: str) -> None:
    t = make(schedule)
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_shapes_after_warmup() -> None:
    assert lr_at(99, make("constant")) == 1.0
    cos = make("cosine")
    assert lr_at(10, cos) == pytest.approx(1.0) and lr_at(99, cos) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * (int(mid) - 10) / 89)))
    lin = make("linear")
    assert lr_at(99, lin) == pytest.approx(0.1)
    wsd = make("wsd", decay_fraction=0.2)  # 18 decay steps: stable until step 82
    assert lr_at(81, wsd) == 1.0 and lr_at(99, wsd) == pytest.approx(0.1)
    assert 0.1 < lr_at(90, wsd) < 1.0


def test_monotone_decay() -> None:
    for schedule in ("cosine", "linear", "wsd"):
        values = [lr_at(s, make(schedule)) for s in range(10, 100)]
        assert all(a >= b for a, b in zip(values, values[1:])), schedule


def test_scaling_law_peak_from_token_budget() -> None:
    t = Train(tokens=5e12, global_batch_size=64, seq_length=131072,
              lr={"scaling_law": {"B": 4.9, "exponent": -0.32}})
    assert t.peak_lr == pytest.approx(4.9 * 5e12 ** -0.32)
    assert t.total_steps == math.ceil(5e12 / (64 * 131072))
    assert lr_at(t.total_steps - 1, t) >= 0.0
