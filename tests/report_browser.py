"""Open an HTML lineage report in headless Chromium (Debian's `chromium`, driven by
Playwright with `executable_path`: no browser download) and check what a reader sees."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def chromium_or_skip() -> str:
    """The chromium executable; outside CI a missing one skips, in CI (CI=true) it fails."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: .ci/run installs it (scripts/chromium.sh)")
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends "
                    "chromium); CI installs it and runs this check")
    try:
        import playwright  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return path


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def _inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return (inner["x"] >= outer["x"] - slack and inner["y"] >= outer["y"] - slack
            and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
            and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack)


_READ = """() => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.x, y: r.y, width: r.width, height: r.height}; };
  const groups = sel => [...document.querySelectorAll(sel)].map(g => ({
      stage: g.dataset.stage || null, rect: box(g.querySelector('rect')),
      texts: [...g.querySelectorAll('text')].map(t => ({text: t.textContent, box: box(t)}))}));
  return {
    nodes: groups('svg g.node'),
    labels: groups('svg g.edge-label'),
    edges: [...document.querySelectorAll('svg polyline.edge')].map(
        p => [p.dataset.from, p.dataset.to]),
    sections: [...document.querySelectorAll('section.stage')].map(s => s.dataset.stage),
    curves: [...document.querySelectorAll('section.stage')].map(
        s => [s.dataset.stage, s.querySelectorAll('svg.loss-curve polyline').length]),
    evaluations: [...document.querySelectorAll('table.evaluation tr')].map(
        r => [...r.children].map(c => c.textContent)),
    text: document.body.innerText,
  };
}"""


def read_report(html: Path, executable: str) -> tuple[dict, list[str]]:
    """What the page shows (boxes in pixels, edges, sections, evaluation rows, text) and the
    console errors and page errors seen while loading it."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("request", lambda r: errors.append(f"network request: {r.url}")
                    if not r.url.startswith(("file:", "data:", "about:")) else None)
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            seen = page.evaluate(_READ)
        finally:
            browser.close()
    return seen, errors


def check_layout(seen: dict) -> None:
    """No two boxes (stages and edge labels) overlap; every text lies inside its own box."""
    boxes = [(g["stage"] or f"label {i}", g["rect"]) for i, g in
             enumerate(seen["nodes"] + seen["labels"])]
    for i, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[i + 1:]:
            assert not _overlap(a, b), f"{name_a} overlaps {name_b}: {a} {b}"
    for g in seen["nodes"] + seen["labels"]:
        for t in g["texts"]:
            assert _inside(t["box"], g["rect"]), f"{t['text']!r} leaves its box {g['rect']}"
