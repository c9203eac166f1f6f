"""The module groups of a model, defined once: what a recipe may train or freeze, which
parameters each group holds, which stage artifact carries it, and which config section brings
it. The recipe schema and checks, the model (LoRA adapter names, tower attributes), freezing
and `phi4 model-info` all read this table.

Torch-free: the orchestrator imports it at start-up.

A parameter belongs to the first group whose rule matches its name (as
``model.named_parameters()`` spells it; wrappers' ``module.`` prefixes are ignored):

    lora.text         any ``lora_text`` module (a LoRA factor inside a decoder linear: the
                      fine-tuning adapter of a frozen decoder, run in language mode)
    lora.vision       any ``lora_vision`` module
    lora.speech       any ``lora_speech`` module
    vision.encoder    ``vision.encoder.*``, ``vision.embeddings.*`` (the encoder; its patch and
                      position embeddings)
    vision.projector  ``vision.*``          (the rest of the vision tower: separators, projector)
    audio.encoder     ``audio.encoder.*``
    audio.projector   ``audio.*``           (the rest of the audio tower: both projectors)
    backbone          everything else       (the decoder: embeddings, layers, final norm)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModuleGroup:
    name: str
    artifact: str  # the stage artifact kind that carries this group
    config_field: str | None  # the ModelConfig section that brings it (None: always there)
    prefixes: tuple[str, ...] = ()  # parameter names starting with one of these
    module: str | None = None  # or any parameter inside a submodule of this name
    summary: str = ""

    def matches(self, param_name: str) -> bool:
        if self.module is not None:
            return param_name.startswith(f"{self.module}.") or f".{self.module}." in param_name
        if self.prefixes:
            return param_name.startswith(self.prefixes)
        return True


# The artifact of a fine-tuning stage: the LoRA adapters it trains, nothing else (lora.text's
# only home; a multimodal stage training lora.vision may publish it this way too).
ADAPTER_ARTIFACT = "adapter"

# Order matters: the first match wins, so a tower's encoder rule precedes its catch-all, and
# backbone (no rule) comes last in matching while it is listed first for users.
GROUPS: tuple[ModuleGroup, ...] = (
    ModuleGroup("backbone", "model", None, summary="the decoder (Phi-4-Mini)"),
    ModuleGroup("lora.text", ADAPTER_ARTIFACT, "lora_text", module="lora_text",
                summary="LoRA on the decoder's linears for fine-tuning (language mode)"),
    ModuleGroup("lora.vision", "vision", "lora_vision", module="lora_vision",
                summary="LoRA_V on qkv, o, gate_up, down of every layer"),
    ModuleGroup("lora.speech", "speech", "lora_speech", module="lora_speech",
                summary="LoRA_A on qkv, o, gate_up, down of every layer"),
    ModuleGroup("vision.encoder", "vision", "vision",
                prefixes=("vision.encoder.", "vision.embeddings."),
                summary="SigLIP encoder"),
    ModuleGroup("vision.projector", "vision", "vision", prefixes=("vision.",),
                summary="image separators and projector"),
    ModuleGroup("audio.encoder", "speech", "audio", prefixes=("audio.encoder.",),
                summary="conv subsampling, relative bias, conformer blocks"),
    ModuleGroup("audio.projector", "speech", "audio", prefixes=("audio.",),
                summary="the speech and vision+speech projectors"),
)

BY_NAME: dict[str, ModuleGroup] = {g.name: g for g in GROUPS}
GROUP_NAMES: tuple[str, ...] = tuple(g.name for g in GROUPS)
_MATCH_ORDER = tuple(g for g in GROUPS if g.name != "backbone") + (BY_NAME["backbone"],)

# Which module groups each artifact kind carries; a stage's outputs are named after these.
ARTIFACT_GROUPS: dict[str, tuple[str, ...]] = {}
for _g in GROUPS:
    ARTIFACT_GROUPS.setdefault(_g.artifact, ())
    ARTIFACT_GROUPS[_g.artifact] += (_g.name,)


def artifact_groups(artifact: str, model_groups, trainable=None) -> tuple[str, ...]:
    """The groups a stage's output ``artifact`` holds, for a model with ``model_groups``:
    `model` is the whole model (a text model's backbone; every group of a multimodal one),
    `adapter` the LoRA groups the stage trains (``trainable``; all the model's LoRAs when
    None), `vision` / `speech` the groups of ARTIFACT_GROUPS that the model has."""
    if artifact == "model":
        return tuple(model_groups)
    if artifact == ADAPTER_ARTIFACT:
        return tuple(g for g in model_groups if g in LORA_GROUPS
                     and (trainable is None or g in trainable))
    if artifact not in ARTIFACT_GROUPS:
        raise KeyError(f"unknown artifact {artifact!r}; known: {', '.join(ARTIFACT_GROUPS)}")
    return tuple(g for g in model_groups if g in ARTIFACT_GROUPS[artifact])


# The LoRA adapters: adapter name -> its group. The module holding an adapter's factors inside
# a decoder linear is named after the group's rule (`lora_vision`), as is its ModelConfig field.
LORA_ADAPTERS: dict[str, ModuleGroup] = {
    "text": BY_NAME["lora.text"],
    "vision": BY_NAME["lora.vision"],
    "speech": BY_NAME["lora.speech"],
}
LORA_GROUPS: tuple[str, ...] = tuple(g.name for g in LORA_ADAPTERS.values())
ARTIFACT_GROUPS[ADAPTER_ARTIFACT] = LORA_GROUPS  # what it may hold: the stage's trained LoRAs
# The towers: the model attribute holding the tower -> (encoder group, rest-of-tower group).
TOWERS: dict[str, tuple[str, str]] = {
    "vision": ("vision.encoder", "vision.projector"),
    "audio": ("audio.encoder", "audio.projector"),
}


def strip_wrappers(param_name: str) -> str:
    while param_name.startswith("module."):
        param_name = param_name[len("module."):]
    return param_name


def group_of(param_name: str) -> str:
    """The module group of a parameter name (DDP/Float16Module ``module.`` prefixes ignored)."""
    name = strip_wrappers(param_name)
    for group in _MATCH_ORDER:
        if group.matches(name):
            return group.name
    raise AssertionError("backbone matches every name")


def groups_of(model_cfg: Any) -> list[str]:
    """The groups a model with this config has, in table order (``model_cfg`` is a
    phi4core.config.ModelConfig; only its section fields are read)."""
    return [g.name for g in GROUPS
            if g.config_field is None or getattr(model_cfg, g.config_field, None) is not None]
