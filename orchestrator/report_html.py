"""`phi4 graph PATH --format html`: the lineage report, one self-contained HTML file.

No script, font or stylesheet is fetched: the DAG is the inline SVG of render.svg (grandalf's
layered layout, stages coloured by state, each linking to its section), and each stage's
section is static HTML: state and duration, inputs with their fingerprints and digests, the
module groups it trains and freezes with the checksums of the frozen ones, the loss curve
(inline SVG from metrics.jsonl), the held-out evaluations, the estimate against the measured
memory and tokens/s, the artifacts with sizes and hashes, what differs from the `extends` base
and from the stage's previous fingerprint, and every resolved value with the file:line it came
from.
"""

from __future__ import annotations

import json
import math
import time
from html import escape
from pathlib import Path
from typing import Any

from .config.checks import expand_groups, model_of
from .plan import Plan, StagePlan
from .provenance import UNSET, attempt_diff, extends_diff, sources
from .render import COLOURS, node_state, svg
from .runs import read_metrics
from .store import StageDir, read_json
from .words import bytes_text, count

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; border-top: 1px solid #ccc;
padding-top: 12px; } h3 { font-size: 14px; margin: 16px 0 4px; }
table { border-collapse: collapse; font-size: 12px; margin: 4px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } code, .mono { font-family: Menlo, Consolas, monospace; }
.state { display: inline-block; padding: 1px 8px; border-radius: 8px; border: 1px solid #888; }
.graph { overflow-x: auto; } .muted { color: #777; } details { margin: 4px 0; }
"""


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _text(value: Any) -> str:
    if value is UNSET:
        return '<span class="muted">(unset)</span>'
    return escape(value if isinstance(value, str) else json.dumps(value))


def _bytes(n: float | None) -> str:
    return "-" if n is None else bytes_text(n)


def loss_curve(records: list[dict], width: int = 420, height: int = 160) -> str:
    """The loss by step, as an inline SVG polyline (empty text when nothing was logged)."""
    points = [(r["step"], r["loss"]) for r in records
              if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))
              and math.isfinite(r["loss"])]
    if not points:
        return '<p class="muted">no loss logged</p>'
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = min(losses), max(losses)
    pad = 36

    def at(step: float, loss: float) -> tuple[float, float]:
        fx = (step - x0) / ((x1 - x0) or 1)
        fy = (loss - y0) / ((y1 - y0) or 1)
        return pad + fx * (width - pad - 8), height - pad / 2 - fy * (height - pad)

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(s, v) for s, v in points))
    return (f'<svg class="loss-curve" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg" font-size="10">'
            f'<rect x="{pad}" y="4" width="{width - pad - 8}" height="{height - pad - 4 + pad / 2}"'
            ' fill="#fafafa" stroke="#ccc"/>'
            f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            f'<text x="2" y="12">{y1:.3g}</text><text x="2" y="{height - pad / 2}">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 2}">step {x0}</text>'
            f'<text x="{width - 60}" y="{height - 2}">step {x1}</text></svg>')


def _folder(plan: Plan, sp: StagePlan) -> StageDir | None:
    """The stage's folder for its current fingerprint, else its latest attempt."""
    if sp.stage_dir is not None and sp.stage_dir.status() is not None:
        return sp.stage_dir
    return plan.store.latest(sp.name)


def _frozen_checksums(folder: StageDir) -> dict[str, str]:
    version = folder.published_version()
    if version is None:
        return {}
    out: dict[str, str] = {}
    for artifact in sorted(p for p in version.iterdir() if p.is_dir()):
        record = read_json(artifact / "frozen_checksums.json")
        if isinstance(record, dict) and isinstance(record.get("after"), dict):
            out.update(record["after"].get("groups", {}))
    return out


def _groups_section(sp: StagePlan, folder: StageDir | None) -> str:
    recipe = sp.loaded.recipe
    model = model_of(recipe)
    if model is None:
        return ""
    available = model.module_groups
    trainable = expand_groups(recipe.trainable, available)
    checksums = _frozen_checksums(folder) if folder else {}
    rows = [[escape(g), "trains" if g in trainable else "frozen",
             f'<span class="mono">{escape(checksums.get(g, "-"))}</span>']
            for g in available]
    return "<h3>Module groups</h3>" + _table(["group", "", "frozen checksum (after)"], rows)


def _inputs_section(sp: StagePlan, folder: StageDir | None) -> str:
    status = folder.status() if folder else None
    recorded = status.inputs if status else {}
    rows = []
    for name, inp in sp.loaded.recipe.inputs.items():
        rec = recorded.get(name)
        source = (f"{inp.stage}.{inp.artifact}" if inp.stage else inp.path or inp.hf or "")
        fingerprint = (rec.fingerprint if rec else None) or (
            sp.inputs[name].fingerprint if name in sp.inputs else None)
        rows.append([escape(name), escape(source), "frozen" if inp.frozen else "",
                     f'<span class="mono">{escape(fingerprint or "-")}</span>',
                     f'<span class="mono">{escape((rec.digest if rec else None) or "-")}</span>'])
    if not rows:
        return ""
    return "<h3>Inputs</h3>" + _table(["input", "from", "", "fingerprint", "digest"], rows)


def _estimate_section(sp: StagePlan, records: list[dict]) -> str:
    from .estimate import estimate

    recipe = sp.loaded.recipe
    if recipe.kind != "train" or model_of(recipe) is None:
        return ""
    est = estimate(recipe)
    peaks = [r["peak_mem_mb"] for r in records if isinstance(r.get("peak_mem_mb"), (int, float))]
    speeds = [r["tokens_per_s"] for r in records
              if isinstance(r.get("tokens_per_s"), (int, float))]
    measured_mem = max(peaks) * 2**20 if peaks else None
    measured_speed = sorted(speeds)[len(speeds) // 2] if speeds else None
    where = est.gpu.name if est.gpu else "CPU process"
    rows = [["memory per " + ("GPU" if est.gpu else "process"), _bytes(est.peak_bytes),
             _bytes(measured_mem) + (" (peak RSS, whole process)" if not est.gpu and peaks
                                   else "")],
            ["tokens/s", f"{est.tokens_per_s:,.0f}" if est.gpu else "-",
             f"{measured_speed:,.0f} (median)" if measured_speed else "-"]]
    terms = ", ".join(f"{k} {_bytes(v)}" for k, v in est.memory.items())
    return (f"<h3>Estimate ({escape(where)}) vs measured</h3>"
            + _table(["", "estimated", "measured"], rows)
            + f'<p class="muted">{escape(terms)}</p>')


def _evaluation_section(folder: StageDir | None) -> str:
    record = folder.evaluation() if folder else None
    if record is None or not record.results:
        return ""
    rows = [[escape(r.name), escape(r.model), "-" if r.value is None else f"{r.value:.4g}",
             "-" if r.chance is None else f"{r.chance:.4g}",
             "higher" if r.higher_is_better else "lower", str(r.samples or "-")]
            for r in record.results]
    return "<h3>Evaluation</h3>" + _table(
        ["metric", "model", "value", "chance", "better", "samples"], rows, "evaluation")


def _artifacts_section(folder: StageDir | None) -> str:
    manifest = folder.manifest() if folder else None
    if manifest is None:
        return ""
    rows = []
    for artifact, files in sorted(manifest.artifacts.items()):
        total = sum(int(e["size"]) for e in files.values())
        inner = _table(["file", "size", "sha256"],
                       [[escape(rel), bytes_text(int(e["size"])),
                         f'<span class="mono">{escape(e["sha256"])}</span>']
                        for rel, e in sorted(files.items())])
        rows.append([escape(artifact), bytes_text(total), str(len(files)),
                     f"<details><summary>files</summary>{inner}</details>"])
    return "<h3>Artifacts</h3>" + _table(["artifact", "size", "files", ""], rows)


def _changes_section(plan: Plan, sp: StagePlan, folder: StageDir | None) -> str:
    out = []
    diff = extends_diff(sp.loaded)
    if diff:
        out.append("<h3>Differs from its extends base</h3>" + _table(
            ["key", "base", "this stage"], [[escape(k), _text(a), _text(b)] for k, a, b in diff]))
    fingerprint = folder.fingerprint if folder else sp.fingerprint
    previous, changes = attempt_diff(plan.store, sp.name, fingerprint)
    if previous:
        out.append(f"<h3>Differs from the previous attempt ({escape(previous)})</h3>"
                   + ("<ul>" + "".join(f"<li>{escape(c)}</li>" for c in changes) + "</ul>"
                      if changes else '<p class="muted">no fingerprinted field</p>'))
    return "".join(out)


def _config_section(sp: StagePlan, pipeline: Path | None, profile: Path | None) -> str:
    rows = [[f"<code>{escape(s.key)}</code>", _text(s.value),
             escape(s.where()) + (f' <span class="muted">({escape(s.layer)})</span>'
                                  if s.origin is not None else "")]
            for s in sources(sp.loaded, pipeline, profile)]
    return ("<details><summary>Resolved config, with where each value came from</summary>"
            + _table(["key", "value", "source"], rows, "config") + "</details>")


def stage_section(plan: Plan, sp: StagePlan, pipeline: Path | None, profile: Path | None
                  ) -> str:
    folder = _folder(plan, sp)
    state = node_state(plan, sp.name)
    status = folder.status() if folder else None
    records = read_metrics(folder.metrics) if folder else []
    duration = ""
    if status and status.started and status.ended:
        duration = f" · {status.ended - status.started:,.0f} s"
        duration += time.strftime(" · ended %Y-%m-%d %H:%M UTC", time.gmtime(status.ended))
    fp = folder.fingerprint if folder else (sp.fingerprint or "-")
    head = (f'<h2 id="stage-{escape(sp.name)}">{escape(sp.name)} '
            f'<span class="state" style="background:{COLOURS.get(state, "#fff")}">'
            f'{escape(state)}</span></h2>'
            f'<p class="muted">fingerprint <span class="mono">{escape(fp)}</span>{duration}'
            f' · {escape(str(sp.loaded.path))}</p>')
    parts = [head, _inputs_section(sp, folder), _groups_section(sp, folder)]
    if records:
        parts.append("<h3>Loss</h3>" + loss_curve(records))
    parts += [_evaluation_section(folder), _estimate_section(sp, records),
              _artifacts_section(folder), _changes_section(plan, sp, folder),
              _config_section(sp, pipeline, profile)]
    return f'<section class="stage" data-stage="{escape(sp.name)}">' + "".join(parts) \
        + "</section>"


def html(plan: Plan, title: str, pipeline: Path | None = None, profile: Path | None = None
         ) -> str:
    stages = "".join(stage_section(plan, sp, pipeline, profile)
                     for sp in plan.stages.values())
    legend = " ".join(f'<span class="state" style="background:{c}">{escape(s)}</span>'
                      for s, c in COLOURS.items())
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1>"
            f'<p class="muted">{count(len(plan.stages), "stage")}, store '
            f'{escape(str(plan.store.root))}, written '
            f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}</p>'
            f'<p>{legend}</p><div class="graph">{svg(plan, title, link_nodes=True)}</div>'
            f"{stages}</body></html>\n")
