"""`phi4 run --executor nemo_run`: a two-stage command pipeline through NeMo-Run's
LocalExecutor, and a SlurmExecutor dry run carrying the dependency. Skipped without the
`nemo-run` extra (pip install 'phi4[nemo-run]'), except the test of that message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dag_helpers import counts, make_pipeline
from slurm_helpers import LOCAL_CLUSTER, REPO, phi4, status

try:  # the import itself is what can break (a leptonai release it cannot import)
    import nemo_run  # noqa: F401
    HAVE_NEMO_RUN = True
except ImportError:
    HAVE_NEMO_RUN = False
needs_nemo_run = pytest.mark.skipif(
    not HAVE_NEMO_RUN, reason="nemo_run is not importable: pip install 'phi4[nemo-run]'")


@needs_nemo_run
def test_two_stages_through_the_local_executor(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    out = phi4("run", str(pipeline), "--store", str(store), "--executor", "nemo_run",
               timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.splitlines()[-2:] == ["succeeded  a", "succeeded  b"]
    assert counts(tmp_path) == {"a": 1, "b": 1}
    rows = status(store)
    assert {r["state"] for r in rows.values()} == {"succeeded"}
    assert rows["b"]["executor"] == "nemo_run"
    assert next((store / "stages" / "b").glob("*/artifacts/out/data.txt")).read_text() == \
        "b:[a:]"
    assert list((store / "nemorun" / "experiments" / "test").iterdir())  # NEMORUN_HOME
    again = phi4("run", str(pipeline), "--store", str(store), "--executor", "nemo_run")
    assert "nothing to run: 2 stages up to date" in again.stdout


@needs_nemo_run
def test_slurm_executor_dry_run_has_the_dependency(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]},
                             env={"b": {"X": "$(touch /tmp/phi4-nemo-pwned)"}})
    out = phi4("run", str(pipeline), "--store", str(tmp_path / "store"), "--executor",
               "nemo_run", "--cluster", str(LOCAL_CLUSTER), "--dry-run", timeout=300,
               env={"COLUMNS": "250"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "#SBATCH --dependency='afterok:<job-of-a>'" in text
    assert "#SBATCH --job-name=test.b" in text and "#SBATCH --partition=debug" in text
    assert "export X='$(touch /tmp/phi4-nemo-pwned)'" in text  # NeMo-Run itself does not quote
    assert not (tmp_path / "store").exists()  # a dry run writes nothing in the store
    assert not Path("/tmp/phi4-nemo-pwned").exists()


def test_missing_nemo_run_is_a_one_line_error(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    code = ("import sys; sys.modules['nemo_run'] = None; sys.argv[0] = 'phi4'; "
            "from orchestrator.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "run", str(pipeline), "--store",
                        str(tmp_path / "store"), "--executor", "nemo_run"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (r.returncode, r.stderr) == (
        2, "phi4: NeMo-Run is not installed: pip install 'phi4[nemo-run]'\n")
    assert json.loads(phi4("plan", str(pipeline), "--store", str(tmp_path / "store"),
                           "--format", "json", check=0).stdout)["stages"][0]["verdict"] == "run"
