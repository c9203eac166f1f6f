"""Stage artifacts by module group across layouts: saved at TP=1, assembled at TP=2 and at
PP=2 (gloo, 2 processes under torchrun), every tensor lands where it belongs (slow)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from phi4core.module_groups import group_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cpu_only, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "mp_artifacts_worker.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def _tensors(folder: Path) -> dict:
    from megatron.core import dist_checkpointing

    from phi4core.parallel import init_single_process

    init_single_process()
    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(folder)).items()
            if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    src = tmp_path_factory.mktemp("artifacts")
    _run(1, "save", str(src))
    return src


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_model_assembled_from_artifacts_at_another_layout(src, tmp_path, tp, pp):
    from mp_artifacts_worker import ARTIFACTS

    _run(2, "assemble", str(src), str(tmp_path), str(tp), str(pp))
    whole = _tensors(tmp_path / "model")
    expected = {}
    for artifact, groups in ARTIFACTS.items():
        part = _tensors(src / artifact)
        assert {group_of(k) for k in part} == set(groups), artifact
        expected.update(part)
    assert sorted(whole) == sorted(expected)
    for k, t in expected.items():
        assert whole[k].equal(t), k
