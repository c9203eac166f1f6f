"""`phi4 model-info` backend: parameter counts of a preset, from the real modules on meta.

    >>> model_info("phi4_mini")["total"]
    3836021760

Builds the megatron modules on the meta device (no memory, a fraction of a second once
megatron is imported) in a single-process TP=PP=1 parallel state, which it creates when none
exists. A multimodal preset is built as the multimodal model: the decoder, its LoRA adapters
and the towers whose modules exist (phi4core.models.multimodal.default_tower_builders); a group
without modules yet is listed under `not_built`, never given a number. Counts are of unique
parameters (tied embeddings count once).
"""

from __future__ import annotations

from typing import Any

from phi4core.config import PRESETS, ModelConfig
from phi4core.module_groups import BY_NAME, LORA_ADAPTERS, TOWERS, group_of, groups_of


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


def _unique(named):
    seen: set[int] = set()
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def count_parameters(model) -> dict[str, Any]:
    """Counts of a built model (any device): total, per module group, and the backbone's
    parts and per-layer counts."""
    parts = {"embedding": 0, "decoder_layers": 0, "final_norm": 0, "output_layer": 0}
    groups: dict[str, int] = {}
    per_layer: dict[int, int] = {}
    total = 0
    for name, p in _unique(model.named_parameters(remove_duplicate=False)):
        n = p.numel()
        total += n
        g = group_of(name)
        groups[g] = groups.get(g, 0) + n
        if g != "backbone":
            continue
        part = _part(name)
        parts[part] = parts.get(part, 0) + n
        if part == "decoder_layers":
            idx = int(name.split(".")[2])
            per_layer[idx] = per_layer.get(idx, 0) + n
    return {"total": total, "parts": parts, "groups": groups, "per_layer": per_layer}


def parameter_rows(model, groups: dict[str, int]) -> list[dict[str, Any]]:
    """The rows of the reference table, each counted from its modules: the backbone, each
    tower's rows (its ``parameter_counts()`` where it has one: {row: count}, which may count
    checkpoint tensors that are not trained, as SigLIP's unused tail; else its two groups),
    each adapter."""
    rows = [{"name": "backbone", "group": "backbone", "parameters": groups.get("backbone", 0),
             "what": BY_NAME["backbone"].summary}]
    for tower, (encoder_group, rest_group) in TOWERS.items():
        module = getattr(model, tower, None)
        if module is None:
            continue
        if hasattr(module, "parameter_counts"):
            for name, count in module.parameter_counts().items():
                rows.append({"name": f"{tower}.{name}", "group": tower,
                             "parameters": int(count)})
        else:
            for group in (encoder_group, rest_group):
                rows.append({"name": group, "group": group,
                             "parameters": groups.get(group, 0),
                             "what": BY_NAME[group].summary})
    for group in LORA_ADAPTERS.values():
        if group.name in groups:
            rows.append({"name": group.name, "group": group.name,
                         "parameters": groups[group.name], "what": group.summary})
    return rows


def _is_multimodal(cfg: ModelConfig) -> bool:
    return any(g not in ("backbone", "lora.text") for g in groups_of(cfg))


def model_info(name: str | ModelConfig, towers: dict | None = None) -> dict[str, Any]:
    """Total, per-group and per-row parameter counts of a preset (name) or a ModelConfig;
    ``towers`` (tower builders) defaults to the towers whose modules exist.

    Returns::

        {"name": "phi4_mini", "total": 3836021760,
         "parts": {"embedding": ..., "decoder_layers": ..., "final_norm": ..., "output_layer": 0},
         "per_layer": 100669440, "num_layers": 32,      # the backbone's
         "groups": {"backbone": 3836021760},             # trainable parameters per group
         "rows": [{"name": "backbone", "group": "backbone", "parameters": ...}, ...],
         "not_built": [],                                # groups without modules yet
         "config": {...}}                                # the architecture numbers
    """
    if isinstance(name, ModelConfig):
        cfg = name
    else:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]

    from phi4core.parallel import ParallelSettings, ensure_parallel

    par = ensure_parallel()
    if (par.tp, par.pp, par.cp) != (1, 1, 1):
        raise RuntimeError(
            f"model_info counts a whole model: call it where no parallel state exists or it is "
            f"TP=PP=CP=1 (found tp={par.tp}, pp={par.pp}, cp={par.cp})"
        )
    if _is_multimodal(cfg):
        from phi4core.models.multimodal import build_meta_multimodal_model

        model = build_meta_multimodal_model(cfg, ParallelSettings(), towers=towers)
    else:
        from phi4core.models.decoder import build_meta_model

        model = build_meta_model(cfg, ParallelSettings())
    counts = count_parameters(model)
    per_layer = sorted(set(counts["per_layer"].values()))
    rows = parameter_rows(model, counts["groups"])
    return {
        "name": cfg.name,
        # the rows partition the checkpoint: the parameters, and any tensor a tower keeps
        # without training it (then more than the sum of the groups)
        "total": sum(r["parameters"] for r in rows),
        "parts": counts["parts"],
        "per_layer": per_layer[0] if len(per_layer) == 1 else counts["per_layer"],
        "num_layers": cfg.num_layers,
        "groups": counts["groups"],
        "rows": rows,
        "not_built": [g for g in groups_of(cfg) if g not in counts["groups"]],
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
            "lora": {a: (getattr(cfg, g.module).model_dump()
                         if getattr(cfg, g.module) is not None else None)
                     for a, g in LORA_ADAPTERS.items()},
        },
    }
