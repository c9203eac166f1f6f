"""Loading a stage's inputs into the freshly built model: phi4 checkpoints or HF folders."""

from __future__ import annotations

import logging
from pathlib import Path

from phi4core.config import StageSpec

log = logging.getLogger("phi4core.train")

_SHAPE_KEYS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
               "num_attention_heads", "num_query_groups", "kv_channels", "tie_embeddings")


class InputError(ValueError):
    """An input that cannot feed this stage (wrong artifact, missing folder, other shapes)."""


def _check_shapes(spec: StageSpec, other, where: str) -> None:
    diff = [f"{k}: {getattr(other, k)} != {getattr(spec.model, k)}"
            for k in _SHAPE_KEYS if getattr(other, k) != getattr(spec.model, k)]
    if diff:
        raise InputError(f"input {where} does not match model {spec.model.name}: "
                         + "; ".join(diff))


def model_inputs(spec: StageSpec) -> list[tuple[str, object]]:
    """The (name, InputSpec) pairs that initialise the decoder; errors for anything else."""
    found = []
    for name, inp in spec.inputs.items():
        artifact = inp.artifact or "model"
        if artifact != "model":
            raise InputError(f"input {name!r}: artifact {artifact!r} needs multimodal training, "
                             "which is not available yet")
        found.append((name, inp))
    if len(found) > 1:
        raise InputError(f"several model inputs {[n for n, _ in found]}: one decoder, one input")
    return found


def load_inputs(spec: StageSpec, chunks: list) -> list[str]:
    """Load the model input (if any) into `chunks` (collective). Returns what was loaded."""
    from phi4core.model_weights import load_model_weights, read_model_config

    loaded = []
    for name, inp in model_inputs(spec):
        path = Path(inp.path)
        if not path.is_dir():
            raise InputError(f"input {name!r}: {path} is not a folder")
        if inp.source == "hf":
            from phi4core.interop.hf import load_hf_weights, model_config_from_hf, read_hf_config

            _check_shapes(spec, model_config_from_hf(read_hf_config(path)), f"{name!r} ({path})")
            load_hf_weights(chunks, path, spec.model)
        else:
            _check_shapes(spec, read_model_config(path), f"{name!r} ({path})")
            load_model_weights(chunks, path)
        log.info("input %s loaded from %s (%s)", name, path, inp.source)
        loaded.append(name)
    return loaded
