import os
import sys
from pathlib import Path

import pytest

# Tiny models on 2 cores: one thread per process (otherwise steps are ~25x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# PyPI's torchvision (a test-only reference for the image processor) imports beside the CPU
# torch only through this shim (as runtime.init() installs it for phi4's entry points); it is
# applied when something first imports torchvision.
from phi4core import torchvision_compat  # noqa: E402

torchvision_compat.install()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the marks into scheduling groups
def pytest_collection_modifyitems(config, items):
    """Scheduling under `pytest -n N --dist loadgroup` (`make test`): a test file's tests stay
    on one worker (they share module fixtures), and every test of the real Slurm controller
    runs on the same worker, one at a time (its node has 2 CPUs; tests wait on their jobs).
    Then: `cpu_only` tests are skipped, and say why, where torch sees a GPU."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            group = "slurm" if item.get_closest_marker("slurm") else item.path.stem
            item.add_marker(pytest.mark.xdist_group(group))
    marked = [item for item in items if item.get_closest_marker("cpu_only")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cpu_only: asserts behaviour without a GPU "
                                   "(CPU shims, megatron's local layer spec, gloo ranks)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _phi4core_runtime():
    """phi4core's explicit set-up, as its entry points make it, once the tests use torch
    (importing phi4core sets up nothing; orchestrator-only runs stay torch-free)."""
    if "torch" in sys.modules:
        from phi4core import runtime

        runtime.init()
