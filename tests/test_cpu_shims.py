"""The CPU shims: active on this CPU machine, never applied where a GPU is present."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_path_never_applies_the_shims():
    """In a fresh interpreter that believes it has a GPU, apply() changes nothing at all."""
    code = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True
        before = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda)
        from phi4core.models import cpu_shims
        assert cpu_shims.needed() is False
        assert cpu_shims.apply() is False
        assert cpu_shims.apply() is False
        assert cpu_shims.is_applied() is False
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda) == before
        assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode was pushed"
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_gpu_path_in_process_is_a_no_op(monkeypatch):
    from phi4core.models import cpu_shims

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = (cpu_shims.is_applied(), torch.cuda.current_device, torch.Tensor.cuda)
    assert cpu_shims.apply() is False
    assert (cpu_shims.is_applied(), torch.cuda.current_device, torch.Tensor.cuda) == state


@pytest.mark.cpu_only
def test_cpu_path_redirects_cuda_to_cpu():
    from phi4core.models import cpu_shims

    assert not torch.cuda.is_available()
    assert cpu_shims.apply() is True and cpu_shims.is_applied()
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2, 2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.tensor([1, 2], device="cpu", pin_memory=True).is_pinned() is False
    t = torch.arange(4)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(torch.float64).dtype == torch.float64  # other .to() calls untouched
    torch.cuda.synchronize()  # no-op, no error


@pytest.mark.cpu_only
def test_cpu_rng_tracker_forks_cpu_state():
    from megatron.core import tensor_parallel

    from phi4core.parallel import init_single_process, seed_model_parallel

    init_single_process()
    seed_model_parallel(5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream did not move
    seed_model_parallel(5)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(a, b)  # same seed, same tensor-parallel stream


def test_importing_the_model_code_sets_up_nothing():
    """Nothing happens at import: the shims and warning filters come from runtime.init()."""
    code = textwrap.dedent(
        """
        import warnings
        import torch
        import phi4core.models.decoder, phi4core.interop.hf, phi4core.train.loop
        from phi4core.models import cpu_shims
        assert not cpu_shims.is_applied(), "the shims were applied at import"
        assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode was pushed"
        ours = lambda: [f for f in warnings.filters if "Transformer Engine" in str(f[1])]
        assert not ours(), "warning filters set at import"
        from phi4core import runtime
        runtime.init()
        assert cpu_shims.is_applied() == (not torch.cuda.is_available())
        assert ours()
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
