"""Model presets and the stage spec: the one contract between the orchestrator and the trainer.

This module must stay importable without torch or megatron: the orchestrator's CLI imports it
to validate recipes (tp dividing heads, pp dividing layers) in well under a second. Annotations
are evaluated as written (no `from __future__ import annotations`): pydantic would otherwise
compile every field's annotation string when the models are defined.
"""

import copy
import math
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phi4core.module_groups import groups_of

INT64_MAX = 2**63 - 1


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -INT64_MAX - 1 <= value <= INT64_MAX
    if isinstance(value, (list, tuple)):
        return any(_has_huge_int(v) for v in value)
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    return False


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, never silently ignored; every
    float is finite (NaN and infinities are refused) and every integer fits in 64 bits, the
    limits of the C, torch and JSON code the values reach."""

    # defer_build: a model's validator is built when it first validates, not at import, so
    # the CLI pays only for the models a command uses (validate never builds StageSpec).
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False,
                              defer_build=True)

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        if _has_huge_int(value):
            raise ValueError("integer out of range: must fit in 64 bits")
        return value


# --------------------------------------------------------------------------------------------
# Model presets
# --------------------------------------------------------------------------------------------


class LongRopeConfig(Strict):
    """LongRoPE as Phi-3/Phi-4 ship it: per-frequency rescale factors chosen by sequence length."""

    short_factor: list[float]
    long_factor: list[float]
    original_max_position_embeddings: int
    max_position_embeddings: int

    @property
    def attention_factor(self) -> float:
        """sqrt(1 + ln(max/original) / ln(original)): scales cos/sin once contexts are extended."""
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoraConfig(Strict):
    rank: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Decoder linears the adapter wraps, named as in the HF checkpoint.
    targets: list[str] = Field(default=list(LORA_TARGETS), min_length=1)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; known: {', '.join(LORA_TARGETS)}")
        if len(set(value)) != len(value):
            raise ValueError("a LoRA target is listed twice")
        return value


class VisionConfig(Strict):
    """SigLIP tower, dynamic multi-crop (HD transform), 2x2 token compression and the 2-layer
    projector. `num_layers` counts every layer of the checkpoint; features come from
    `hidden_states[feature_layer]`, so the layers after it (and the post-layernorm and pooling
    head) are carried but never run."""

    num_layers: int = Field(ge=2)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    image_size: int = Field(gt=0, description="side of a square crop in pixels (448)")
    layer_norm_eps: float = 1e-6
    feature_layer: int = Field(default=-2, lt=0, description="hidden_states index, from the end")
    max_crops: int = Field(default=36, gt=0, description="the processor's dynamic_hd")
    pool: int = 2  # AvgPool2d(2,2): 32x32 patches -> 16x16 tokens per crop

    @model_validator(mode="after")
    def _check_vision(self) -> Self:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % self.pool:
            raise ValueError(f"vision image_size ({self.image_size}) must be a whole number of "
                             f"patches ({self.patch_size} px), a multiple of pool ({self.pool})")
        if -self.feature_layer > self.num_layers + 1:
            raise ValueError(f"vision feature_layer {self.feature_layer} is outside the "
                             f"{self.num_layers + 1} hidden states")
        return self

    @property
    def used_layers(self) -> int:
        """Layers that run: hidden_states has num_layers + 1 entries (the embeddings first)."""
        return self.num_layers + 1 + self.feature_layer


class AudioConfig(Strict):
    """Conv subsampling + conformer encoder over 80-bin log-Mel features, and its projectors."""

    num_mel_bins: int = 80
    conv_channels: int = Field(gt=0)
    time_reduction: int = 8
    num_blocks: int = Field(gt=0)
    attention_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    conv_kernel: int = Field(default=3, gt=0)
    relative_attention_max_distance: int = Field(default=500, gt=0)
    chunk_frames: int = Field(default=500, gt=0, description="longer inputs (after "
                              "subsampling) run as independent chunks of this many frames")

    @model_validator(mode="after")
    def _check_audio(self) -> Self:
        if self.attention_dim % self.num_heads:
            raise ValueError(f"audio attention_dim ({self.attention_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.time_reduction < 2 or self.time_reduction & (self.time_reduction - 1):
            raise ValueError(f"audio time_reduction ({self.time_reduction}) must be a power of 2")
        return self


class ModelConfig(Strict):
    """Phi-3-family decoder (Phi-4-Mini), optionally with the Phi-4-Multimodal towers and LoRAs."""

    name: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    rotary_percent: float = 0.75
    rotary_base: float = 10000.0
    rope_scaling: LongRopeConfig | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int = 199999
    eos_token_id: int = 199999
    pad_token_id: int = 199999
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    lora_text: LoraConfig | None = None  # fine-tuning adapter of the decoder (language mode)
    lora_vision: LoraConfig | None = None
    lora_speech: LoraConfig | None = None
    image_token_id: int | None = None
    audio_token_id: int | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.rope_scaling is not None:
            pairs = int(self.kv_channels * self.rotary_percent) // 2
            for which in ("short_factor", "long_factor"):
                got = len(getattr(self.rope_scaling, which))
                if got != pairs:
                    raise ValueError(f"rope_scaling.{which} needs {pairs} entries (got {got})")
        return self

    @property
    def module_groups(self) -> list[str]:
        """Names a recipe may freeze or train (the table in phi4core.module_groups)."""
        return groups_of(self)


# The released Phi-4-mini LongRoPE factors (config.json of Phi-4-mini-instruct), 48 each.
PHI4_MINI_SHORT_FACTOR: list[float] = [
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
]
PHI4_MINI_LONG_FACTOR: list[float] = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687,
    4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894,
    8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884,
    32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97,
    33.28, 33.49, 33.5, 44.16, 47.77,
]

# Presets are built on first use, not at import: the CLI imports this module for every
# command, and validating four ModelConfigs (building the pydantic validators behind them)
# would cost more than the rest of `phi4 validate`. Values are plain dicts here; `_Presets`
# assembles them with `model_construct` (no validation: a test checks that every preset
# validates to an equal model).
_PHI4_MINI: dict[str, Any] = dict(
    vocab_size=200064,
    hidden_size=3072,
    ffn_hidden_size=8192,
    num_layers=32,
    num_attention_heads=24,
    num_query_groups=8,
    kv_channels=128,
    rope_scaling=dict(
        short_factor=PHI4_MINI_SHORT_FACTOR,
        long_factor=PHI4_MINI_LONG_FACTOR,
        original_max_position_embeddings=4096,
        max_position_embeddings=131072,
    ),
)

# Tiny: still GQA 3:1, partial rotary 0.75, tied embeddings; LongRoPE with an original context
# of 64 so that sequences of the tiny profile exercise the long factors.
_TINY_HEAD = 16
_TINY_PAIRS = int(_TINY_HEAD * 0.75) // 2
_PHI4_MINI_TINY: dict[str, Any] = dict(
    vocab_size=1024,  # the demo tokenizer's (phi4core.data.tokenizer.DEMO_VOCAB_SIZE)
    hidden_size=96,
    ffn_hidden_size=256,
    num_layers=2,
    num_attention_heads=6,
    num_query_groups=2,
    kv_channels=_TINY_HEAD,
    rope_scaling=dict(
        short_factor=[1.0 + 0.05 * i for i in range(_TINY_PAIRS)],
        long_factor=[1.0 + 0.75 * i for i in range(_TINY_PAIRS)],
        original_max_position_embeddings=64,
        max_position_embeddings=1024,
    ),
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_MM_FULL: dict[str, Any] = dict(
    vision=dict(
        num_layers=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
        patch_size=14, image_size=448,
    ),
    audio=dict(
        conv_channels=1024, num_blocks=24, attention_dim=1024, num_heads=16, ffn_dim=1536,
    ),
    lora_vision=dict(rank=256, alpha=512, dropout=0.0),
    lora_speech=dict(rank=320, alpha=640, dropout=0.01),
    image_token_id=200010,
    audio_token_id=200011,
)

_MM_TINY: dict[str, Any] = dict(
    # The released HD transform on 112-pixel crops of 14-pixel patches: an image of 1-4 crops
    # takes 31-93 tokens (at 448 pixels, 341-1329), which the 2-layer backbone, trained on
    # 128-token text, reads; and the tower costs a sixteenth.
    vision=dict(
        num_layers=3, hidden_size=32, intermediate_size=64, num_heads=2,
        patch_size=14, image_size=112,
    ),
    audio=dict(
        conv_channels=32, num_blocks=2, attention_dim=32, num_heads=2, ffn_dim=64,
        relative_attention_max_distance=16,
    ),
    lora_vision=dict(rank=4, alpha=8, dropout=0.0),
    lora_speech=dict(rank=4, alpha=8, dropout=0.0),
    image_token_id=10,
    audio_token_id=11,
)

_PRESET_VALUES: dict[str, tuple[dict[str, Any], ...]] = {
    "phi4_mini": (_PHI4_MINI,),
    "phi4_mini_tiny": (_PHI4_MINI_TINY,),
    "phi4_multimodal": (_PHI4_MINI, _MM_FULL),
    "phi4_multimodal_tiny": (_PHI4_MINI_TINY, _MM_TINY),
}


_PRESET_SECTIONS: dict[str, type[Strict]] = {
    "rope_scaling": LongRopeConfig, "vision": VisionConfig, "audio": AudioConfig,
    "lora_text": LoraConfig, "lora_vision": LoraConfig, "lora_speech": LoraConfig,
}


class _Presets(Mapping[str, ModelConfig]):
    """The model presets by name, each validated the first time it is asked for and then
    shared (as the module-level dict of instances it replaces was)."""

    def __init__(self) -> None:
        self._built: dict[str, ModelConfig] = {}

    def __getitem__(self, name: str) -> ModelConfig:
        built = self._built.get(name)
        if built is None:
            parts = _PRESET_VALUES[name]  # KeyError for an unknown name, as a dict gives
            values = copy.deepcopy({k: v for part in parts for k, v in part.items()})
            for key, model in _PRESET_SECTIONS.items():
                if key in values:
                    values[key] = model.model_construct(**values[key])
            built = self._built[name] = ModelConfig.model_construct(name=name, **values)
        return built

    def __iter__(self) -> Iterator[str]:
        return iter(_PRESET_VALUES)

    def __len__(self) -> int:
        return len(_PRESET_VALUES)

    def __contains__(self, name: object) -> bool:
        return name in _PRESET_VALUES


PRESETS: Mapping[str, ModelConfig] = _Presets()


def preset(name: str, size: str = "full") -> ModelConfig:
    """The preset `name`, or its `_tiny` variant when size is 'tiny'."""
    key = name if size == "full" else f"{name}_{size}"
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {key!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


# --------------------------------------------------------------------------------------------
# Training sections shared by recipes (orchestrator) and the stage spec (trainer)
# --------------------------------------------------------------------------------------------


class ScalingLaw(Strict):
    """LR* = B * D^exponent, D the stage's token budget (Phi-4-Mini: exponent -0.32)."""

    B: float = Field(gt=0)
    exponent: float = -0.32

    def lr_for(self, tokens: float) -> float:
        return self.B * tokens**self.exponent


class LearningRate(Strict):
    scaling_law: ScalingLaw


_Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's decay rates: 1 would never forget


class Train(Strict):
    steps: int | None = Field(default=None, gt=0)
    tokens: float | None = Field(default=None, gt=0, description="token budget; steps derived")
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    seq_length: int = Field(gt=0)
    lr: Annotated[float, Field(gt=0)] | LearningRate
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine", "wsd", "linear"] = "cosine"
    decay_fraction: float = Field(default=0.1, gt=0, le=1, description="wsd: final decay share")
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[_Beta, _Beta] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    save_interval: int = Field(default=1000, gt=0)
    keep_last: int = Field(default=2, gt=0)
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="numpy's range")
    max_skipped_steps: int = Field(
        default=25, ge=0,
        description="optimizer steps skipped in a row (loss or gradients not finite, fp16 "
                    "overflow) before the stage fails; fp16's loss scale skips some at the start")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return max(1, math.ceil(self.tokens / self.tokens_per_step))

    @property
    def total_tokens(self) -> float:
        if self.tokens is not None:
            return self.tokens
        return float(self.total_steps * self.tokens_per_step)

    @property
    def peak_lr(self) -> float:
        if isinstance(self.lr, LearningRate):
            return self.lr.scaling_law.lr_for(self.total_tokens)
        return self.lr


class Parallel(Strict):
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    vpp: int | None = Field(default=None, ge=1, description="virtual stages per pipeline rank")
    cp: int = Field(default=1, ge=1)
    sequence_parallel: bool = False
    pp_layers: list[int] | None = Field(default=None, description="uneven split: layers per stage")
    recompute: Literal["none", "selective", "full"] = Field(
        default="none",
        description="activation recomputation in the decoder layers (megatron-core's "
                    "recompute_granularity): selective recomputes core attention, full every "
                    "layer from its input; same results, less memory, more compute")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


class Precision(Strict):
    """Numeric precision, from the recipe to the model builder (one type all the way).
    `fp8`: hybrid (Transformer Engine's Format.HYBRID: e4m3 forward, e5m2 gradients) or e4m3
    everywhere; `fp8_recipe`: delayed (amax history), tensorwise (current scaling) or mxfp8
    (block scaling)."""

    params: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Literal["off", "hybrid", "e4m3"] = "off"
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8"] = "delayed"
    amax_history: int = Field(default=1024, ge=1)
    amax_compute: Literal["max", "most_recent"] = "max"


class DataSource(Strict):
    """One source of a stage's data mixture, sampled in proportion to `weight`."""

    kind: Literal["indexed", "text_jsonl", "chat_jsonl", "webdataset", "lhotse", "synthetic"]
    path: str | None = Field(default=None, description="file, folder, prefix or shard pattern")
    weight: float = Field(default=1.0, gt=0)
    modality: Literal["text", "chat", "image", "audio", "image_audio", "speech"] | None = Field(
        default=None, description="synthetic sources: what to generate"
    )
    samples: int | None = Field(default=None, gt=0, description="synthetic sources: how many")
    task: Literal["asr", "translate", "qa", "summarize"] | None = Field(
        default=None, description="lhotse sources: the chat each clip becomes (default asr)")
    max_clip_seconds: float | None = Field(
        default=None, gt=0, description="lhotse sources: longer clips are skipped (default 1800)")
    max_duration: float | None = Field(
        default=None, gt=0,
        description="lhotse sources: seconds of audio per duration bucket's batch (default 3600)")

    @model_validator(mode="after")
    def _source_named(self) -> Self:
        if self.kind == "synthetic":
            if self.modality is None:
                raise ValueError("a synthetic source needs `modality:`")
        elif self.path is None:
            raise ValueError(f"a {self.kind} source needs `path:`")
        if self.kind == "webdataset" and re.search(r"\{[^}]*\.\.[^}]*\}|\.tar$", self.path):
            raise ValueError(f"{self.path!r} is a shard pattern; a webdataset source names the "
                             "energon dataset folder that holds the shards (build one with "
                             "`phi4 data pack-images` or `energon prepare`)")
        speech_only = [k for k in ("task", "max_clip_seconds", "max_duration")
                       if getattr(self, k) is not None]
        if speech_only and self.kind != "lhotse":
            raise ValueError(f"{', '.join(speech_only)}: only for lhotse sources, not "
                             f"{self.kind}")
        if (self.max_clip_seconds or 0) > (self.max_duration or float("inf")):
            raise ValueError(f"max_clip_seconds ({self.max_clip_seconds}) exceeds max_duration "
                             f"({self.max_duration}): such a clip fits no batch")
        return self


class Data(Strict):
    sources: list[DataSource] = Field(min_length=1)
    on_bad_record: Literal["skip", "fail"] = "skip"
    num_workers: int = Field(default=0, ge=0, le=64,
                             description="loader processes reading batches ahead (0: none)")


class WandbLogging(Strict):
    """Weights & Biases (`pip install 'phi4[trackers]'`). `mode: offline` writes the run under
    the stage folder (`wandb/`) for a later `wandb sync`."""

    project: str = "phi4"
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"


class MlflowLogging(Strict):
    """MLflow (`pip install 'phi4[trackers]'`): a tracking server's URI, or a local store
    (`file:/path/mlruns`); unset: MLflow's own default ($MLFLOW_TRACKING_URI)."""

    tracking_uri: str | None = None
    experiment: str = "phi4"


class Logging(Strict):
    """How a run reports; never part of a stage's fingerprint. W&B and MLflow are off unless
    their section is given (here or in the cluster file, whose values the recipe's override)."""

    interval: int = Field(default=10, ge=1)
    tensorboard: bool = True
    wandb: WandbLogging | None = None
    mlflow: MlflowLogging | None = None


class TrackerRun(Strict):
    """What the orchestrator tells the trackers about a stage: the run's name
    (`<pipeline>.<stage>.<fingerprint>`) and tags with its lineage."""

    name: str
    tags: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The stage spec: everything the trainer needs, resolved, in one JSON file
# --------------------------------------------------------------------------------------------


class InputSpec(Strict):
    """A resolved input: a folder on disk and what it holds."""

    source: Literal["stage", "path", "hf"]
    path: str
    artifact: str | None = None  # for store inputs: model | vision | speech
    frozen: bool = False


class StageSpec(Strict):
    """What `python -m phi4core train SPEC.json` runs. Written by the orchestrator."""

    name: str
    fingerprint: str
    model: ModelConfig
    tokenizer: str | None = None
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    outputs: list[str]
    trainable: list[str]  # module groups, globs expanded
    frozen: list[str]
    data: Data
    train: Train
    parallel: Parallel
    precision: Precision
    logging: Logging = Field(default_factory=Logging)
    run: TrackerRun | None = None  # for W&B / MLflow; None: named after the stage
    world_size: int = 1
    stage_dir: str  # logs, metrics, checkpoints/
    output_dir: str  # artifacts/<name>/ are written here, then published by the orchestrator


# --------------------------------------------------------------------------------------------
# Evaluation and export stages (`kind: eval`, `kind: export`): no training, one process
# --------------------------------------------------------------------------------------------


class EvalTask(Strict):
    """A small scored set, a JSONL of chat records whose last turn is the user's:
    `multiple_choice` records add `choices` (assistant replies) and `answer` (the right one's
    index), scored by the likelihood of each reply; `exact_match` records add `answer`, the
    reply greedy decoding must produce exactly (then `<|end|>`)."""

    name: str = Field(pattern=r"[A-Za-z_][A-Za-z0-9_]*")
    kind: Literal["multiple_choice", "exact_match"]
    path: str


# The sources an eval stage's `heldout_images` may name (phi4core.finetune.image_heldout).
IMAGE_HELDOUT_KINDS = ("webdataset", "synthetic", "chat_jsonl")


class Evaluate(Strict):
    """What an eval stage measures, for the base model and the trained one side by side."""

    heldout: str | None = Field(default=None, description="chat JSONL: held-out loss and "
                                "perplexity on its assistant tokens")
    heldout_images: list[DataSource] = Field(
        default_factory=list, description="image-text sources, read as a vision stage reads "
        "them (webdataset; synthetic image; chat_jsonl of records with `images`): held-out "
        "loss and perplexity on their assistant tokens, in vision mode")
    tasks: list[EvalTask] = Field(default_factory=list)
    base: list[str] | None = Field(
        default=None, description="the inputs the base model is made of (default: the frozen "
                                  "ones); the trained model loads every input, in order, later "
                                  "ones over earlier ones")
    seq_length: int = Field(default=2048, gt=0)
    max_samples: int = Field(default=1000, gt=0, description="per set, from its start")

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.heldout is None and not self.tasks and not self.heldout_images:
            raise ValueError("`evaluate` needs `heldout:` (a chat JSONL), `heldout_images:` "
                             "(image-text sources), `tasks:`, or several")
        for i, s in enumerate(self.heldout_images):
            if s.kind not in IMAGE_HELDOUT_KINDS or (s.kind == "synthetic"
                                                     and s.modality != "image"):
                what = s.kind if s.kind != "synthetic" else f"synthetic {s.modality}"
                raise ValueError(f"heldout_images[{i}] ({what}): an image-text held-out set is "
                                 "a webdataset (`phi4 data pack-images`), a synthetic image "
                                 "source, or a chat_jsonl of records with `images`")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("two tasks have the same name")
        return self


# The outputs an export stage may declare: the adapter as a PEFT folder, and/or the base
# model with the adapter merged in as a full Hugging Face folder.
EXPORT_OUTPUTS = ("peft", "hf")


class ToolSpec(Strict):
    """What `python -m phi4core eval|export SPEC.json` runs. The model is the one the inputs
    describe (a phi4 weights folder's config, with its LoRA adapters), not a preset."""

    name: str
    kind: Literal["eval", "export"]
    fingerprint: str
    inputs: dict[str, InputSpec]
    # The recipe's order of the inputs (spec.json is written with sorted keys): they load in
    # this order, each over the groups the earlier ones loaded.
    input_order: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    evaluate: Evaluate | None = None

    @model_validator(mode="after")
    def _order(self) -> Self:
        if sorted(self.input_order) != sorted(self.inputs):
            raise ValueError("input_order must list every input once")
        return self

    def ordered_inputs(self, names=None) -> list[tuple[str, InputSpec]]:
        """(name, input) in load order; ``names``: only those."""
        return [(n, self.inputs[n]) for n in self.input_order if names is None or n in names]
    stage_dir: str
    output_dir: str
