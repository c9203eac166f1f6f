"""A plan for people (`phi4 plan`, `phi4 run --dry-run`) and for programs (`--format json`)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from .plan import BLOCKED, RUN, SKIP, UP_TO_DATE, Plan, StagePlan
from .shell import shell_words
from .words import count

if TYPE_CHECKING:
    from .executors.base import Executor


def plan_json(plan: Plan, source: str, executor: Executor | None = None) -> dict[str, Any]:
    """`command`: what the stage's processes run, laid out by `executor` (default: here);
    `launch`: how the executor starts them (see Executor.launch_lines)."""
    stages = []
    for name, sp in plan.stages.items():
        command = (executor.command(name) if executor else sp.command) if sp.stage_dir else []
        stages.append({
            "name": name, "kind": sp.loaded.recipe.kind, "verdict": sp.verdict,
            "reasons": sp.reasons, "selected": sp.selected, "fingerprint": sp.fingerprint,
            "inputs": {k: {"source": i.source, "path": i.path, "stage": i.stage,
                           "artifact": i.artifact, "frozen": i.frozen,
                           "fingerprint": i.fingerprint} for k, i in sp.inputs.items()},
            "command": command, "command_text": shell_words(command) if command else None,
            "launch": _launch(sp, executor),
            "env": dict(sp.env),
            "stage_dir": str(sp.stage_dir.path) if sp.stage_dir else None,
        })
    return {"source": source, "store": str(plan.store.root),
            "executor": executor.name if executor else "local", "stages": stages,
            "summary": summary(plan),
            "absent_data": list(dict.fromkeys(str(p) for p in plan.absent_data))}


def _launch(sp: StagePlan, executor: Executor | None) -> list[str]:
    if sp.stage_dir is None:
        return []
    return executor.launch_lines(sp.name) if executor else [shlex.join(sp.command)]


def summary(plan: Plan) -> dict[str, int]:
    return {v: plan.count(v) for v in (RUN, UP_TO_DATE, BLOCKED, SKIP)}


def plan_text(plan: Plan, title: str, executor: Executor | None = None) -> str:
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
        for i, line in enumerate(_launch(sp, executor) if sp.command else []):
            lines.append(f"{'':>14}{'$ ' if i == 0 else '  '}{line}")
    counts = summary(plan)
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items() if n or v != SKIP))
    return "\n".join(lines) + "\n"
