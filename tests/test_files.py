"""phi4core's file helpers: strict JSON, modes that follow the umask, one place for each."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from phi4core.files import (
    atomic_output,
    current_umask,
    json_text,
    temp_dir_beside,
    temp_path_beside,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    value = {"loss": float("nan"), "norms": [1.5, float("inf"), (float("-inf"), 2)], "ok": 3}
    assert _strict(json_text(value)) == {"loss": None, "norms": [1.5, None, [None, 2]], "ok": 3}
    write_json(tmp_path / "a.json", value)
    assert _strict((tmp_path / "a.json").read_text())["loss"] is None


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_temporary_and_atomic_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        file, folder = Path(temp_path_beside(tmp_path / "x")), temp_dir_beside(tmp_path / "d")
        with atomic_output(tmp_path / "y") as f:
            f.write("y")
    finally:
        os.umask(old)
    assert file.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "y").stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_phi4core_writes_files_and_json_only_through_its_helpers() -> None:
    """mkstemp/mkdtemp (0600/0700) and json.dump (bare NaN) appear nowhere in phi4core; json.dumps
    only renders text for the model (chat templates, demo corpus), never a file."""
    allowed_dumps = {"phi4core/data/chat.py", "phi4core/data/synthetic.py",
                     "phi4core/files.py", "phi4core/interop/__main__.py"}
    found = []
    for path in sorted((REPO / "phi4core").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if rel != "phi4core/files.py" and re.search(
                r"mkstemp|mkdtemp|NamedTemporaryFile|json\.dump\(", text):
            found.append(rel)
        if "json.dumps(" in text and rel not in allowed_dumps:
            found.append(rel)
    assert found == []
