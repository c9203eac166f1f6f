"""Loading a stage's inputs into the freshly built model, by module group.

Each input provides module groups (phi4core.module_groups): a phi4 weights folder the groups
it holds (a text checkpoint: ``backbone``; a `vision` artifact: the vision encoder, separators,
projector and LoRA_V; a `speech` artifact: the audio encoder, projectors and LoRA_A; a whole
multimodal model: all of them), a Hugging Face Phi-3 folder the ``backbone``, a SigLIP folder
(SiglipVisionModel or SiglipModel) the ``vision.encoder``. The model takes
from each input exactly the groups it provides, so a multimodal stage assembles its model from
the backbone and the artifacts of its upstream stages at any TP/PP layout. Two inputs may not
provide the same group; groups no input provides keep their fresh initialisation (logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from phi4core.config import ModelConfig, StageSpec
from phi4core.module_groups import groups_of

log = logging.getLogger("phi4core.train")

_SHAPE_KEYS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
               "num_attention_heads", "num_query_groups", "kv_channels", "tie_embeddings")
# The config sections a group's shapes also depend on (beyond the decoder's _SHAPE_KEYS).
_GROUP_SECTIONS = {"lora.text": ("lora_text",), "lora.vision": ("lora_vision",),
                   "lora.speech": ("lora_speech",),
                   "vision.encoder": ("vision",), "vision.projector": ("vision",),
                   "audio.encoder": ("audio",), "audio.projector": ("audio",)}


class InputError(ValueError):
    """An input that cannot feed this stage (wrong artifact, missing folder, other shapes)."""


def _check_shapes(spec: StageSpec, other: ModelConfig, groups: list[str], where: str) -> None:
    diff = [f"{k}: {getattr(other, k)} != {getattr(spec.model, k)}"
            for k in _SHAPE_KEYS if getattr(other, k) != getattr(spec.model, k)]
    sections = sorted({s for g in groups for s in _GROUP_SECTIONS.get(g, ())})
    diff += [f"{s} differs" for s in sections if getattr(other, s) != getattr(spec.model, s)]
    if diff:
        raise InputError(f"input {where} does not match model {spec.model.name}: "
                         + "; ".join(diff))


def _vocabulary(tokenizer_json: Path) -> tuple:
    """What decides a tokenizer's ids: its model's type, vocabulary and merges and its added
    tokens; not how the file is laid out, nor how a `tokenizers` version writes merges ("a b"
    or ["a", "b"]) or the model's other options."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ValueError("not a tokenizers file (no `model` object)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in model.get("merges") or ()]
    added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or ())
    return model.get("type"), model.get("vocab"), merges, added


def check_input_tokenizers(spec: StageSpec, tokenizer) -> None:
    """Refuse a phi4 checkpoint input that was trained with other token ids than this stage's
    tokenizer gives (its `tokenizer/` folder says which): the stage would train on junk. This
    is what a demo tokenizer cache left by another phi4 version, or a `tokenizer:` pointing at
    another model's folder, would do silently."""
    mine = Path(tokenizer.path) / "tokenizer.json"
    ids = None  # this stage's, read once and only when an input has a tokenizer to compare
    for name, inp in spec.inputs.items():
        if inp.source == "hf" or inp.path is None:
            continue
        theirs = Path(inp.path) / "tokenizer" / "tokenizer.json"
        if not theirs.is_file() or not mine.is_file():
            continue
        try:
            ids = ids or _vocabulary(mine)
            same = _vocabulary(theirs) == ids
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"input {name!r}: cannot read its tokenizer {theirs}: {e}") from None
        if not same:
            raise InputError(
                f"input {name!r} ({inp.path}) was trained with another tokenizer "
                f"({theirs.parent}) than this stage's ({mine.parent}): their token ids differ. "
                "Give the stage the input's tokenizer (`tokenizer: "
                f"{theirs.parent}`), or retrain the input; a demo tokenizer cache from another "
                "phi4 version is rebuilt when its folder (PHI4_CACHE, default ~/.cache/phi4) is "
                "removed")


def provided_groups(spec: StageSpec, name: str, inp) -> list[str]:
    """The module groups of this stage's model that input ``name`` provides."""
    from phi4core.model_weights import folder_groups

    path = Path(inp.path)
    if not path.is_dir():
        raise InputError(f"input {name!r}: {path} is not a folder")
    if inp.source == "hf":
        from phi4core.interop.hf import ConversionError, model_config_from_hf, read_hf_config
        from phi4core.interop.hf_siglip import siglip_config, siglip_mismatch

        # A SigLIP folder: the image encoder; else the groups of the model the folder holds
        # (a Phi-3 folder: the decoder; a Phi-4-Multimodal folder: towers and adapters too).
        siglip = siglip_config(path)
        bad = siglip and spec.model.vision and siglip_mismatch(siglip, spec.model.vision)
        if bad:
            raise InputError(f"input {name!r}: SigLIP config of {path} does not match model "
                             f"{spec.model.name}'s vision: {bad}")
        try:
            have = (["vision.encoder"] if siglip is not None
                    else groups_of(model_config_from_hf(read_hf_config(path), folder=path)))
        except ConversionError as e:
            raise InputError(f"input {name!r}: {e}") from None
    else:
        try:
            have = folder_groups(path)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"input {name!r}: {e}") from None
    mine = groups_of(spec.model)
    groups = [g for g in mine if g in have]
    if not groups:
        raise InputError(f"input {name!r} ({path}) holds the module groups "
                         f"{', '.join(have)}, none of model {spec.model.name}'s "
                         f"({', '.join(mine)})")
    return groups


def plan_inputs(spec: StageSpec) -> dict[str, list[str]]:
    """{input name: the groups it loads}; every group at most once, a frozen input's never
    trainable."""
    plan: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, inp in spec.inputs.items():
        groups = provided_groups(spec, name, inp)
        clash = sorted(g for g in groups if g in owner)
        if clash:
            raise InputError(f"inputs {owner[clash[0]]!r} and {name!r} both provide "
                             f"{', '.join(clash)}: one input per module group")
        trained = sorted(g for g in groups if g in spec.trainable)
        if inp.frozen and trained:
            raise InputError(f"input {name!r} is frozen but provides {', '.join(trained)}, "
                             "listed in `trainable`")
        owner.update({g: name for g in groups})
        plan[name] = groups
    return plan


def load_inputs(spec: StageSpec, chunks: list) -> dict[str, list[str]]:
    """Load each input's groups into `chunks` (collective). Returns {input: groups loaded}."""
    from phi4core.model_weights import MissingGroups, load_model_weights, read_model_config

    plan = plan_inputs(spec)
    whole_model = groups_of(spec.model)
    for name, groups in plan.items():
        inp = spec.inputs[name]
        path = Path(inp.path)
        where = f"{name!r} ({path})"
        if inp.source == "hf" and groups == ["vision.encoder"]:
            from phi4core.interop.hf import ConversionError
            from phi4core.interop.hf_siglip import load_siglip_weights

            try:
                load_siglip_weights(chunks, path, spec.model)
            except ConversionError as e:
                raise InputError(f"input {where}: {e}") from None
        elif inp.source == "hf":
            from phi4core.interop.hf import (
                ConversionError,
                load_hf_weights,
                model_config_from_hf,
                read_hf_config,
            )

            try:
                _check_shapes(spec, model_config_from_hf(read_hf_config(path), folder=path), groups,
                              where)
                load_hf_weights(chunks, path, spec.model)
            except ConversionError as e:
                raise InputError(f"input {where}: {e}") from None
        else:
            _check_shapes(spec, read_model_config(path), groups, where)
            try:
                load_model_weights(chunks, path,
                                   groups=None if groups == whole_model else groups)
            except MissingGroups as e:
                raise InputError(f"input {where}: {e}") from None
        log.info("input %s loaded from %s (%s): %s", name, path, inp.source, ", ".join(groups))
    fresh = [g for g in whole_model if not any(g in gs for gs in plan.values())]
    if fresh:
        log.info("groups no input provides, freshly initialised: %s", ", ".join(fresh))
    return plan
