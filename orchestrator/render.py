"""The lineage drawn: stages coloured by their state in the store, with the module groups they
train and freeze; edges labelled with the artifact passed and whether it is frozen.

SVG is laid out here (one row per DAG level) rather than by Graphviz, so `phi4 graph` needs
no system package; `--format dot | dot -Tsvg` gives Graphviz's layout where it is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from xml.sax.saxutils import escape

from .config.checks import expand_groups, model_of
from .plan import BLOCKED, UP_TO_DATE, Plan
from .records import State
from .words import count

COLOURS = {
    State.SUCCEEDED: "#b7e4c7", State.RUNNING: "#a9d6f5", State.FAILED: "#f4a6a6",
    State.INTERRUPTED: "#ffd8a8", State.CANCELLED: "#ffd8a8", State.PREEMPTED: "#ffd8a8",
    State.BLOCKED: "#d9d9d9", State.STALE: "#fff3bf", State.NOT_RUN: "#ffffff",
}


@dataclass
class Node:
    name: str
    kind: str
    state: State
    level: int
    trainable: list[str]
    frozen: list[str]

    def groups_text(self) -> str:
        parts = []
        if self.trainable:
            parts.append("trains " + ", ".join(self.trainable))
        if self.frozen:
            parts.append("frozen " + ", ".join(self.frozen))
        return "; ".join(parts) or (self.kind if self.kind != "train" else "")


def node_state(plan: Plan, name: str) -> State:
    """What the store says about the stage's current fingerprint (or an older one: stale)."""
    sp = plan.stages[name]
    if sp.verdict == BLOCKED:
        return State.BLOCKED
    if sp.verdict == UP_TO_DATE:
        return State.SUCCEEDED
    state = sp.stage_dir.state() if sp.stage_dir else None
    if state not in (None, State.SUCCEEDED, State.PENDING):
        return state
    return State.STALE if state or plan.store.latest(name) else State.NOT_RUN


def nodes(plan: Plan) -> list[Node]:
    out = []
    for name in plan.graph.order:
        recipe = plan.graph.stages[name].recipe
        model = model_of(recipe)
        groups = model.module_groups if model else []
        out.append(Node(name, recipe.kind, node_state(plan, name), plan.graph.level[name],
                        sorted(expand_groups(recipe.trainable, groups)),
                        sorted(expand_groups(recipe.frozen, groups))))
    return out


def edge_label(edge) -> str:
    return edge.artifact + (" (frozen)" if edge.frozen else "")


def text(plan: Plan, title: str) -> str:
    levels = plan.graph.levels()
    lines = [f"{title}: {count(len(plan.graph.order), 'stage')} in {count(len(levels), 'level')} "
             f"(store {plan.store.root})"]
    by_name = {n.name: n for n in nodes(plan)}
    for i, names in enumerate(levels):
        lines.append(f"level {i}")
        for name in names:
            node = by_name[name]
            lines.append(f"  {name} [{node.state}]  {node.groups_text()}".rstrip())
            for e in plan.graph.inputs_of(name):
                lines.append(f"      <- {e.upstream}: {edge_label(e)}")
    return "\n".join(lines) + "\n"


def mermaid(plan: Plan) -> str:
    lines = ["flowchart TD"]
    for node in nodes(plan):
        label = "<br/>".join(x for x in (f"<b>{node.name}</b>", node.state,
                                          node.groups_text()) if x)
        lines.append(f'  {node.name}["{label}"]:::{_css(node.state)}')
    for e in plan.graph.edges:
        arrow = "-.->" if e.frozen else "-->"
        lines.append(f'  {e.upstream} {arrow}|"{edge_label(e)}"| {e.downstream}')
    for state, colour in COLOURS.items():
        lines.append(f"  classDef {_css(state)} fill:{colour},stroke:#555")
    return "\n".join(lines) + "\n"


def dot(plan: Plan, title: str) -> str:
    lines = [f"digraph {json.dumps(title)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for node in nodes(plan):
        label = "\\n".join(x for x in (node.name, node.state, node.groups_text()) if x)
        lines.append(f'  {json.dumps(node.name)} [label="{label}", '
                     f'fillcolor="{COLOURS.get(node.state, "#ffffff")}"];')
    for e in plan.graph.edges:
        style = ', style=dashed' if e.frozen else ""
        lines.append(f'  {json.dumps(e.upstream)} -> {json.dumps(e.downstream)} '
                     f'[label={json.dumps(edge_label(e))}{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


_W, _H, _GAP_X, _GAP_Y, _PAD = 300, 80, 30, 70, 20


def svg(plan: Plan, title: str) -> str:
    """Rows are DAG levels; nodes centred in their row; edges drawn as curves with labels."""
    levels = plan.graph.levels()
    widest = max((len(level) for level in levels), default=1)
    width = _PAD * 2 + widest * _W + (widest - 1) * _GAP_X
    height = _PAD * 2 + 24 + len(levels) * _H + max(0, len(levels) - 1) * _GAP_Y
    where: dict[str, tuple[float, float]] = {}
    for row, names in enumerate(levels):
        span = len(names) * _W + (len(names) - 1) * _GAP_X
        x0 = (width - span) / 2
        for col, name in enumerate(names):
            where[name] = (x0 + col * (_W + _GAP_X), _PAD + 24 + row * (_H + _GAP_Y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
           f'height="{height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
           'markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/>'
           '</marker></defs>',
           f'<text x="{_PAD}" y="{_PAD + 4}" font-size="14" font-weight="bold">'
           f'{escape(title)}</text>']
    for e in plan.graph.edges:
        (ux, uy), (dx, dy) = where[e.upstream], where[e.downstream]
        x1, y1, x2, y2 = ux + _W / 2, uy + _H, dx + _W / 2, dy
        mid = (y1 + y2) / 2
        dash = ' stroke-dasharray="5,4"' if e.frozen else ""
        out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} '
                   f'{x2:.0f},{y2:.0f}" fill="none" stroke="#555"{dash} '
                   'marker-end="url(#arrow)"/>')
        out.append(f'<text x="{(x1 + x2) / 2 + 4:.0f}" y="{mid:.0f}" fill="#333" '
                   f'font-size="10">{escape(edge_label(e))}</text>')
    for node in nodes(plan):
        x, y = where[node.name]
        fill = COLOURS.get(node.state, "#ffffff")
        out.append(f'<g><title>{escape(node.name)}: {escape(node.state)}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{_W}" height="{_H}" rx="8" '
                   f'fill="{fill}" stroke="#555"/>')
        lines = [(node.name, "bold"), (node.state, "normal")]
        if node.trainable:
            lines.append((_clip("trains " + ", ".join(node.trainable)), "normal"))
        if node.frozen:
            lines.append((_clip("frozen " + ", ".join(node.frozen)), "normal"))
        if len(lines) == 2 and node.kind != "train":
            lines.append((node.kind, "normal"))
        for i, (line, weight) in enumerate(lines):
            out.append(f'<text x="{x + _W / 2:.0f}" y="{y + 17 + i * 16:.0f}" '
                       f'text-anchor="middle" font-weight="{weight}">{escape(line)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _clip(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _css(state: str) -> str:
    return state.replace(" ", "_")


def render(plan: Plan, fmt: str, title: str) -> str:
    if fmt == "mermaid":
        return mermaid(plan)
    if fmt == "dot":
        return dot(plan, title)
    if fmt == "svg":
        return svg(plan, title)
    return text(plan, title)
