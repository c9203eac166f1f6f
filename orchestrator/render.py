"""The lineage drawn: stages coloured by their state in the store, with the module groups they
train and freeze; edges labelled with the artifact passed and whether it is frozen.

SVG (and the HTML report, which embeds it) is laid out by grandalf's layered (Sugiyama)
layout, in orchestrator/layout.py: pure Python, no system package; `--format dot | dot -Tsvg`
gives Graphviz's own layout where it is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from xml.sax.saxutils import escape

from .config.checks import expand_groups, model_of
from .layout import Drawing
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


_CHAR_W, _LINE_H, _BOX_PAD = 7.2, 16, 12  # 12px Helvetica: a generous average width


def _node_lines(node: Node) -> list[tuple[str, str]]:
    lines = [(node.name, "bold"), (node.state, "normal")]
    if node.trainable:
        lines.append((_clip("trains " + ", ".join(node.trainable)), "normal"))
    if node.frozen:
        lines.append((_clip("frozen " + ", ".join(node.frozen)), "normal"))
    if len(lines) == 2 and node.kind != "train":  # command, eval, export
        lines.append((node.kind, "normal"))
    return lines


def _text_size(lines: list[str], font: float = 12) -> tuple[float, float]:
    width = max(len(line) for line in lines) * _CHAR_W * font / 12 + 2 * _BOX_PAD
    return width, len(lines) * _LINE_H * font / 12 + _BOX_PAD


def drawing(plan: Plan) -> tuple[list[Node], Drawing]:
    """The nodes and their layered layout (orchestrator/layout.py)."""
    from .layout import layered

    all_nodes = nodes(plan)
    sizes = {n.name: _text_size([line for line, _ in _node_lines(n)]) for n in all_nodes}
    edges = [(e.upstream, e.downstream, _text_size([edge_label(e)], 10))
             for e in plan.graph.edges if e.upstream in sizes]
    return all_nodes, layered(sizes, edges, top=24)


def svg(plan: Plan, title: str, link_nodes: bool = False) -> str:
    """The layered layout as SVG: stage boxes coloured by state, edges as polylines through
    their own slots, labels in boxes of their own (`link_nodes`: each box links to
    #stage-NAME, for the HTML report)."""
    all_nodes, d = drawing(plan)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{d.width:.0f}" '
           f'height="{d.height:.0f}" viewBox="0 0 {d.width:.0f} {d.height:.0f}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
           'markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/>'
           '</marker></defs>',
           f'<text x="20" y="24" font-size="14" font-weight="bold">{escape(title)}</text>']
    graph_edges = [e for e in plan.graph.edges if e.upstream in d.nodes]
    for e, route, label in zip(graph_edges, d.routes, d.labels):
        dash = ' stroke-dasharray="5,4"' if e.frozen else ""
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in route)
        out.append(f'<polyline class="edge" data-from="{escape(e.upstream)}" '
                   f'data-to="{escape(e.downstream)}" points="{points}" fill="none" '
                   f'stroke="#555"{dash} marker-end="url(#arrow)"/>')
        if label is not None:
            out.append(f'<g class="edge-label"><rect x="{label.x:.1f}" y="{label.y:.1f}" '
                       f'width="{label.w:.1f}" height="{label.h:.1f}" fill="#fff"/>'
                       f'<text x="{label.cx:.1f}" y="{label.cy + 3.5:.1f}" '
                       f'text-anchor="middle" fill="#333" font-size="10">'
                       f'{escape(edge_label(e))}</text></g>')
    for node in all_nodes:
        box = d.nodes[node.name]
        fill = COLOURS.get(node.state, "#ffffff")
        group = (f'<a href="#stage-{escape(node.name)}">' if link_nodes else "") + \
            f'<g class="node" data-stage="{escape(node.name)}" data-state="{escape(node.state)}">'
        out.append(f'{group}<title>{escape(node.name)}: {escape(node.state)}</title>'
                   f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" '
                   f'height="{box.h:.1f}" rx="8" fill="{fill}" stroke="#555"/>')
        for i, (line, weight) in enumerate(_node_lines(node)):
            out.append(f'<text x="{box.cx:.1f}" y="{box.y + _BOX_PAD / 2 + 12 + i * _LINE_H:.1f}" '
                       f'text-anchor="middle" font-weight="{weight}">{escape(line)}</text>')
        out.append("</g></a>" if link_nodes else "</g>")
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
