"""validate, show and lr stay fast: they never import torch or megatron."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import cli

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys, json
from click.testing import CliRunner
from orchestrator.cli import cli
runner = CliRunner()
codes = [
    runner.invoke(cli, ["validate", "pipelines/phi4_multimodal.yaml"]).exit_code,
    runner.invoke(cli, ["show", "pipelines/phi4_multimodal.yaml", "--profile", "tiny"]).exit_code,
    runner.invoke(cli, ["lr", "predict", "--tokens", "5e12", "--B", "4.9"]).exit_code,
]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "megatron",
                                                             "transformer_engine", "numpy"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_light_commands_never_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0]
    assert report["heavy"] == []


def test_show_resolves_everything() -> None:
    result = CliRunner().invoke(cli, ["show", str(REPO / "recipes/text_pretrain.yaml"),
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["derived"]["data_parallel"] == 32
    assert abs(data["derived"]["peak_lr"] - 4.9 * 5e12 ** -0.32) < 1e-12
    assert data["precision"]["fp8"] == "hybrid"


def test_lr_fit_recovers_the_law(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.csv"
    rows = ["tokens,best_lr"] + [f"{d},{3.0 * d ** -0.32}" for d in (1.25e10, 2.5e10, 5e10)]
    sweep.write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["lr", "fit", str(sweep), "--format", "json"])
    fit = json.loads(result.output)
    assert abs(fit["exponent"] + 0.32) < 1e-9 and abs(fit["B"] - 3.0) < 1e-6
    fixed = json.loads(CliRunner().invoke(
        cli, ["lr", "fit", str(sweep), "--exponent", "-0.3", "--format", "json"]).output)
    assert fixed["exponent"] == -0.3 and fixed["fixed_exponent"]


def test_lr_fit_bad_rows_name_the_line(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("tokens,lr\n1e10,1e-3\n2e10,oops\n")
    result = CliRunner().invoke(cli, ["lr", "fit", str(sweep)])
    assert result.exit_code == 2 and f"{sweep}:3:" in result.output
