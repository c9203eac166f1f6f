"""Makes the PyPI torchvision wheel importable beside the CPU torch wheel.

PyPI's torchvision is a CUDA build: its compiled ops (`_C.so`) cannot load beside torch's CPU
wheel, and the package then fails at import while registering fake kernels for two of those
ops (`torchvision::nms`, `torchvision::qnms`). Declaring their schemas first lets it import;
only its pure-torch parts (the v2 transforms the transformers image processors use) are
needed, and the missing ops still raise if anything calls them. Nothing changes where the ops
load (a matching CPU or GPU build). `runtime.init()` installs it: transformers imports
torchvision as soon as it is present (its image utilities do), so without this even
`Phi3ForCausalLM` fails to import in such an environment (the dev extra is one).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS: list = []  # keep the torch.library handles alive


def make_importable() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    for lib in Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return  # the real ops load: nothing to do
        except (OSError, ImportError, RuntimeError):
            break
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        name = schema.split("(")[0]
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _LIBS.append(lib)


class _OnFirstImport(importlib.abc.MetaPathFinder):
    """Applies make_importable() when torchvision is first imported, so that sessions that
    never touch it (orchestrator-only tests) never import torch for it."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            make_importable()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _OnFirstImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _OnFirstImport())
