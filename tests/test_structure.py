"""Shapes the orchestrator keeps, checked on its source: one spelling of each state, the store's
records written by the store alone, a CLI that keeps no books, commands registered by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from orchestrator.records import State

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"
CLI_MODULES = [PACKAGE / "cli.py", *sorted((PACKAGE / "commands").glob("*.py"))]
# The methods that write into the store (StageDir's, Store's), and its file writer.
STORE_METHODS = {"prepare", "queue", "begin", "record_job", "end", "publish", "set_latest",
                 "remove", "remove_checkpoints", "collect_trash"}
STORE_WRITER = "write_json"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal, including the literal pieces of f-strings."""
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_state_is_spelled_outside_the_enum() -> None:
    states = {s.value for s in State}
    found = [f"{path.relative_to(PACKAGE)}:{line}: {text!r}"
             for path in _modules() if path.name != "records.py"
             for line, text in _strings(ast.parse(path.read_text())) if text in states]
    assert found == []


def test_only_the_store_names_its_record_files() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{line}"
             for path in _modules() if path.name not in ("store.py", "records.py")
             for line, text in _strings(ast.parse(path.read_text()))
             if text in ("status.json", "manifest.json")]
    assert found == []


def test_the_cli_writes_nothing_into_the_store() -> None:
    """Commands call executors (whose hooks and reconciliation keep the books), never a
    store writer themselves."""
    found = []
    for path in CLI_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in STORE_METHODS | {STORE_WRITER}:
                found.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == STORE_WRITER:
                found.append(f"{path.name}:{node.lineno}: {STORE_WRITER}()")
    assert found == []


def test_command_modules_register_nothing_on_import() -> None:
    """They import neither cli.py nor each other's groups: cli.py adds each command by name."""
    for path in CLI_MODULES[1:]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("cli", "orchestrator.cli") and not (
                    node.level == 2 and node.module == "cli"), f"{path.name}:{node.lineno}"
    probe = ("import sys, orchestrator.commands.pipeline, orchestrator.commands.slurm; "
             "print('orchestrator.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"


def test_python_m_orchestrator_cli_has_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"],
                         capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    for command in ("plan", "run", "status", "graph", "cancel", "model-info", "convert",
                    "data", "validate", "show", "lr", "diff", "metrics", "gc"):
        assert f"\n  {command} " in out.stdout, command


def test_generated_shell_takes_its_exit_codes_from_the_constants() -> None:
    """Case arms on a hook's answer, `exit N` and comparisons of phi4's verdicts are written
    from exitcodes.py, never as numbers in the shell text."""
    import re

    numbers = re.compile(r"^\s*\d+\)|\bexit \d|phi4_(verdict|code) == \d", re.M)
    for name in ("sbatch.py", "nemo_run.py"):
        path = PACKAGE / "executors" / name
        found = [(line, text) for line, text in _strings(ast.parse(path.read_text()))
                 if numbers.search(text)]
        assert found == [], name
