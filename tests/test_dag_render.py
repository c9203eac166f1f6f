"""`phi4 graph`: the lineage as text, Mermaid, DOT and SVG, coloured by the store."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from dag_helpers import REPO, make_pipeline, phi4

from orchestrator.render import COLOURS


def _ran_with_failure(tmp_path: Path) -> tuple[Path, Path]:
    pipeline = make_pipeline(tmp_path)
    recipe = tmp_path / "recipes" / "d.yaml"
    recipe.write_text(recipe.read_text().replace("c: {stage: c, artifact: out}",
                                                 "c: {stage: c, artifact: out, frozen: true}"))
    (tmp_path / "fail_b").touch()
    phi4("run", str(pipeline), "--keep-going", store=tmp_path / "store")
    return pipeline, tmp_path / "store"


def test_text_lists_levels_states_and_edges(tmp_path: Path) -> None:
    pipeline, store = _ran_with_failure(tmp_path)
    out = phi4("graph", str(pipeline), store=store, check=0).stdout
    assert "pipeline test: 4 stages in 3 levels" in out
    assert "level 1\n  b [failed]  command\n      <- a: out\n  c [succeeded]" in out
    assert "  d [blocked]  command\n      <- b: out\n      <- c: out (frozen)" in out


def test_mermaid_and_dot(tmp_path: Path) -> None:
    pipeline, store = _ran_with_failure(tmp_path)
    mermaid = phi4("graph", str(pipeline), "--format", "mermaid", store=store, check=0).stdout
    assert mermaid.startswith("flowchart TD")
    assert '  a -->|"out"| b' in mermaid and '  c -.->|"out (frozen)"| d' in mermaid
    assert ":::failed" in mermaid and "classDef not_run" in mermaid
    dot = phi4("graph", str(pipeline), "--format", "dot", store=store, check=0).stdout
    assert dot.startswith('digraph "pipeline test" {')
    assert f'"b" [label="b\\nfailed\\ncommand", fillcolor="{COLOURS["failed"]}"];' in dot
    assert '"c" -> "d" [label="out (frozen)", style=dashed];' in dot


def test_svg_is_well_formed_and_coloured(tmp_path: Path) -> None:
    pipeline, store = _ran_with_failure(tmp_path)
    target = tmp_path / "lineage.svg"
    phi4("graph", str(pipeline), "--format", "svg", "-o", str(target), store=store, check=0)
    root = ET.parse(target).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    fills = {r.get("fill") for r in root.iterfind(".//s:rect", ns)}
    assert {COLOURS["succeeded"], COLOURS["failed"], COLOURS["blocked"]} <= fills
    assert len(root.findall(".//s:path", ns)) == 4 + 1  # four edges and the arrow head
    assert any(p.get("stroke-dasharray") for p in root.iterfind(".//s:path", ns))


def test_shipped_pipeline_lists_trained_and_frozen_groups(tmp_path: Path) -> None:
    out = phi4("graph", str(REPO / "pipelines/phi4_multimodal.yaml"), "--profile", "tiny",
               store=tmp_path / "store", check=0).stdout
    assert "9 stages in 7 levels" in out
    assert ("  vision_sft [not run]  trains lora.vision, vision.encoder, vision.projector; "
            "frozen backbone") in out
    assert "      <- speech_post_train: speech (frozen)" in out


def test_single_recipe_graph_shows_its_lineage(tmp_path: Path) -> None:
    make_pipeline(tmp_path)
    out = phi4("graph", str(tmp_path / "recipes" / "d.yaml"), store=tmp_path / "store",
               check=0).stdout
    assert "stage d and upstream: 4 stages in 3 levels" in out
