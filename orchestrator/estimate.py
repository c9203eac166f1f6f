"""Memory, FLOPs and time of one training stage, before it is queued (`phi4 plan --estimate`).

Torch-free: everything follows from the recipe (model preset, trainable and frozen groups,
sequence length, micro batch, TP/SP/PP/CP/VPP, recomputation, precision, resources).

Memory per GPU, on the busiest pipeline rank (the first: it holds the embedding, the towers and
the most micro-batches in flight; the last stage is checked too):

- weights of every group on the rank, in `precision.params`;
- for the trainable groups only (frozen ones carry no gradient and no Adam state): fp32
  gradients (megatron's DDP reduces in fp32) and Adam's fp32 master weights and two moments,
  sharded over the data-parallel ranks (x CP) by the distributed optimizer the GPU path uses;
- activations: the per-layer accounting of Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models" (arXiv:2205.05198, section 4), redone for this
  decoder (RMSNorm, GQA, SwiGLU, no dropout, no biases) and the towers; see
  `decoder_layer_activations`. Pipeline ranks hold min(pp, micro-batches) micro-batches in
  flight (1F1B), times (1 + (pp-1)/(pp*vpp)) with interleaving (the paper's section 4.2.3);
- FP8: Transformer Engine's fp8 copy of every linear weight and its transpose, and the amax
  histories.

FLOPs per step: 2 per multiply-add of every matmul and of attention (causal: half the score
matrix), forward; backward twice that for trainable weights, once (input gradients only) for
frozen ones that gradients must still pass through; recomputation adds its forward again.
Step time is those FLOPs over the GPUs' peak at a stated utilisation, plus tensor-parallel
traffic over NVLink (not overlapped) and the pipeline bubble; data-parallel and context-parallel
traffic is taken as hidden behind compute.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from phi4core.config import ModelConfig
from phi4core.param_counts import (
    conformer_block,
    decoder_layer,
    decoder_linears,
    lora_adapter,
    parameter_counts,
    projector,
    vision_layer,
)

from .config.checks import expand_groups, model_of

if TYPE_CHECKING:
    from .config.schema import Recipe

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes
    bf16_tflops: float  # dense peak
    fp8_tflops: float | None
    nvlink_gbps: float  # GB/s each way per GPU, within a node


# Vendor datasheets, dense (no sparsity) peaks of the SXM parts.
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("h100-80gb", 80 * 10**9, 989.0, 1979.0, 450.0),
    "h200-141gb": GPU("h200-141gb", 141 * 10**9, 989.0, 1979.0, 450.0),
    "a100-80gb": GPU("a100-80gb", 80 * 10**9, 312.0, None, 300.0),
    "b200-192gb": GPU("b200-192gb", 192 * 10**9, 2250.0, 4500.0, 900.0),
}
DEFAULT_GPU = "h100-80gb"
# A layout must fit in this share of the GPU's memory: the rest is the CUDA context, NCCL
# buffers and the caching allocator's fragmentation, which the terms below do not count.
USABLE_FRACTION = 0.90
# Model FLOPs utilisation assumed for the step time (a typical well-tuned dense bf16 run).
DEFAULT_MFU = 0.40
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ACT_BYTES = 2  # 16-bit activations, as in the paper (fp32 recipes: see `activation_bytes`)


@dataclass(frozen=True)
class Layout:
    """What `--suggest` searches: the parallel layout, micro batch and recomputation."""

    tp: int
    pp: int
    cp: int
    sequence_parallel: bool
    micro_batch_size: int
    recompute: str
    vpp: int | None = None

    @classmethod
    def of(cls, recipe: Recipe) -> Layout:
        p = recipe.parallel
        return cls(p.tp, p.pp, p.cp, p.sequence_parallel, recipe.train.micro_batch_size,
                   p.recompute, p.vpp)

    def settings(self) -> dict[str, object]:
        """The recipe key paths and values that select this layout."""
        return {"parallel.tp": self.tp, "parallel.pp": self.pp, "parallel.cp": self.cp,
                "parallel.sequence_parallel": self.sequence_parallel,
                "parallel.recompute": self.recompute,
                "train.micro_batch_size": self.micro_batch_size}

    def overrides(self, base: Layout, stage: str | None = None) -> list[str]:
        """`--set` arguments turning `base` into this layout (stage-prefixed in a pipeline)."""
        mine, theirs = self.settings(), base.settings()
        prefix = f"{stage}." if stage else ""
        out = []
        for key, value in mine.items():
            if value != theirs[key]:
                text = str(value).lower() if isinstance(value, bool) else str(value)
                out.append(f"--set {prefix}{key}={text}")
        return out

    def text(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return (f"tp={self.tp}{sp} pp={self.pp}{vpp} cp={self.cp} mb={self.micro_batch_size} "
                f"recompute={self.recompute}")


# ---------------------------------------------------------------------------------------------
# Activations (Korthikanti et al. 2022, section 4)
# ---------------------------------------------------------------------------------------------


def decoder_layer_activations(m: ModelConfig, s: int, b: int, *, tp: int = 1, sp: bool = False,
                              cp: int = 1, recompute: str = "none", flash: bool = True,
                              act_bytes: int = ACT_BYTES) -> int:
    """Bytes one decoder layer keeps for its backward, for one micro-batch of `b` sequences of
    `s` tokens. The paper's accounting for a GPT layer is sbh(34 + 5as/h) with 16-bit
    activations, dropout and 4h MLPs; redone for this layer (no dropout: no masks):

    outside the tensor-parallel regions (divided by tp only with sequence parallelism):
        input of each RMSNorm, input of QKV and of gate_up           4 x sbh x 2 bytes
    inside them (divided by tp):
        Q, K, V for the attention core                         sb(q + 2kv) x 2
        the attention output, input of o_proj                  sbq x 2
        gate_up output (SwiGLU input), SwiGLU output            sb(2f + f) x 2
        softmax output, unless fused (flash) attention          a s^2 b x 2
    Selective recomputation drops the softmax term (the attention core is recomputed from
    Q, K, V); full recomputation keeps only the layer's input (sbh x 2, /tp with SP).
    Context parallelism splits the sequence: s/cp tokens per rank, each attending to all s.
    """
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    h, f = m.hidden_size, m.ffn_hidden_size
    tokens = (s // cp) * b
    outside = 4 * h * tokens * act_bytes
    outside_share = tp if sp else 1
    if recompute == "full":
        return math.ceil(h * tokens * act_bytes / outside_share)
    inside = tokens * (q + 2 * kv + q + 3 * f) * act_bytes
    if not flash and recompute != "selective":
        inside += m.num_attention_heads * (s // cp) * s * b * act_bytes
    return math.ceil(outside / outside_share) + math.ceil(inside / tp)


def logits_activations(m: ModelConfig, s: int, b: int, tp: int, cp: int, sp: bool,
                       act_bytes: int = ACT_BYTES) -> int:
    """The last pipeline stage's output: the final norm's and output layer's inputs, and the
    logits: megatron's vocabulary-parallel cross entropy turns them into the fp32 softmax it
    keeps for the backward in place, after a float copy of 16-bit logits (which the model
    holds until the loss returns): 6 bytes per logit in 16-bit, 4 in fp32, divided by tp."""
    tokens = (s // cp) * b
    inputs = 2 * m.hidden_size * tokens * act_bytes // (tp if sp else 1)
    per_logit = act_bytes + (4 if act_bytes < 4 else 0)
    return inputs + math.ceil(per_logit * m.vocab_size * tokens / tp)


@dataclass(frozen=True)
class Media:
    """What one sample brings to the towers, as the estimate assumes it: the image crops that
    fit in the sequence (at most max_crops + 1 with the global view), and audio filling the
    rest of the sequence up to 30 minutes."""

    crops: int = 0
    audio_frames: int = 0  # after subsampling: one per audio token


def media_per_sample(m: ModelConfig, s: int, groups: set[str]) -> Media:
    crops = frames = 0
    if m.vision is not None and groups & {"vision.encoder", "vision.projector"}:
        side = m.vision.image_size // m.vision.patch_size // m.vision.pool
        crops = max(1, min(m.vision.max_crops + 1, s // (side * side + side)))
    if m.audio is not None and groups & {"audio.encoder", "audio.projector"}:
        frames = min(s, 30 * 60 * 1000 // (10 * m.audio.time_reduction))
    return Media(crops, frames)


def tower_activations(m: ModelConfig, media: Media, b: int, trainable: set[str],
                      tp: int = 1) -> int:
    """Bytes the towers keep for the backward of one micro-batch: a tower stores activations
    only where a trainable group lies at or before them (its encoder when trainable, its
    projector when the projector or encoder is). SigLIP layer per patch, with fused attention:
    LayerNorm and linear inputs 8h, and inside its tensor-parallel regions (divided by tp)
    Q/K/V, attention output and the GELU's input and output 4h + 4I, x 2 bytes; conformer
    block per frame (replicated, plain torch): two SwiGLU FFNs, attention and the convolution
    module, (40d + 12f) x 2 bytes."""
    out = 0
    if m.vision is not None and media.crops:
        vc = m.vision
        side = vc.image_size // vc.patch_size
        patches = media.crops * side * side * b
        pooled = media.crops * (side // vc.pool) ** 2 * b
        if "vision.encoder" in trainable:
            h, i = vc.hidden_size, vc.intermediate_size
            per_patch = 8 * h + (8 * h + 4 * i) / tp
            out += int(vc.used_layers * patches * per_patch * ACT_BYTES)
        if trainable & {"vision.encoder", "vision.projector"}:
            out += pooled * (vc.hidden_size + 2 * m.hidden_size) * ACT_BYTES
    if m.audio is not None and media.audio_frames:
        ac = m.audio
        frames = media.audio_frames * b
        if "audio.encoder" in trainable:
            per_frame = 40 * ac.attention_dim + 12 * ac.ffn_dim
            out += ac.num_blocks * frames * per_frame * ACT_BYTES
        if trainable & {"audio.encoder", "audio.projector"}:
            out += frames * (ac.attention_dim + 2 * m.hidden_size) * ACT_BYTES
    return out


def in_flight(pp: int, vpp: int | None, micro_batches: int) -> float:
    """Micro-batches whose activations the first pipeline rank holds at once (1F1B keeps pp
    warm-up micro-batches; interleaving adds (pp-1)/(pp*vpp) of a stage's layers)."""
    if pp == 1:
        return 1.0
    held = min(pp, micro_batches)
    return held * (1 + (pp - 1) / (pp * vpp) if vpp else 1.0)


# ---------------------------------------------------------------------------------------------
# Weights, gradients, optimizer
# ---------------------------------------------------------------------------------------------


def state_bytes(params: int, trainable: bool, params_dtype: str, dp_shards: int,
                distributed: bool = True) -> dict[str, int]:
    """Weights always; for trainable parameters fp32 gradients and Adam's fp32 master copy
    (not when the weights are fp32 already) and two moments, sharded over `dp_shards` ranks
    by the distributed optimizer."""
    out = {"weights": params * _BYTES[params_dtype]}
    if trainable:
        out["gradients"] = params * 4
        per_param = (8 if params_dtype == "fp32" else 12)
        out["optimizer"] = math.ceil(params * per_param / (dp_shards if distributed else 1))
    return out


# ---------------------------------------------------------------------------------------------
# The estimate of one stage
# ---------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    stage: str
    gpu: GPU | None  # None: the stage runs on CPU processes
    layout: Layout
    world_size: int
    data_parallel: int
    micro_batches: int
    params: dict[str, int]  # total, trainable, frozen
    groups: dict[str, int]
    memory: dict[str, int]  # term -> bytes on the busiest rank
    flops_per_step: float  # model FLOPs (recomputation excluded)
    executed_flops_per_step: float  # with recomputation
    step_time_s: float
    tokens_per_step: int
    total_steps: int
    mfu: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def capacity(self) -> int | None:
        return int(self.gpu.memory * USABLE_FRACTION) if self.gpu else None

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak_bytes <= self.capacity

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s if self.step_time_s else 0.0

    @property
    def gpu_hours(self) -> float:
        return self.total_steps * self.step_time_s * self.world_size / 3600

    def biggest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.memory.items(), key=lambda kv: -kv[1])[:n]

    def as_json(self) -> dict:
        return {
            "stage": self.stage, "gpu": self.gpu.name if self.gpu else None,
            "layout": self.layout.settings(), "world_size": self.world_size,
            "data_parallel": self.data_parallel, "micro_batches": self.micro_batches,
            "parameters": self.params, "groups": self.groups,
            "memory_bytes": {**self.memory, "total": self.peak_bytes},
            "capacity_bytes": self.capacity, "fits": self.fits,
            "flops_per_step": self.flops_per_step,
            "executed_flops_per_step": self.executed_flops_per_step,
            "mfu": self.mfu, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s, "total_steps": self.total_steps,
            "gpu_hours": self.gpu_hours, "notes": self.notes,
        }


def _groups(recipe: Recipe, m: ModelConfig) -> tuple[set[str], set[str]]:
    available = m.module_groups
    trainable = expand_groups(recipe.trainable, available)
    return trainable, set(available) - trainable


def estimate(recipe: Recipe, gpu: str | None = DEFAULT_GPU, mfu: float = DEFAULT_MFU,
             layout: Layout | None = None, model: ModelConfig | None = None) -> Estimate:
    """The estimate of a train stage (under `layout` instead of its own, when given; of
    `model` instead of its preset, when given). `gpu` None, or a stage without GPUs,
    estimates per CPU process with no memory limit."""
    m = model or model_of(recipe)
    if m is None or recipe.train is None:
        raise ValueError(f"stage {recipe.name} trains no model: nothing to estimate")
    lay = layout or Layout.of(recipe)
    t = recipe.train
    res = recipe.resources
    on_gpu = res.gpus_per_node > 0 and gpu is not None
    card = GPUS[gpu] if on_gpu else None
    world = res.world_size
    mp = lay.tp * lay.pp * lay.cp
    dp = max(1, world // mp)
    micro = max(1, t.global_batch_size // (lay.micro_batch_size * dp))
    trainable, frozen = _groups(recipe, m)
    counts = parameter_counts(m)
    params = {"total": counts.total,
              "trainable": sum(n for g, n in counts.groups.items() if g in trainable),
              "frozen": sum(n for g, n in counts.groups.items() if g in frozen)}
    dtype = recipe.precision.params
    sp = lay.sequence_parallel and lay.tp > 1
    s, b = t.seq_length, lay.micro_batch_size
    flash = True  # TE's fused attention on GPUs, SDPA's flash kernel on CPUs: no s x s term
    act_bytes = ACT_BYTES if dtype != "fp32" else 4
    layers = m.num_layers // lay.pp

    # Per-rank parameters by group: decoder layers and LoRA split by tp and pp; the embedding
    # by tp on the first rank (tied: again on the last when pp > 1); towers on the first rank,
    # megatron's parts (SigLIP, projectors) split by tp, the conformer replicated.
    per_rank: dict[str, tuple[int, int]] = {}  # group -> (first rank, last rank)
    emb = m.vocab_size * m.hidden_size // lay.tp
    body = layers * decoder_layer(m) // lay.tp
    last_emb = emb if (lay.pp > 1 or not m.tie_embeddings) else 0
    per_rank["backbone"] = (body + emb + (0 if lay.pp > 1 else last_emb) + m.hidden_size,
                            body + last_emb + m.hidden_size)
    for name, lora in (("lora.vision", m.lora_vision), ("lora.speech", m.lora_speech)):
        if lora is not None:
            n = lora_adapter(m, lora) // (lay.pp * lay.tp)
            per_rank[name] = (n, n)
    for group, n in counts.groups.items():
        if group in per_rank:
            continue
        share = 1 if group == "audio.encoder" else lay.tp
        per_rank[group] = (n // share, 0 if lay.pp > 1 else n // share)

    def rank_memory(which: int) -> dict[str, int]:
        mem = {"weights": 0, "gradients": 0, "optimizer": 0}
        for group, pair in per_rank.items():
            for key, value in state_bytes(pair[which], group in trainable, dtype,
                                          dp * lay.cp).items():
                mem[key] += value
        if recipe.precision.fp8 != "off":
            linears = sum(i * o for i, o in decoder_linears(m).values())
            amax = recipe.precision.amax_history * 4 * 3 * len(decoder_linears(m))
            mem["fp8 buffers"] = layers * (2 * linears // lay.tp + amax)
        per_layer = decoder_layer_activations(m, s, b, tp=lay.tp, sp=sp, cp=lay.cp,
                                              recompute=lay.recompute, flash=flash,
                                              act_bytes=act_bytes)
        held = in_flight(lay.pp, lay.vpp, micro) if which == 0 else 1.0
        mem["activations"] = int(per_layer * layers * held)
        if which == 0:
            media = media_per_sample(m, s, trainable | frozen)
            mem["tower activations"] = int(tower_activations(m, media, b, trainable, lay.tp)
                                           * held)
        logits = 0
        if which == 1 or lay.pp == 1:
            logits = mem["logits"] = logits_activations(m, s, b, lay.tp, lay.cp, sp, act_bytes)
        if lay.recompute == "full":
            # The layer being recomputed holds all of its activations, in the backward, once
            # the logits are gone: the peak is the larger of the two.
            working = decoder_layer_activations(m, s, b, tp=lay.tp, sp=sp, cp=lay.cp,
                                                flash=flash, act_bytes=act_bytes)
            mem["recomputed layer"] = max(0, working - logits)
        return {k: v for k, v in mem.items() if v}

    first, last = rank_memory(0), rank_memory(1)
    memory = first if sum(first.values()) >= sum(last.values()) else last

    flops, executed = step_flops(m, recipe, lay, trainable)
    peak = (card.bf16_tflops if card else 1.0) * 1e12
    step_time = executed / (world * peak * mfu) if card else 0.0
    if card:
        step_time += tp_comm_seconds(m, recipe, lay, dp, card)
    if lay.pp > 1:
        step_time *= 1 + (lay.pp - 1) / ((lay.vpp or 1) * micro)
    notes = []
    if not on_gpu:
        notes.append("runs on CPU processes: memory is per process, no GPU limit or time")
    if recipe.precision.fp8 != "off":
        notes.append("fp8: time at the bf16 peak (fp8 speeds up the linears only)"
                     if card is None or card.fp8_tflops else
                     f"fp8: a {card.name} has no FP8 tensor cores; set precision.fp8=off")
    return Estimate(recipe.name, card, lay, world, dp, micro, params, dict(counts.groups),
                    memory, flops, executed, step_time, t.tokens_per_step, t.total_steps, mfu,
                    notes)


def step_flops(m: ModelConfig, recipe: Recipe, lay: Layout, trainable: set[str]
               ) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs with recomputation) of one optimizer step."""
    t = recipe.train
    tokens = t.global_batch_size * t.seq_length
    s = t.seq_length
    layer_matmul = 2 * sum(i * o for i, o in decoder_linears(m).values())  # per token
    attention = 2 * 2 * s * m.num_attention_heads * m.kv_channels * 0.5  # causal: half
    # One adapter runs per sample: the trained one, else the larger (an upper bound).
    adapters = {g: c for g, c in (("lora.vision", m.lora_vision), ("lora.speech", m.lora_speech))
                if c is not None}
    running = [c for g, c in adapters.items() if g in trainable] or list(adapters.values())
    lora_per_token = max((2 * lora_adapter(m, c) for c in running), default=0)  # every layer
    out_layer = 2 * m.hidden_size * m.vocab_size
    backbone_trains = "backbone" in trainable
    lora_trains = any(g.startswith("lora.") for g in trainable)
    fwd = tokens * (m.num_layers * (layer_matmul + attention) + lora_per_token + out_layer)
    # backward: input gradients everywhere in the decoder (every stage's gradients pass
    # through it), weight gradients only where weights train; attention has no weights.
    bwd = tokens * (m.num_layers * (layer_matmul + 2 * attention) + lora_per_token + out_layer)
    if backbone_trains:
        bwd += tokens * (m.num_layers * layer_matmul + out_layer)
    if lora_trains:
        bwd += tokens * lora_per_token
    towers_f, towers_b = tower_flops(m, media_per_sample(m, s, set(m.module_groups)),
                                     t.global_batch_size, trainable)
    model = fwd + bwd + towers_f + towers_b
    extra = 0.0
    if lay.recompute == "full":
        extra = tokens * (m.num_layers * (layer_matmul + attention) + lora_per_token)
    elif lay.recompute == "selective":
        extra = tokens * m.num_layers * attention
    return model, model + extra


def tp_comm_seconds(m: ModelConfig, recipe: Recipe, lay: Layout, dp: int, card: GPU) -> float:
    """Tensor-parallel traffic not hidden behind compute, per step: each decoder layer
    all-gathers or all-reduces its sbh activations twice forward and twice backward (once more
    forward when recomputing in full), each moving (tp-1)/tp of them per GPU over NVLink."""
    if lay.tp == 1:
        return 0.0
    t = recipe.train
    tokens_per_rank = t.global_batch_size * t.seq_length / (dp * lay.cp)
    passes = 4 + (2 if lay.recompute == "full" else 0)
    layers = m.num_layers // lay.pp
    volume = passes * layers * tokens_per_rank * m.hidden_size * ACT_BYTES
    volume *= 2 * (lay.tp - 1) / lay.tp  # an all-reduce is a reduce-scatter and an all-gather
    return volume / (card.nvlink_gbps * 1e9)


def tower_flops(m: ModelConfig, media: Media, samples: int, trainable: set[str]
                ) -> tuple[float, float]:
    """Forward and backward FLOPs of the towers for `samples` samples: a frozen encoder ahead
    of nothing trainable runs forward only."""
    fwd = bwd = 0.0
    if m.vision is not None and media.crops:
        vc = m.vision
        side = vc.image_size // vc.patch_size
        patches = samples * media.crops * side * side
        pooled = samples * media.crops * (side // vc.pool) ** 2
        enc = patches * vc.used_layers * (2 * vision_layer(vc) + 4 * side * side * vc.hidden_size)
        proj = pooled * 2 * projector(vc.hidden_size, m.hidden_size)
        fwd += enc + proj
        if "vision.encoder" in trainable:
            bwd += 2 * enc
        if trainable & {"vision.encoder", "vision.projector"}:
            bwd += 2 * proj
    if m.audio is not None and media.audio_frames:
        ac = m.audio
        frames = samples * media.audio_frames
        chunk = min(media.audio_frames, ac.chunk_frames)
        enc = frames * ac.num_blocks * (2 * conformer_block(ac) + 4 * chunk * ac.attention_dim)
        proj = frames * 2 * projector(ac.attention_dim, m.hidden_size)
        fwd += enc + proj
        if "audio.encoder" in trainable:
            bwd += 2 * enc
        if trainable & {"audio.encoder", "audio.projector"}:
            bwd += 2 * proj
    return fwd, bwd


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_layouts(recipe: Recipe) -> list[Layout]:
    """Layouts within the stage's resources that the recipe checks accept: tp within a node,
    dividing the heads; pp dividing the layers; cp a power of two; micro batches dividing the
    per-rank batch; every recomputation setting."""
    from .config.checks import check_recipe
    from .config.errors import Origin

    m = model_of(recipe)
    res = recipe.resources
    world = res.world_size
    gpus = max(1, res.gpus_per_node)
    tps = [d for d in _divisors(m.num_query_groups, gpus) if m.num_attention_heads % d == 0]
    pps = _divisors(m.num_layers, world)
    cps = [c for c in (1, 2, 4, 8) if c <= world]
    mbs = (1, 2, 4, 8, 16)
    out = []
    for tp, pp, cp, mb, rc in itertools.product(tps, pps, cps, mbs, ("none", "selective",
                                                                        "full")):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        if recipe.train.global_batch_size % (mb * dp):
            continue
        lay = Layout(tp, pp, cp, tp > 1, mb, rc, recipe.parallel.vpp if pp > 1 else None)
        if lay.vpp and m.num_layers % (pp * lay.vpp):
            lay = replace(lay, vpp=None)
        candidate = with_layout(recipe, lay)
        if check_recipe(candidate, {}, Origin("<suggest>")):
            continue
        out.append(lay)
    return out


def with_layout(recipe: Recipe, lay: Layout) -> Recipe:
    parallel = recipe.parallel.model_copy(update={
        "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "sequence_parallel": lay.sequence_parallel,
        "recompute": lay.recompute, "vpp": lay.vpp, "pp_layers": None})
    train = recipe.train.model_copy(update={"micro_batch_size": lay.micro_batch_size})
    return recipe.model_copy(update={"parallel": parallel, "train": train})


_RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}


def suggest(recipe: Recipe, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU,
            limit: int = 5) -> list[Estimate]:
    """The layouts that fit, fastest first (ties: less recomputation, smaller tp*pp*cp)."""
    fitting = []
    for lay in candidate_layouts(recipe):
        est = estimate(with_layout(recipe, lay), gpu, mfu)
        if est.fits:
            fitting.append(est)
    fitting.sort(key=lambda e: (-round(e.tokens_per_s, 6), _RECOMPUTE_ORDER[e.layout.recompute],
                                e.layout.tp * e.layout.pp * e.layout.cp,
                                -e.layout.micro_batch_size))
    return fitting[:limit]


def closest_fits(recipe: Recipe, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU,
                 limit: int = 3) -> list[Estimate]:
    """Fitting layouts that change the fewest settings of the recipe's own, fastest first."""
    base = Layout.of(recipe)
    found = suggest(recipe, gpu, mfu, limit=10**6)
    found.sort(key=lambda e: (len(e.layout.overrides(base)), -e.tokens_per_s))
    return found[:limit]
