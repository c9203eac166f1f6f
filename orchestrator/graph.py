"""Stages as a DAG: edges from `{stage: X}` inputs, topological order, levels, cycles.

A graph may name upstream stages it does not contain (a single recipe run alone): those edges
are `external` and their artifacts come from the store.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, LoadedRecipe, Problem, load_recipe


@dataclass(frozen=True)
class Edge:
    upstream: str
    downstream: str
    input: str  # the input's name in the downstream recipe
    artifact: str
    frozen: bool


@dataclass
class Graph:
    stages: dict[str, LoadedRecipe]  # in file order
    edges: list[Edge]
    order: list[str] = field(default_factory=list)  # topological, ties broken by file order
    level: dict[str, int] = field(default_factory=dict)  # 0 for stages with no upstream here

    def inputs_of(self, name: str) -> list[Edge]:
        return [e for e in self._incoming.get(name, ())]

    def outputs_of(self, name: str) -> list[Edge]:
        return [e for e in self._outgoing.get(name, ())]

    def external(self, name: str) -> list[Edge]:
        """Edges into `name` from stages outside this graph (served by the store)."""
        return [e for e in self._incoming.get(name, ()) if e.upstream not in self.stages]

    def levels(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(max(self.level.values(), default=-1) + 1)]
        for name in self.order:
            out[self.level[name]].append(name)
        return out

    def descendants(self, name: str) -> set[str]:
        return self._reach(name, lambda n: (e.downstream for e in self._outgoing.get(n, ())))

    def ancestors(self, name: str) -> set[str]:
        return self._reach(name, lambda n: (e.upstream for e in self._incoming.get(n, ())
                                            if e.upstream in self.stages))

    def _reach(self, start: str, step) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def __post_init__(self) -> None:
        self._incoming: dict[str, list[Edge]] = {}
        self._outgoing: dict[str, list[Edge]] = {}
        for e in self.edges:
            self._incoming.setdefault(e.downstream, []).append(e)
            self._outgoing.setdefault(e.upstream, []).append(e)


def build_graph(stages: dict[str, LoadedRecipe]) -> Graph:
    """The DAG of `stages`; a cycle is a ConfigError at the inputs that close it."""
    edges = [Edge(inp.stage, name, input_name, inp.artifact or "", inp.frozen)
             for name, loaded in stages.items()
             for input_name, inp in loaded.recipe.inputs.items() if inp.stage is not None]
    graph = Graph(stages, edges)
    position = {name: i for i, name in enumerate(stages)}
    waiting = {name: len({e.upstream for e in graph.inputs_of(name) if e.upstream in stages})
               for name in stages}
    ready = [(position[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    while ready:
        _, name = heapq.heappop(ready)
        graph.order.append(name)
        ups = {e.upstream for e in graph.inputs_of(name) if e.upstream in stages}
        graph.level[name] = 1 + max((graph.level[u] for u in ups), default=-1)
        for down in {e.downstream for e in graph.outputs_of(name)}:
            waiting[down] -= 1
            if waiting[down] == 0:
                heapq.heappush(ready, (position[down], down))
    if len(graph.order) < len(stages):
        raise _cycle_error(graph, [n for n in stages if n not in graph.level])
    return graph


def _cycle_error(graph: Graph, stuck: list[str]) -> ConfigError:
    """Name every stage on one cycle, each at the input that points to the previous one."""
    stuck_set = set(stuck)
    path: list[str] = []
    on_path: dict[str, int] = {}
    node = stuck[0]
    # Every stuck stage has a stuck upstream, so walking upstream must revisit a stage.
    while node not in on_path:
        on_path[node] = len(path)
        path.append(node)
        node = next(e.upstream for e in graph.inputs_of(node) if e.upstream in stuck_set)
    cycle = path[on_path[node]:][::-1]  # upstream first
    text = " -> ".join(cycle + [cycle[0]])
    problems = []
    for i, name in enumerate(cycle):
        upstream = cycle[i - 1]
        edge = next(e for e in graph.inputs_of(name) if e.upstream == upstream)
        loc = ("inputs", edge.input, "stage")
        problems.append(Problem(graph.stages[name].origin(loc), loc,
                                f"dependency cycle: {text}"))
    return ConfigError(problems)


def with_upstream(loaded: LoadedRecipe, profile: str | None) -> dict[str, LoadedRecipe]:
    """`loaded` and, transitively, the sibling recipes (`<dir>/<stage>.yaml`) it takes inputs
    from; upstream recipes come first so that file order breaks ties the natural way."""
    found = {loaded.recipe.name: loaded}
    requested = {loaded.recipe.name}
    todo = [loaded]
    while todo:
        current = todo.pop()
        for inp in current.recipe.inputs.values():
            if inp.stage is None or inp.stage in requested:
                continue
            requested.add(inp.stage)
            sibling = load_recipe(Path(current.path).parent / f"{inp.stage}.yaml", profile)
            found[sibling.recipe.name] = sibling
            todo.append(sibling)
    return dict(reversed(list(found.items())))
