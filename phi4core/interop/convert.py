"""Conversions between Hugging Face Phi3ForCausalLM folders and phi4 weights, with tokenizers.

`phi4_to_hf` takes any of
- a phi4 weights folder (`phi4_model.json`): a stage's published `model` artifact, the output
  of `hf_to_phi4`;
- a stage folder (`<store>/stages/<name>/<fingerprint>/`): its published `artifacts/model`, or
  without one its newest intact training checkpoint;
- a training checkpoint `checkpoints/step_N` (only the model is read from it);
and copies the tokenizer into the export: the one saved in the weights folder (`tokenizer/`),
else the one the stage trained with (its `spec.json`). What it cannot use is a
`ConversionError` naming the path and what was expected.

Both converters run in one process (creating a TP=PP=1 state when none exists) or collectively
under torchrun with `parallel`; each rank loads only its shard either way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from phi4core import dtypes
from phi4core.config import ModelConfig, Precision, StageSpec
from phi4core.interop.hf import ConversionError, copy_tokenizer
from phi4core.model_weights import META_FILE, read_model_meta

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # inside a phi4 weights folder


@dataclass
class WeightsSource:
    """A folder whose model entries load with `load_model_weights`, and what describes them."""

    folder: Path
    model_config: ModelConfig
    params_dtype: str  # 'float32' | 'bfloat16' | 'float16'
    meta: dict
    tokenizer_dir: Path | None


def _stage_spec(stage_dir: Path) -> StageSpec | None:
    try:
        return StageSpec.model_validate_json((stage_dir / "spec.json").read_text())
    except (OSError, ValueError):
        return None


def _stage_tokenizer(stage_dir: Path) -> Path | None:
    """The tokenizer a stage trained with, from its spec.json (None when unknown)."""
    spec = _stage_spec(stage_dir)
    if spec is None:
        return None
    if spec.tokenizer in (None, "demo"):
        from phi4core.data.tokenizer import get_demo_tokenizer

        cache = Path(os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4")
        return get_demo_tokenizer(cache).path
    return Path(spec.tokenizer) if (Path(spec.tokenizer) / "tokenizer.json").is_file() else None


def _from_resume_checkpoint(step_dir: Path) -> WeightsSource:
    from phi4core.train import resume_checkpoints

    why = resume_checkpoints.problem(step_dir)
    if why is not None:
        raise ConversionError(f"{step_dir}: training checkpoint cannot be used: {why}")
    stage_dir = step_dir.parent.parent
    if (step_dir / META_FILE).is_file():
        meta = read_model_meta(step_dir)
    else:  # written before checkpoints recorded their model: the stage's spec says it
        spec = _stage_spec(stage_dir)
        if spec is None:
            raise ConversionError(f"{step_dir}: no {META_FILE} and no readable stage spec at "
                                  f"{stage_dir / 'spec.json'}: the model config is unknown")
        meta = {"model_config": spec.model.model_dump(mode="json"),
                "params_dtype": dtypes.long_name(spec.precision.params)}
    return _source(step_dir, meta, _stage_tokenizer(stage_dir))


def _source(folder: Path, meta: dict, tokenizer_dir: Path | None) -> WeightsSource:
    try:
        mc = ModelConfig.model_validate(meta["model_config"])
        params = dtypes.long_name(meta.get("params_dtype") or "float32")
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{folder / META_FILE}: not a valid phi4 model record ({exc})"
                              ) from None
    return WeightsSource(folder, mc, params, meta, tokenizer_dir)


def resolve_weights(path: str | os.PathLike) -> WeightsSource:
    """What `phi4_to_hf` reads for `path` (see the module docstring)."""
    from phi4core.train import resume_checkpoints

    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{p}: not a folder (expected a phi4 checkpoint, a stage folder "
                              "or a training checkpoint step_N)")
    if (p / resume_checkpoints.META).is_file() and p.name.startswith("step_"):
        return _from_resume_checkpoint(p)
    if (p / META_FILE).is_file():
        try:
            meta = read_model_meta(p)
        except ValueError as exc:
            raise ConversionError(f"{p / META_FILE}: not valid JSON ({exc})") from None
        own = p / TOKENIZER_DIR
        tokenizer = own if (own / "tokenizer.json").is_file() else _stage_tokenizer(p.parent.parent)
        return _source(p, meta, tokenizer)
    artifact = p / "artifacts" / "model"
    if (artifact / META_FILE).is_file():
        return resolve_weights(artifact)
    if (p / "checkpoints").is_dir():
        newest = resume_checkpoints.newest_intact(p / "checkpoints")
        if newest is not None:
            log.warning("%s has no published model: converting its newest training "
                        "checkpoint %s", p, newest.name)
            return _from_resume_checkpoint(newest)
        raise ConversionError(f"{p}: the stage has no published model and no intact training "
                              "checkpoint")
    raise ConversionError(
        f"{p}: not a phi4 checkpoint (no {META_FILE}), a stage folder (no artifacts/model or "
        "checkpoints/) or a training checkpoint step_N (no meta.json)")


def hf_to_phi4(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    params_dtype: str = "fp32",
    parallel=None,
) -> Path:
    """HF folder -> phi4 weights folder (+ phi4_model.json, + the HF folder's tokenizer files
    under `tokenizer/`). A Phi3ForCausalLM folder gives the decoder; a Phi-4-Multimodal one
    (transformers' with its PEFT adapter folders, or the original phi4mm) the multimodal model
    with its towers and adapters."""
    from phi4core.interop.hf import build_model_for, load_hf_weights
    from phi4core.interop.hf_multimodal import open_hf_source
    from phi4core.model_weights import save_model_weights
    from phi4core.parallel import ensure_parallel

    source = open_hf_source(hf_dir)
    mc = source.model_config
    par = ensure_parallel(parallel)
    chunks = build_model_for(mc, par, Precision(params=dtypes.short_name(params_dtype)),
                             perform_initialization=False)
    load_hf_weights(chunks, hf_dir, mc)
    hf_dtype = dtypes.long_name(source.dtype())

    def add_tokenizer(folder: Path) -> None:
        if (Path(hf_dir) / "tokenizer.json").is_file():
            (folder / TOKENIZER_DIR).mkdir()
            copy_tokenizer(hf_dir, folder / TOKENIZER_DIR)

    return save_model_weights(chunks, out_dir, mc, add_files=add_tokenizer,
                              extra={"source": {"hf_dir": str(hf_dir), "hf_dtype": hf_dtype}})


def phi4_to_hf(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    parallel=None,
    max_shard_bytes: int = 5 * 1024**3,
    merge_adapters: tuple[str, ...] = (),
) -> Path:
    """phi4 weights (see `resolve_weights`) -> HF folder with the tokenizer: a
    Phi3ForCausalLM folder for a decoder, a Phi4MultimodalForCausalLM folder with its
    adapters as PEFT folders (``vision-lora/``, ``speech-lora/``) for a multimodal model.
    ``merge_adapters`` folds those LoRA adapters into the base weights first (their folders
    are then left out). ``dtype`` defaults to the dtype of the HF folder the weights came from
    (a bit-exact round trip), else the parameters' dtype."""
    from phi4core.interop.hf import build_model_for, save_hf
    from phi4core.model_weights import NonFiniteWeights, check_finite, load_model_weights
    from phi4core.models.lora import merge_adapter
    from phi4core.parallel import ensure_parallel

    source = resolve_weights(src)
    par = ensure_parallel(parallel)
    chunks = build_model_for(source.model_config, par,
                             Precision(params=dtypes.short_name(source.params_dtype)),
                             perform_initialization=False)
    load_model_weights(chunks, source.folder, require_meta=False)
    try:
        check_finite(chunks)
    except NonFiniteWeights as exc:
        raise ConversionError(f"{source.folder}: {exc}") from None
    for adapter in merge_adapters:
        try:
            merge_adapter(chunks, adapter)
        except ValueError as exc:
            raise ConversionError(f"{source.folder}: cannot merge: {exc}") from None
    if dtype is None:
        dtype = (source.meta.get("source") or {}).get("hf_dtype") or source.params_dtype
    if source.tokenizer_dir is None:
        log.warning("no tokenizer found for %s: the export has none", src)
    return save_hf(chunks, out_dir, source.model_config, dtype=dtype,
                   max_shard_bytes=max_shard_bytes, tokenizer_dir=source.tokenizer_dir)
