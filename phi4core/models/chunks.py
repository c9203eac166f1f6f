"""A model as megatron passes it around: one module or a list of virtual-pipeline chunks, each
possibly inside wrappers (DDP, Float16Module) that hold the decoder as `.module`."""

from __future__ import annotations


def as_chunks(model_or_chunks) -> list:
    """A list of chunks, from one module or a list/tuple of them."""
    if isinstance(model_or_chunks, (list, tuple)):
        return list(model_or_chunks)
    return [model_or_chunks]


def unwrap(module):
    """The decoder inside any number of wrappers (the first object with a `decoder`)."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module
