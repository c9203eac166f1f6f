"""A plan for people (`phi4 plan`, `phi4 run --dry-run`) and for programs (`--format json`)."""

from __future__ import annotations

import shlex
from typing import Any

from .plan import BLOCKED, RUN, SKIP, UP_TO_DATE, Plan
from .words import count


def plan_json(plan: Plan, source: str) -> dict[str, Any]:
    stages = []
    for name, sp in plan.stages.items():
        stages.append({
            "name": name, "kind": sp.loaded.recipe.kind, "verdict": sp.verdict,
            "reasons": sp.reasons, "selected": sp.selected, "fingerprint": sp.fingerprint,
            "inputs": {k: {"source": i.source, "path": i.path, "stage": i.stage,
                           "artifact": i.artifact, "frozen": i.frozen,
                           "fingerprint": i.fingerprint} for k, i in sp.inputs.items()},
            "command": sp.command, "command_text": shlex.join(sp.command) if sp.command else None,
            "env": dict(sp.env),
            "stage_dir": str(sp.stage_dir.path) if sp.stage_dir else None,
        })
    return {"source": source, "store": str(plan.store.root), "stages": stages,
            "summary": summary(plan)}


def summary(plan: Plan) -> dict[str, int]:
    return {v: plan.count(v) for v in (RUN, UP_TO_DATE, BLOCKED, SKIP)}


def plan_text(plan: Plan, title: str) -> str:
    lines = [f"{title}: {count(len(plan.stages), 'stage')}, store {plan.store.root}"]
    for name, sp in plan.stages.items():
        fp = f"  {sp.fingerprint}" if sp.fingerprint else ""
        lines.append(f"{sp.verdict:>12}  {name}{fp}")
        for reason in sp.reasons:
            lines.append(f"{'':>14}why: {reason}")
        for input_name, inp in sp.inputs.items():
            origin = f"{inp.stage}.{inp.artifact}" if inp.source == "stage" else inp.source
            frozen = " (frozen)" if inp.frozen else ""
            lines.append(f"{'':>14}input {input_name} <- {origin}{frozen}: {inp.path}")
        if sp.command:
            lines.append(f"{'':>14}$ {shlex.join(sp.command)}")
    counts = summary(plan)
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items() if n or v != SKIP))
    return "\n".join(lines) + "\n"
