"""A layered drawing of the stage DAG: boxes, edge routes and edge-label boxes in pixels.

grandalf's Sugiyama layout places the boxes (layers, crossing reduction, coordinates). Each
edge label is laid out as a box of its own on a layer between the edge's ends, so no label
can overlap a stage or another label; an edge spanning several layers goes through grandalf's
dummy slots, and its route crosses every layer vertically inside its own slot, so no edge runs
through a stage box. The SVG output and the HTML report both draw from this layout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

PAD = 20.0
X_SPACE = 30.0
Y_SPACE = 28.0


@dataclass(frozen=True)
class Box:
    x: float  # left
    y: float  # top
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2


@dataclass
class Drawing:
    nodes: dict[str, Box]
    routes: list[list[tuple[float, float]]]  # per edge, in the order given
    labels: list[Box | None]  # per edge (None: unlabelled)
    width: float
    height: float
    extra: dict = field(default_factory=dict)


def _grandalf():
    """Grandalf's graph and Sugiyama layout, imported with numpy hidden unless something loaded
    it already: the layout is pure Python (grandalf falls back to its own small linear algebra
    without numpy), and `phi4 graph` stays free of heavy imports (tests/test_cli_light.py)."""
    hide = "numpy" not in sys.modules
    if hide:
        sys.modules["numpy"] = None  # type: ignore[assignment]  # `import numpy` fails
    try:
        from grandalf.graphs import Edge, Graph, Vertex
        from grandalf.layouts import SugiyamaLayout
    finally:
        if hide:
            del sys.modules["numpy"]
    return Edge, Graph, Vertex, SugiyamaLayout


class _View:
    def __init__(self, w: float, h: float) -> None:
        self.w, self.h = w, h
        self.xy = (0.0, 0.0)


class _EdgeView:
    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def setpath(self, points) -> None:
        self.points = [tuple(p) for p in points]


def layered(nodes: dict[str, tuple[float, float]],
            edges: list[tuple[str, str, tuple[float, float] | None]], top: float = 0.0
            ) -> Drawing:
    """`nodes`: name -> (width, height); `edges`: (upstream, downstream, label size or None).
    Components are laid out side by side; `top` leaves room above (a title)."""
    Edge, Graph, Vertex, SugiyamaLayout = _grandalf()
    vertex = {name: Vertex(name) for name in nodes}
    for name, v in vertex.items():
        v.view = _View(*nodes[name])
    legs: list[list] = []  # per edge: its grandalf edges, in order
    label_vertex: list = []
    g_edges = []
    for i, (up, down, size) in enumerate(edges):
        if size is None:
            e = Edge(vertex[up], vertex[down])
            e.view = _EdgeView()
            legs.append([e])
            label_vertex.append(None)
            g_edges.append(e)
            continue
        lv = Vertex(("label", i))
        lv.view = _View(*size)
        a, b = Edge(vertex[up], lv), Edge(lv, vertex[down])
        a.view, b.view = _EdgeView(), _EdgeView()
        legs.append([a, b])
        label_vertex.append(lv)
        g_edges += [a, b]
    every = list(vertex.values()) + [v for v in label_vertex if v is not None]
    graph = Graph(every, g_edges)
    offset = PAD
    boxes: dict[object, Box] = {}
    bands: dict[float, float] = {}  # layer centre y -> half height of its tallest box
    for component in graph.C:
        sug = SugiyamaLayout(component)
        sug.xspace, sug.yspace = X_SPACE, Y_SPACE
        sug.init_all()
        sug.draw()
        placed = list(component.sV)
        left = min(v.view.xy[0] - v.view.w / 2 for v in placed)
        shift = offset - left
        for v in placed:
            x, y = v.view.xy
            boxes[v.data] = Box(x + shift - v.view.w / 2, y - v.view.h / 2 + top + PAD,
                                v.view.w, v.view.h)
            bands[y] = max(bands.get(y, 0.0), v.view.h / 2)
        for e in component.sE:
            e.view.points = [(x + shift, y) for x, y in e.view.points]
        offset = max(b.x + b.w for b in boxes.values()) + X_SPACE * 2

    def route(leg_list) -> list[tuple[float, float]]:
        points: list[tuple[float, float]] = []
        for e in leg_list:
            points += e.view.points if not points else e.view.points[1:]
        out = []
        first, last = boxes[leg_list[0].v[0].data], boxes[leg_list[-1].v[1].data]
        out.append((first.cx, first.y + first.h))
        for x, y in points[1:-1]:  # through each layer between, vertically, in its own slot
            half = bands.get(y, 0.0)
            out += [(x, y - half + top + PAD), (x, y + half + top + PAD)]
        out.append((last.cx, last.y))
        return out

    routes = [route(leg_list) for leg_list in legs]
    labels = [boxes[v.data] if v is not None else None for v in label_vertex]
    node_boxes = {name: boxes[name] for name in nodes}
    all_boxes = list(boxes.values())
    width = max((b.x + b.w for b in all_boxes), default=0.0) + PAD
    height = max((b.y + b.h for b in all_boxes), default=0.0) + PAD
    return Drawing(node_boxes, routes, labels, width, height)
