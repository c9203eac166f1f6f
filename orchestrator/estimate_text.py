"""The estimator's words: `phi4 plan --estimate | --suggest` and the does-not-fit error."""

from __future__ import annotations

from .config import ConfigError, LoadedRecipe, Problem
from .estimate import USABLE_FRACTION, Estimate, Layout, closest_fits, estimate


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                           (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def estimate_lines(est: Estimate) -> list[str]:
    p = est.params
    where = (f"{est.gpu.name}, {est.world_size} GPUs" if est.gpu
             else f"{est.world_size} CPU process{'es' if est.world_size != 1 else ''}")
    lines = [f"{est.stage}  ({where}; {est.layout.text()}; dp={est.data_parallel}, "
             f"{est.micro_batches} micro-batches/step)",
             f"  parameters  {p['total']:,} total, {p['trainable']:,} trainable, "
             f"{p['frozen']:,} frozen"]
    terms = ", ".join(f"{k} {gib(v)}" for k, v in est.memory.items())
    lines.append(f"  memory/GPU  {gib(est.peak_bytes)} = {terms}")
    if est.capacity is not None:
        verdict = "fits" if est.fits else "DOES NOT FIT"
        lines.append(f"              {verdict} in {gib(est.capacity)} usable "
                     f"({USABLE_FRACTION:.0%} of {est.gpu.memory / 1e9:.0f} GB)")
    lines.append(f"  compute     {si(est.flops_per_step, 'FLOP')}/step"
                 + (f" ({si(est.executed_flops_per_step, 'FLOP')} with recomputation)"
                    if est.executed_flops_per_step != est.flops_per_step else ""))
    if est.gpu:
        lines.append(f"  time        {est.step_time_s:.3g} s/step, {si(est.tokens_per_s)} "
                     f"tokens/s at {est.mfu:.0%} MFU; {est.total_steps:,} steps = "
                     f"{est.gpu_hours:,.0f} GPU-hours")
    lines += [f"  note        {n}" for n in est.notes]
    return lines


def suggest_lines(stage: str, base: Layout, found: list[Estimate], prefix: str | None
                  ) -> list[str]:
    if not found:
        return [f"{stage}: no layout within its resources fits"]
    where = found[0].gpu.name if found[0].gpu else "CPU"
    lines = [f"{stage}: the {len(found)} fastest layouts that fit ({where})"]
    for i, est in enumerate(found, 1):
        sets = " ".join(est.layout.overrides(base, prefix)) or "(the recipe's own)"
        lines.append(f"  {i}. {est.layout.text():42s} {gib(est.peak_bytes):>10s}  "
                     f"{si(est.tokens_per_s)} tokens/s")
        lines.append(f"     {sets}")
    return lines


def fit_problem(loaded: LoadedRecipe, est: Estimate, prefix: str | None, mfu: float
                ) -> Problem:
    """A stage that does not fit: the biggest terms, and the overrides that would fit."""
    biggest = ", ".join(f"{k} {gib(v)}" for k, v in est.biggest())
    fixes = closest_fits(loaded.recipe, est.gpu.name, mfu)
    if fixes:
        hint = "would fit with " + "; or ".join(
            f"{' '.join(f.layout.overrides(est.layout, prefix))} ({gib(f.peak_bytes)})"
            for f in fixes)
    else:
        hint = "no layout within its resources fits: add nodes or a bigger GPU (--gpu)"
    return Problem(loaded.origin(("parallel",)), ("parallel",),
                   f"stage {est.stage} needs {gib(est.peak_bytes)} per GPU, more than the "
                   f"{gib(est.capacity)} usable on a {est.gpu.name} (biggest: {biggest})",
                   hint=hint)


def check_fit(stages: dict[str, LoadedRecipe], names: list[str], gpu: str, mfu: float,
              pipeline: bool) -> None:
    """Raise ConfigError (exit 2) naming every train stage among `names` that does not fit."""
    problems = []
    for name in names:
        loaded = stages.get(name)
        if loaded is None or loaded.recipe.kind != "train":
            continue
        est = estimate(loaded.recipe, gpu, mfu)
        if not est.fits:
            problems.append(fit_problem(loaded, est, name if pipeline else None, mfu))
    if problems:
        raise ConfigError(problems)
