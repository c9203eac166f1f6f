"""`phi4 model-info` backend: parameter counts of a preset, from the real modules on meta.

    >>> model_info("phi4_mini")["total"]
    3836021760

Builds the megatron modules on the meta device (no memory, a fraction of a second once
megatron is imported) in a single-process TP=PP=1 parallel state, which it creates when none
exists. Counts are of unique parameters (tied embeddings count once).
"""

from __future__ import annotations

from typing import Any

from phi4core.config import PRESETS, ModelConfig


def _part(name: str) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("decoder.layers."):
        return "decoder_layers"
    if name.startswith("decoder.final_layernorm."):
        return "final_norm"
    if name.startswith("output_layer."):
        return "output_layer"
    return "other"


def count_parameters(model) -> dict[str, Any]:
    """Counts of a built decoder (any device): per part, per layer, per module group."""
    from phi4core.models.decoder import module_group

    parts = {"embedding": 0, "decoder_layers": 0, "final_norm": 0, "output_layer": 0}
    groups: dict[str, int] = {}
    per_layer: dict[int, int] = {}
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        part = _part(name)
        parts[part] = parts.get(part, 0) + n
        g = module_group(name)
        groups[g] = groups.get(g, 0) + n
        if part == "decoder_layers":
            idx = int(name.split(".")[2])
            per_layer[idx] = per_layer.get(idx, 0) + n
    return {"total": total, "parts": parts, "groups": groups, "per_layer": per_layer}


def model_info(name: str | ModelConfig) -> dict[str, Any]:
    """Total and per-group parameter counts of a preset (name) or a ModelConfig.

    Returns::

        {"name": "phi4_mini", "total": 3836021760,
         "parts": {"embedding": ..., "decoder_layers": ..., "final_norm": ..., "output_layer": 0},
         "per_layer": 100669440, "num_layers": 32,
         "groups": {"backbone": 3836021760},      # module groups a recipe can freeze
         "not_built": [],                          # groups of the preset not counted yet
         "config": {...}}                          # the architecture numbers
    """
    if isinstance(name, ModelConfig):
        cfg = name
    else:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]

    from phi4core.models.decoder import build_meta_model
    from phi4core.parallel import ParallelSettings, ensure_parallel

    par = ensure_parallel()
    if (par.tp, par.pp, par.cp) != (1, 1, 1):
        raise RuntimeError(
            f"model_info counts a whole model: call it where no parallel state exists or it is "
            f"TP=PP=CP=1 (found tp={par.tp}, pp={par.pp}, cp={par.cp})"
        )
    model = build_meta_model(cfg, ParallelSettings())
    counts = count_parameters(model)
    per_layer = sorted(set(counts["per_layer"].values()))
    return {
        "name": cfg.name,
        "total": counts["total"],
        "parts": counts["parts"],
        "per_layer": per_layer[0] if len(per_layer) == 1 else counts["per_layer"],
        "num_layers": cfg.num_layers,
        "groups": counts["groups"],
        # The multimodal towers and adapters are counted once their modules exist.
        "not_built": [g for g in cfg.module_groups if g not in counts["groups"]],
        "config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "ffn_hidden_size": cfg.ffn_hidden_size,
            "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_query_groups": cfg.num_query_groups,
            "kv_channels": cfg.kv_channels,
            "rotary_percent": cfg.rotary_percent,
            "tie_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": (
                cfg.rope_scaling.max_position_embeddings if cfg.rope_scaling else None
            ),
        },
    }
