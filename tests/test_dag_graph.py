"""The DAG: order, levels, lineage queries, cycles reported at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest
from dag_helpers import make_pipeline, phi4

from orchestrator.config import ConfigError, load_pipeline, load_recipe
from orchestrator.graph import build_graph, with_upstream


def test_diamond_order_and_levels(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"d": ["b", "c"], "c": ["a"], "b": ["a"], "a": []})
    graph = build_graph(load_pipeline(pipeline).stages)
    assert graph.order == ["a", "c", "b", "d"]  # upstream first; ties keep file order
    assert graph.levels() == [["a"], ["c", "b"], ["d"]]
    assert graph.descendants("a") == {"b", "c", "d"}
    assert graph.ancestors("d") == {"a", "b", "c"}
    assert graph.ancestors("a") == set()
    assert [(e.upstream, e.artifact) for e in graph.inputs_of("d")] == [("b", "out"), ("c", "out")]


def test_single_recipe_graph_has_external_inputs(tmp_path: Path) -> None:
    make_pipeline(tmp_path)
    graph = build_graph({"d": load_recipe(tmp_path / "recipes" / "d.yaml")})
    assert graph.order == ["d"]
    assert {e.upstream for e in graph.external("d")} == {"b", "c"}


def test_with_upstream_loads_sibling_recipes_transitively(tmp_path: Path) -> None:
    make_pipeline(tmp_path)
    stages = with_upstream(load_recipe(tmp_path / "recipes" / "d.yaml"), None)
    assert set(stages) == {"a", "b", "c", "d"}
    assert build_graph(stages).order[0] == "a"


def _cycle(tmp_path: Path) -> Path:
    return make_pipeline(tmp_path, {"a": ["b"], "b": ["a"], "c": []})


def test_cycle_is_a_config_error_naming_each_stage_at_its_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_graph(load_pipeline(_cycle(tmp_path)).stages)
    lines = [str(p) for p in err.value.problems]
    assert len(lines) == 2
    assert any(line.startswith(f"{tmp_path}/recipes/a.yaml:7: inputs.b.stage") for line in lines)
    assert any(line.startswith(f"{tmp_path}/recipes/b.yaml:7: inputs.a.stage") for line in lines)
    assert all("dependency cycle" in line and ("a -> b -> a" in line or "b -> a -> b" in line)
               for line in lines)


@pytest.mark.parametrize("command", ["plan", "run", "graph"])
def test_cycle_exits_2_with_one_line_per_stage(tmp_path: Path, command: str) -> None:
    out = phi4(command, str(_cycle(tmp_path)), store=tmp_path / "store")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.stderr
    assert "recipes/a.yaml" in out.stderr and "recipes/b.yaml" in out.stderr


def test_cycle_through_sibling_recipes_with_deps(tmp_path: Path) -> None:
    _cycle(tmp_path)
    out = phi4("run", str(tmp_path / "recipes" / "a.yaml"), "--with-deps",
               store=tmp_path / "store")
    assert out.returncode == 2 and "dependency cycle" in out.stderr
