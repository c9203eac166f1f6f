"""The model of an eval or export stage, assembled from its inputs.

The config is the one a phi4 weights input records (a fine-tuning stage's `adapter` artifact
holds the whole model's config, LoRA adapters included); with none, the first Hugging Face
folder's. Inputs load one at a time, in the recipe's order, each its module groups over what
the earlier ones left: the base model and its adapter, or a released multimodal model and the
fine-tuned adapter that replaces one of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from phi4core.config import InputSpec, ModelConfig, Precision
from phi4core.module_groups import LORA_ADAPTERS, LORA_GROUPS
from phi4core.train.inputs import InputError

log = logging.getLogger("phi4core.finetune")


def model_config(inputs: dict[str, InputSpec]) -> ModelConfig:
    """The model the inputs describe (see the module docstring); InputError if none does."""
    from phi4core.interop.hf import ConversionError, model_config_from_hf, read_hf_config
    from phi4core.model_weights import read_model_config

    for name, inp in inputs.items():
        if inp.source != "hf":
            try:
                return read_model_config(inp.path)
            except (FileNotFoundError, ValueError) as e:
                raise InputError(f"input {name!r}: {e}") from None
    for name, inp in inputs.items():
        try:
            return model_config_from_hf(read_hf_config(inp.path), folder=inp.path)
        except (ConversionError, FileNotFoundError) as e:
            raise InputError(f"input {name!r}: {e}") from None
    raise InputError("no inputs: the stage has no model to work on")


def trained_adapters(mc: ModelConfig, inputs: dict[str, InputSpec]) -> list[str]:
    """The LoRA adapters ('text', 'vision', ...) the phi4 weights inputs bring."""
    from phi4core.model_weights import folder_groups

    groups = {g for inp in inputs.values() if inp.source != "hf"
              for g in folder_groups(inp.path) if g in LORA_GROUPS}
    return [a for a, g in LORA_ADAPTERS.items() if g.name in groups
            and getattr(mc, g.config_field) is not None]


def build(mc: ModelConfig) -> list:
    """This process's model (TP=PP=1): fp32 on a CPU, bf16 on a GPU; eval mode."""
    from phi4core.interop.hf import build_model_for
    from phi4core.parallel import ParallelSettings, init_single_process

    init_single_process()
    params = "bf16" if torch.cuda.is_available() else "fp32"
    chunks = build_model_for(mc, ParallelSettings(), Precision(params=params),
                             parallel_output=False,
                             perform_initialization=False)
    for c in chunks:
        c.eval()
    return chunks


def load(chunks: list, mc: ModelConfig, name: str, inp: InputSpec) -> list[str]:
    """Load one input's module groups into the model (over whatever they held)."""
    from phi4core.train.inputs import load_inputs

    one = SimpleNamespace(model=mc, inputs={name: inp}, trainable=[])
    return load_inputs(one, chunks)[name]  # type: ignore[arg-type]


def tokenizer_dir(inputs: dict[str, InputSpec]) -> Path | None:
    """Where the stage's tokenizer is: a phi4 weights input's tokenizer/ (what the training
    stage used), else an HF input folder holding tokenizer.json."""
    for source in ("stage", "path", "hf"):
        for inp in inputs.values():
            if inp.source != source:
                continue
            folder = Path(inp.path) / ("tokenizer" if source != "hf" else "")
            if (folder / "tokenizer.json").is_file():
                return folder
    return None
