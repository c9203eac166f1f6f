"""The recipe language: what one stage is, and what a pipeline of stages is.

Shapes only; relations between fields (tp dividing heads, inputs naming real stages) are in
`checks.py` so that each problem can point at the exact field it concerns.

Every pattern validates with `fullmatch` (`$` would accept a trailing newline), so a name
that reaches a store folder, an environment variable or an `#SBATCH` line is exactly what
the pattern says. Annotations are evaluated as written (no `from __future__ import
annotations`): pydantic would otherwise compile every field's annotation string at import.
"""

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from phi4core.config import (
    Data,
    Evaluate,
    Logging,
    LoraConfig,
    Parallel,
    Precision,
    Strict,
    Train,
)
from phi4core.module_groups import GROUP_NAMES, LORA_ADAPTERS

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names become store folders (with a fingerprint beside them) and Slurm job names.
MAX_NAME_CHARS = 64
# Variables phi4 sets for every stage (PHI4_STAGE_DIR, PHI4_INPUT_<NAME>, ...) and reads.
RESERVED_ENV_PREFIX = "PHI4_"

# Module groups a recipe can freeze or train (entries may be globs over these: `lora.*`, `*`),
# and the groups each artifact kind carries: one table, in phi4core.module_groups.
MODULE_GROUPS = GROUP_NAMES


def is_identifier(value: str) -> bool:
    return _IDENTIFIER.fullmatch(value) is not None


def _identifier(value: str, what: str) -> str:
    if not is_identifier(value):
        raise ValueError(
            f"{what} must be an identifier (letters, digits, underscores; no dots, slashes, "
            "spaces or newlines)"
        )
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} must be at most {MAX_NAME_CHARS} characters")
    return value


def check_env_names(env: dict[str, str]) -> dict[str, str]:
    """Environment variable names that a shell `export` accepts as they are, outside the
    PHI4_ names phi4 sets itself (a recipe must not redirect PHI4_OUTPUT_DIR, say)."""
    for key in env:
        if not is_identifier(key):
            raise ValueError(f"environment variable name {key!r} is not valid")
        if key.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"{key} is reserved: phi4 sets the {RESERVED_ENV_PREFIX}* "
                             "variables of a stage itself")
    return env


class Input(Strict):
    """Where a stage's weights come from: an upstream stage, a checkpoint folder, or an HF
    folder."""

    stage: str | None = None
    artifact: str | None = None
    path: str | None = None
    hf: str | None = None
    frozen: bool = False
    dependency: Literal["afterok", "afterany"] | None = Field(
        default=None, description="Slurm dependency type for this edge (cluster default if unset)"
    )

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "a stage name")

    @field_validator("artifact")
    @classmethod
    def _artifact(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "an artifact name")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [k for k in ("stage", "path", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "an input needs exactly one of {stage, artifact}, {path} or {hf}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.stage is not None and self.artifact is None:
            raise ValueError(
                "an input from a stage needs `artifact:` (one of that stage's outputs)"
            )
        if self.stage is None and self.artifact is not None:
            raise ValueError("`artifact:` only goes with `stage:`")
        return self


class ModelRef(Strict):
    preset: str = Field(description="phi4_mini or phi4_multimodal")
    size: Literal["full", "tiny"] = "full"
    lora: dict[str, LoraConfig] = Field(
        default_factory=dict,
        description="LoRA adapters by name (text: the fine-tuning adapter, trained as "
                    "lora.text; vision, speech: replace the preset's), each rank, alpha, "
                    "dropout and targets")

    @field_validator("lora")
    @classmethod
    def _adapters(cls, value: dict[str, LoraConfig]) -> dict[str, LoraConfig]:
        unknown = sorted(set(value) - set(LORA_ADAPTERS))
        if unknown:
            raise ValueError(f"unknown LoRA adapter {unknown[0]!r}; known: "
                             f"{', '.join(LORA_ADAPTERS)}")
        return value


# Defaults of `resources.gpus_per_node`: a train stage fills a node; a command stage (data
# preparation, evaluation, conversion) is one process without a GPU unless it asks.
DEFAULT_GPUS = {"train": 8, "command": 0, "eval": 1, "export": 0}
# Stages that train nothing: the recipe's training fields do not apply, nor do a profile's.
NON_TRAIN_KINDS = ("command", "eval", "export")


class Resources(Strict):
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=DEFAULT_GPUS["train"], ge=0,
                               description="0: CPU processes (tests, demo); command stages: 0")
    procs_per_node: int | None = Field(
        default=None, ge=1, description="CPU only: processes per node when gpus_per_node is 0"
    )
    time: str = Field(default="04:00:00", description="[D-]HH:MM:SS")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", value):
            raise ValueError("time must look like HH:MM:SS or D-HH:MM:SS")
        return value

    @property
    def world_size(self) -> int:
        per_node = self.gpus_per_node or self.procs_per_node or 1
        return self.nodes * per_node


class Recipe(Strict):
    name: str
    description: str = ""
    kind: Literal["train", "command", "eval", "export"] = "train"
    model: ModelRef | None = None
    tokenizer: str | None = Field(default=None, description="folder with tokenizer.json, or 'demo'")
    inputs: dict[str, Input] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list)
    trainable: list[str] = Field(default_factory=list)
    frozen: list[str] = Field(default_factory=list)
    data: Data | None = None
    train: Train | None = None
    parallel: Parallel = Field(default_factory=Parallel)
    precision: Precision = Field(default_factory=Precision)
    resources: Resources = Field(default_factory=Resources)
    logging: Logging = Field(default_factory=Logging)
    cmd: list[str] | None = Field(default=None, description="command stages: argv to run")
    evaluate: Evaluate | None = Field(default=None, description="eval stages: what to measure")
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: object) -> object:
        """A stage that says nothing of GPUs gets its kind's default (see DEFAULT_GPUS)."""
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind in NON_TRAIN_KINDS:
            resources = data.get("resources", {})
            if isinstance(resources, dict) and "gpus_per_node" not in resources:
                return {**data, "resources": {**resources,
                                              "gpus_per_node": DEFAULT_GPUS[kind]}}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _identifier(value, "a stage name")

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: list[str]) -> list[str]:
        for item in value:
            _identifier(item, "an output name")
        if len(set(value)) != len(value):
            raise ValueError("outputs are listed twice")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, Input]) -> dict[str, Input]:
        seen: dict[str, str] = {}
        for key in value:
            _identifier(key, "an input name")
            other = seen.setdefault(key.upper(), key)
            if other != key:
                raise ValueError(f"inputs {other!r} and {key!r} differ only in case: both "
                                 f"would be PHI4_INPUT_{key.upper()}")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env_names(value)


class StageEntry(Strict):
    recipe: str
    overrides: dict = Field(default_factory=dict, description="merged over the recipe")


class Pipeline(Strict):
    name: str
    description: str = ""
    overrides: dict = Field(default_factory=dict, description="merged over every stage")
    stages: list[StageEntry] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _paths_are_entries(cls, value: object) -> object:
        """`- path.yaml` is short for `- {recipe: path.yaml}` (one error per bad entry)."""
        if isinstance(value, list):
            return [{"recipe": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _identifier(value, "a pipeline name")
