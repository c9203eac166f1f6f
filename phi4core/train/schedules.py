"""Learning-rate schedules as pure functions of the step (so resuming needs only the step)."""

from __future__ import annotations

import math

from phi4core.config import Train


def lr_at(step: int, train: Train) -> float:
    """LR for optimizer step `step` (0-based) under the recipe's schedule.

    Every schedule warms up linearly over `warmup_steps`; then `constant` holds, `cosine` and
    `linear` decay to `min_lr` at the last step, and `wsd` (warmup-stable-decay) holds until
    the last `decay_fraction` of steps and decays linearly over them.
    """
    peak, floor = train.peak_lr, train.min_lr
    total = train.total_steps
    warmup = min(train.warmup_steps, total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    if train.schedule == "wsd":
        decay_steps = max(1, round(train.decay_fraction * (total - warmup)))
        decay_start = total - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return floor + (peak - floor) * (1.0 - progress)
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    if train.schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
