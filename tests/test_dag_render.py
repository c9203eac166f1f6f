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
    edges = root.findall(".//s:polyline", ns)
    assert {(e.get("data-from"), e.get("data-to")) for e in edges} == {
        ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}
    assert [e.get("data-to") for e in edges if e.get("stroke-dasharray")] == ["d"]  # frozen
    # grandalf's layers: every edge runs downwards, each stage below its upstreams
    boxes = {g.get("data-stage"): g.find("s:rect", ns) for g in root.iterfind(".//s:g", ns)
             if g.get("data-stage")}
    top = {name: float(r.get("y")) for name, r in boxes.items()}
    assert top["a"] < top["b"] < top["d"] and top["a"] < top["c"] < top["d"]


def test_html_report_in_a_browser(tmp_path: Path) -> None:
    """The report opens without console errors or network requests; every stage, edge and
    evaluation is on the page; no two boxes or labels overlap, every text inside its box."""
    from report_browser import check_layout, chromium_or_skip, read_report

    from orchestrator.records import EvaluationRecord, EvaluationResult
    from orchestrator.store import Store, write_json

    executable = chromium_or_skip()
    pipeline, store = _ran_with_failure(tmp_path)
    (first,) = [p.name for p in (store / "stages" / "c").iterdir() if p.is_dir()]
    salted = ["--set", "c.env.SALT=x"]  # a second fingerprint of c (and so of d)
    phi4("run", str(pipeline), "--keep-going", *salted, store=store)
    folder = Store(store).latest("c")
    assert folder.fingerprint != first
    record = EvaluationRecord(stage="c", fingerprint=folder.fingerprint, results=[
        EvaluationResult(name="heldout_perplexity", value=12.5, higher_is_better=False,
                         samples=64),
        EvaluationResult(name="caption_accuracy", value=0.75, chance=0.25, samples=40)])
    write_json(folder.evaluation_file, record.model_dump(mode="json"))
    report = tmp_path / "report.html"
    phi4("graph", str(pipeline), "--format", "html", "-o", str(report), *salted, store=store,
         check=0)
    seen, errors = read_report(report, executable)
    assert errors == []
    assert {g["stage"] for g in seen["nodes"]} == set(seen["sections"]) == {"a", "b", "c", "d"}
    assert sorted(map(tuple, seen["edges"])) == [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    assert len(seen["labels"]) == 4
    assert dict(seen["curves"]) == {"a": 1, "b": 1, "c": 1, "d": 0}  # d never ran
    rows = {r[0]: r for r in seen["evaluations"][1:]}
    assert rows["heldout_perplexity"][2] == "12.5" and rows["caption_accuracy"][3] == "0.25"
    assert f"Differs from the previous attempt (attempt 1 of fingerprint {first})" \
        in seen["text"]
    assert "env.SALT: (unset) -> x (--set c.env.SALT=x)" in seen["text"]
    check_layout(seen)
    assert "out (frozen)" in seen["text"] and "failed" in seen["text"]


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
