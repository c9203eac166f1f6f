"""A transformers SigLIP folder as the source of a multimodal model's image encoder.

A ``SiglipVisionModel`` folder (model_type ``siglip_vision_model``) or a whole ``SiglipModel``
(``siglip``: its text side, ``logit_scale`` and ``logit_bias`` are ignored) provides the
``vision.encoder`` group and the tower's unused tail: its vision tensors (``vision_model.*``;
a SiglipVisionModel saved by transformers 5 drops that prefix) are the Phi-4-Multimodal image
encoder's ``img_processor.*`` under another prefix, so they load through the same rows of the
mapping table, at any TP/PP layout.

The config part is torch-free (the orchestrator's checks may read it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SIGLIP_TYPES = ("siglip", "siglip_vision_model")
_VISION_PREFIX = "vision_model."
_IGNORED = ("text_model.", "logit_scale", "logit_bias")  # a SiglipModel's other half
# transformers' SiglipVisionConfig defaults: save_pretrained leaves out fields equal to them.
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "patch_size": 16, "image_size": 224,
             "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
# (SigLIP field, VisionConfig field) that must agree.
_MATCH = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
          ("num_attention_heads", "num_heads"), ("patch_size", "patch_size"),
          ("image_size", "image_size"), ("intermediate_size", "intermediate_size"),
          ("layer_norm_eps", "layer_norm_eps"))


def siglip_config(path: str | os.PathLike) -> dict | None:
    """The vision config of a SigLIP folder (defaults filled in), None for another folder."""
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not a SigLIP folder; the usual HF checks report what is wrong
    if not isinstance(cfg, dict) or cfg.get("model_type") not in SIGLIP_TYPES:
        return None
    vc = cfg.get("vision_config") or {} if cfg["model_type"] == "siglip" else cfg
    return {**_DEFAULTS, **vc}


def siglip_mismatch(vc: dict, vision) -> str | None:
    """What differs between a SigLIP vision config and the model's VisionConfig (None: fits)."""
    diff = [f"{ours} {vc[theirs]} != {getattr(vision, ours)}" for theirs, ours in _MATCH
            if vc[theirs] != getattr(vision, ours)]
    diff += [f"{k} {vc[k]!r} != {want!r}" for k, want in
             (("hidden_act", "gelu_pytorch_tanh"), ("num_channels", 3)) if vc[k] != want]
    if vc.get("vision_use_head") is False:  # the tower carries (never runs) the pooling head
        diff.append("vision_use_head false != true")
    return "; ".join(diff) or None


def _rename(key: str) -> tuple[str, None] | None:
    """A SigLIP tensor's key in an HFSource: its Phi4MM name (None: a SiglipModel's other half)."""
    if key.startswith(_IGNORED):
        return None
    from phi4core.interop.hf_mapping import SIGLIP_PREFIX

    return SIGLIP_PREFIX + key.removeprefix(_VISION_PREFIX), None


def load_siglip_weights(chunks, path: str | os.PathLike, model_cfg) -> int:
    """Copy a SigLIP folder into this rank's chunks: the vision encoder (and the tower's unused
    tail), each tensor its TP shard; a rank holding the tower must use every vision tensor
    (a missing or extra one is an error). Raises ConversionError on a config or shape
    mismatch. Returns the number of tensors loaded."""
    from phi4core.interop.hf import ConversionError, HFCheckpoint, check_all_used, load_from_source
    from phi4core.interop.hf_multimodal import HFSource
    from phi4core.module_groups import group_of

    p = Path(path)
    vc = siglip_config(p)
    if vc is None:
        raise ConversionError(f"{p}: not a SigLIP folder (config.json model_type is not one "
                              f"of {', '.join(SIGLIP_TYPES)})")
    if model_cfg.vision is None:
        raise ConversionError(f"{p}: a SigLIP image encoder, but model {model_cfg.name} has "
                              "no vision tower")
    bad = siglip_mismatch(vc, model_cfg.vision)
    if bad:
        raise ConversionError(f"SigLIP config of {p} does not match model {model_cfg.name}'s "
                              f"vision: {bad}")
    source = HFSource(p, model_cfg, backbone_only=False)
    source.add(HFCheckpoint(p), _rename)

    def keep(name: str) -> bool:
        return group_of(name) == "vision.encoder" or name.startswith("vision.unused_tail.")

    loaded = load_from_source(chunks, source, model_cfg, keep)
    if loaded:  # this rank holds the tower
        check_all_used(source, model_cfg)
    return loaded
