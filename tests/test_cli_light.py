"""The light commands stay fast: validate, show, lr, plan, graph and status never import
torch or megatron, and the recipe commands load no other command's module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli

REPO = Path(__file__).resolve().parents[1]

# Each command in a fresh interpreter, so that one command's imports cannot hide another's.
PROBE = """
import sys, json
from click.testing import CliRunner
from orchestrator.cli import cli
result = CliRunner().invoke(cli, json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "megatron",
                                                             "transformer_engine", "numpy"})
commands = sorted(m for m in sys.modules if m.startswith("orchestrator.commands.")
                  or m in ("orchestrator.store", "orchestrator.records"))
print(json.dumps({"code": result.exit_code, "output": result.output, "heavy": heavy,
                  "commands": commands}))
"""

PIPELINE = "pipelines/phi4_multimodal.yaml"
LIGHT_COMMANDS = {
    "validate": ["validate", PIPELINE],
    "validate_tiny": ["validate", PIPELINE, "--profile", "tiny"],
    "show": ["show", PIPELINE, "--profile", "tiny"],
    "lr": ["lr", "predict", "--tokens", "5e12", "--B", "4.9"],
    "plan": ["plan", PIPELINE, "--profile", "tiny", "--store", "{store}"],
    "graph": ["graph", PIPELINE, "--profile", "tiny", "--store", "{store}", "--format", "svg"],
    "status": ["status", "--store", "{store}", "--all"],
    "gc": ["gc", "--store", "{store}", "--dry-run"],
}


def _probe(args: list[str], store: Path) -> dict:
    args = [a.replace("{store}", str(store)) for a in args]
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(LIGHT_COMMANDS))
def test_light_commands_never_import_torch(name: str, tmp_path: Path) -> None:
    """validate, show, lr, plan, graph, status and gc: no torch, megatron or numpy, each
    alone."""
    (tmp_path / "store" / "stages").mkdir(parents=True)  # an empty store for status
    report = _probe(LIGHT_COMMANDS[name], tmp_path / "store")
    assert report["code"] == 0, report["output"]
    assert report["heavy"] == []


def test_recipe_commands_load_no_other_command_module(tmp_path: Path) -> None:
    """The recipe commands (validate, show) import none of commands/* (executors, Slurm) and
    not the store: those load when their command runs."""
    for name in ("validate", "validate_tiny", "show"):
        report = _probe(LIGHT_COMMANDS[name], tmp_path)
        assert report["code"] == 0, report["output"]
        assert report["commands"] == ["orchestrator.commands.common"], name


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
