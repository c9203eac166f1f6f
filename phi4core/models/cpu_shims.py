"""Every CPU workaround megatron-core needs, in one place, applied only when there is no GPU.

megatron-core assumes CUDA in a handful of places. On a CPU-only torch these fail; the fixes
below redirect them to the CPU:

* ``torch.cuda.current_device()`` returns the CPU device (rotary embedding, the attention's
  global memory buffer, the TP gather/scatter buffers, p2p shape exchange).
* ``Tensor.cuda()`` returns the tensor unchanged (the tied-embedding sync of pipeline parallel).
* ``torch.cuda.synchronize()`` is a no-op (p2p communication, checkpoint writers).
* a ``TorchFunctionMode`` rewrites ``device="cuda"`` (and ``pin_memory=True``) in tensor
  factories and ``.to()`` calls to the CPU (the pipeline schedules' token counters, the causal
  mask helpers, context-parallel index tensors).
* a CPU RNG states tracker replaces megatron's CUDA one (attention always forks the tracker;
  activation recomputation saves and restores the "CUDA" state, which becomes the CPU state).

``apply()`` is a no-op returning False when ``torch.cuda.is_available()``: the GPU path never
sees any of this. Nothing here imports megatron at module import time.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_APPLIED = False
_ORIGINALS: dict[str, object] = {}
_MODE: CudaToCpuMode | None = None


def needed() -> bool:
    """True on a machine without a usable GPU: the only case where the shims apply."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _APPLIED


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int):  # torch.device index convention: an int means cuda:<int>
        return True
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to the CPU in every torch call that names one.

    Only keyword ``device=``/``pin_memory=`` arguments and the device argument of
    ``Tensor.to``/``Tensor.cuda`` are touched; everything else passes straight through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda(dev):
                kwargs = dict(kwargs)
                kwargs["device"] = _CPU
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs)
                kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_like_arg(args[1]):
            args = (args[0], _CPU, *args[2:])
        elif func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def _is_cuda_like_arg(a) -> bool:
    # Tensor.to(other_tensor) / Tensor.to(dtype) must pass untouched.
    return isinstance(a, (str, torch.device)) and _is_cuda(a)


# ---------------------------------------------------------------------------------------------
# RNG: a tracker with the interface of megatron's CudaRNGStatesTracker, over the CPU generator.
# ---------------------------------------------------------------------------------------------


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker, forking the CPU generator instead of a CUDA one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def cpu_model_parallel_seed(seed: int) -> None:
    """CPU twin of megatron's ``model_parallel_cuda_manual_seed``: same three named states,
    seeded the same way (data parallel: seed; tensor parallel: seed + 2718 + tp_rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker = _make_cpu_tracker_class()()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_megatron_rng() -> None:
    """Activation recomputation saves/restores the 'CUDA' RNG state: make that the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    if "mrandom._get_cuda_rng_state" in _ORIGINALS:
        return
    _ORIGINALS["mrandom._get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    _ORIGINALS["mrandom._set_cuda_rng_state"] = mrandom._set_cuda_rng_state

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state


# ---------------------------------------------------------------------------------------------


def apply() -> bool:
    """Install every CPU shim once. Returns True when the shims are (now) active, False on a
    machine with a GPU, where nothing at all is changed."""
    global _APPLIED, _MODE
    if not needed():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        _ORIGINALS["torch.cuda.current_device"] = torch.cuda.current_device
        _ORIGINALS["torch.cuda.synchronize"] = torch.cuda.synchronize
        _ORIGINALS["torch.Tensor.cuda"] = torch.Tensor.cuda
        torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
        _APPLIED = True
    try:
        _patch_megatron_rng()
    except ImportError:  # megatron absent: the torch-level shims still stand
        pass
    log.debug("phi4core CPU shims applied")
    return True


def remove() -> None:
    """Undo ``apply()`` (tests only)."""
    global _APPLIED, _MODE
    with _LOCK:
        if not _APPLIED:
            return
        torch.cuda.current_device = _ORIGINALS.pop("torch.cuda.current_device")  # type: ignore
        torch.cuda.synchronize = _ORIGINALS.pop("torch.cuda.synchronize")  # type: ignore
        torch.Tensor.cuda = _ORIGINALS.pop("torch.Tensor.cuda")  # type: ignore
        if _MODE is not None:
            _MODE.__exit__(None, None, None)
            _MODE = None
        if "mrandom._get_cuda_rng_state" in _ORIGINALS:
            from megatron.core.tensor_parallel import random as mrandom

            mrandom._get_cuda_rng_state = _ORIGINALS.pop("mrandom._get_cuda_rng_state")
            mrandom._set_cuda_rng_state = _ORIGINALS.pop("mrandom._set_cuda_rng_state")
        _APPLIED = False
