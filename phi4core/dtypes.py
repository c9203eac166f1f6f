"""The one map between precision names and torch dtypes.

Recipes and `Precision.params` say fp32 / bf16 / fp16; Hugging Face `config.json` and checkpoint
metadata say float32 / bfloat16 / float16. Both spellings (and torch dtypes) are accepted by
`to_dtype`; `short_name` and `long_name` give each spelling back.
"""

from __future__ import annotations

import torch

_SHORT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LONG = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT_OF = {v: k for k, v in _SHORT.items()}
_LONG_OF = {v: k for k, v in _LONG.items()}
NAMES = tuple(_SHORT) + tuple(_LONG)


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """The dtype of 'fp32', 'float32' or torch.float32 (and of the 16-bit ones)."""
    if isinstance(value, torch.dtype):
        if value not in _SHORT_OF:
            raise ValueError(f"dtype {value} is not one of fp32, bf16, fp16")
        return value
    name = str(value).removeprefix("torch.")
    dtype = _SHORT.get(name) or _LONG.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(NAMES)}")
    return dtype


def short_name(value: str | torch.dtype) -> str:
    """'fp32' | 'bf16' | 'fp16' (the recipe spelling)."""
    return _SHORT_OF[to_dtype(value)]


def long_name(value: str | torch.dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' (the Hugging Face spelling)."""
    return _LONG_OF[to_dtype(value)]
