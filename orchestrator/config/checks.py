"""Checks across fields of one recipe: the mistakes a schema alone cannot see.

Each returns problems located at the field a user would edit to fix it. A message that quotes
a value nobody wrote says so ("8 GPUs per node, the default of a train stage"). Values derived
from several fields (the steps a token budget gives, the LR a scaling law gives) are checked
here too: finite, positive, and within the integer range of the code that counts them.
"""

from __future__ import annotations

import fnmatch
import math

from phi4core.config import EXPORT_OUTPUTS, INT64_MAX, PRESETS, LearningRate, ModelConfig, preset
from phi4core.module_groups import ARTIFACT_GROUPS, LORA_ADAPTERS, artifact_groups

from .errors import Loc, Origin, Positions, Problem, did_you_mean, origin_of
from .schema import MODULE_GROUPS, Recipe

_TRAIN_ONLY = ("model", "tokenizer", "trainable", "frozen", "data", "train")
# Optimizer steps are counted in C ints by the trainer's libraries.
MAX_STEPS = 2**31 - 1


class _Report:
    def __init__(self, positions: Positions, default: Origin):
        self.positions = positions
        self.default = default
        self.problems: list[Problem] = []

    def add(self, loc: Loc, message: str, *got, hint: str | None = None) -> None:
        origin = origin_of(self.positions, loc, self.default)
        self.problems.append(Problem(origin, loc, message, *got, hint=hint))


def expand_groups(patterns: list[str], available: list[str]) -> set[str]:
    return {g for p in patterns for g in available if fnmatch.fnmatchcase(g, p)}


def defaulted(positions: Positions, field: str) -> bool:
    """resources.<field> was written by no layer (recipe, profile, pipeline or --set)."""
    return ("resources", field) not in positions


def layout_text(recipe: Recipe, positions: Positions) -> str:
    """How many processes a stage asks and which of those numbers are defaults, e.g.
    '4 nodes x 8 GPUs; 8 GPUs per node is the default of a train stage'."""
    res = recipe.resources
    text = f"{res.nodes} node{'s' if res.nodes != 1 else ''} x "
    if res.gpus_per_node:
        text += f"{res.gpus_per_node} GPUs"
        if defaulted(positions, "gpus_per_node"):
            text += (f"; {res.gpus_per_node} GPUs per node is the default of a {recipe.kind} "
                     "stage")
    else:
        text += f"{res.procs_per_node or 1} CPU process{'es' if res.procs_per_node else ''}"
    return text


def model_of(recipe: Recipe) -> ModelConfig | None:
    if recipe.model is None:
        return None
    try:
        model = preset(recipe.model.preset, recipe.model.size)
    except KeyError:
        return None
    if not recipe.model.lora:
        return model
    return model.model_copy(update={LORA_ADAPTERS[a].config_field: cfg
                                    for a, cfg in recipe.model.lora.items()})


def check_recipe(recipe: Recipe, positions: Positions, default: Origin) -> list[Problem]:
    r = _Report(positions, default)
    if recipe.kind == "train":
        _check_train(recipe, r)
    else:
        _check_command(recipe, r)
    return r.problems


def _check_command(recipe: Recipe, r: _Report) -> None:
    """Command, eval and export stages: no training fields; each its own section."""
    kind = recipe.kind
    if kind == "command" and not recipe.cmd:
        r.add(("cmd",), "a command stage needs `cmd:`, the argv to run")
    if kind != "command" and recipe.cmd is not None:
        r.add(("cmd",), f"`cmd` belongs to command stages; this stage is `kind: {kind}`")
    if kind == "eval" and recipe.evaluate is None:
        r.add(("evaluate",), "an eval stage needs `evaluate:` (heldout: a chat JSONL, "
              "heldout_images: image-text sources, and/or tasks:)")
    if kind != "eval" and recipe.evaluate is not None:
        r.add(("evaluate",), f"`evaluate` belongs to eval stages; this stage is `kind: {kind}`")
    if kind in ("eval", "export"):
        _check_model_inputs(recipe, r)
    if kind == "export":
        for i, out in enumerate(recipe.outputs):
            if out not in EXPORT_OUTPUTS:
                r.add(("outputs", i), "an export stage's output is peft (the adapter as a PEFT "
                      "folder) or hf (the merged Hugging Face folder)", out,
                      hint=did_you_mean(out, list(EXPORT_OUTPUTS)))
        if not recipe.outputs:
            r.add(("outputs",), "an export stage lists what it writes: peft, hf or both")
    for key in _TRAIN_ONLY:
        if getattr(recipe, key) not in (None, [], {}):
            r.add((key,), f"`{key}` belongs to train stages; this stage is `kind: {kind}`")


def _check_model_inputs(recipe: Recipe, r: _Report) -> None:
    """Eval and export stages build their model from their inputs: a Hugging Face folder or
    phi4 weights (the base) and, for the trained model, the adapter."""
    if not recipe.inputs:
        r.add(("inputs",), f"a {recipe.kind} stage needs inputs: the base model (hf: or a "
              "stage's model) and the trained adapter (a stage's adapter artifact)")
        return
    ev = recipe.evaluate
    for i, name in enumerate((ev.base or []) if ev is not None else []):
        if name not in recipe.inputs:
            r.add(("evaluate", "base", i), "names no input of this stage", name,
                  hint=did_you_mean(name, list(recipe.inputs)))


def _check_train(recipe: Recipe, r: _Report) -> None:
    if recipe.cmd is not None:
        r.add(("cmd",), "`cmd` belongs to command stages; add `kind: command`")
    for key in ("model", "train", "data"):
        if getattr(recipe, key) is None:
            r.add((key,), "required field is missing for a train stage")
    model = model_of(recipe)
    if recipe.model is not None and model is None:
        names = sorted({n.removesuffix("_tiny") for n in PRESETS})
        r.add(("model", "preset"), "unknown model preset", recipe.model.preset,
              hint=did_you_mean(recipe.model.preset, names) or f"known: {', '.join(names)}")
    if not recipe.outputs:
        r.add(("outputs",), "a train stage must list at least one output artifact")
    _check_groups(recipe, model, r)
    if model is not None:
        _check_parallel(recipe, model, r)
    if recipe.train is not None:
        _check_train_fields(recipe, r)
    _check_precision(recipe, r)


def _check_groups(recipe: Recipe, model: ModelConfig | None, r: _Report) -> None:
    available = model.module_groups if model is not None else list(MODULE_GROUPS)
    for field in ("trainable", "frozen"):
        for i, pattern in enumerate(getattr(recipe, field)):
            if not expand_groups([pattern], available):
                known = [g for g in MODULE_GROUPS if g in available]
                hint = did_you_mean(pattern, known) or f"groups of this model: {', '.join(known)}"
                why = ("matches no module group of this model" if model is not None
                       else "matches no module group")
                r.add((field, i), why, pattern, hint=hint)
    trainable = expand_groups(recipe.trainable, available)
    frozen = expand_groups(recipe.frozen, available)
    if not recipe.trainable:
        r.add(("trainable",), "a train stage must train something (trainable is empty)")
    for group in sorted(trainable & frozen):
        r.add(("frozen",), f"{group!r} is both trainable and frozen")
    _check_outputs(recipe, available, trainable, r)
    for name, inp in recipe.inputs.items():
        provided = set(ARTIFACT_GROUPS.get(inp.artifact or "model", ()))
        clash = sorted(provided & trainable) if inp.frozen else []
        if clash:
            r.add(("inputs", name, "frozen"),
                  f"this input is frozen but provides {', '.join(clash)}, listed in `trainable`")


def _check_outputs(recipe: Recipe, available: list[str], trainable: set[str],
                   r: _Report) -> None:
    """A train stage's outputs are artifact kinds of its model, and hold what it trains (the
    trainer writes each with exactly its module groups)."""
    kept: set[str] = set()
    bad = False
    for i, out in enumerate(recipe.outputs):
        if out not in ARTIFACT_GROUPS:
            bad = True
            r.add(("outputs", i), "a train stage's output is an artifact kind", out,
                  hint=did_you_mean(out, list(ARTIFACT_GROUPS))
                  or f"known: {', '.join(ARTIFACT_GROUPS)}")
            continue
        groups = artifact_groups(out, available, trainable)
        if not groups:
            bad = True
            r.add(("outputs", i), "this model has none of the artifact's module groups", out,
                  hint=f"{out} holds {', '.join(ARTIFACT_GROUPS[out])}")
        kept.update(groups)
    lost = sorted(trainable - kept)
    if lost and not bad:
        r.add(("outputs",), f"trainable {', '.join(lost)} in none of the outputs: their "
              f"training would be thrown away", recipe.outputs)


def _check_parallel(recipe: Recipe, model: ModelConfig, r: _Report) -> None:
    p = recipe.parallel
    if model.num_attention_heads % p.tp or model.num_query_groups % p.tp:
        divisors = [d for d in range(1, model.num_query_groups + 1)
                    if model.num_query_groups % d == 0 and model.num_attention_heads % d == 0]
        r.add(("parallel", "tp"),
              f"tp must divide the {model.num_attention_heads} query heads and "
              f"{model.num_query_groups} KV heads of {model.name}", p.tp,
              hint=f"use one of {divisors}")
    if p.pp_layers is not None:
        if len(p.pp_layers) != p.pp:
            r.add(("parallel", "pp_layers"), f"needs one entry per pipeline stage ({p.pp})",
                  p.pp_layers)
        elif sum(p.pp_layers) != model.num_layers or min(p.pp_layers) < 1:
            r.add(("parallel", "pp_layers"),
                  f"layers per stage must be positive and sum to {model.num_layers}", p.pp_layers)
    elif model.num_layers % (p.pp * (p.vpp or 1)):
        r.add(("parallel", "pp"),
              f"pp{' x vpp' if p.vpp else ''} must divide the {model.num_layers} layers of "
              f"{model.name} (or give an uneven split in parallel.pp_layers)", p.pp)
    if p.vpp is not None and p.pp == 1:
        r.add(("parallel", "vpp"), "virtual pipeline stages need pp > 1", p.vpp)
    if p.sequence_parallel and p.tp == 1:
        r.add(("parallel", "sequence_parallel"), "sequence parallelism needs tp > 1")
    world = recipe.resources.world_size
    if world % p.model_parallel_size:
        r.add(("resources",),
              f"world size {world} ({layout_text(recipe, r.positions)}) is not divisible by "
              f"tp*pp*cp = {p.model_parallel_size}",
              hint="set resources.nodes and resources.gpus_per_node")


def data_parallel_size(recipe: Recipe) -> int:
    return max(1, recipe.resources.world_size // recipe.parallel.model_parallel_size)


def _check_train_fields(recipe: Recipe, r: _Report) -> None:
    t = recipe.train
    assert t is not None
    if (t.steps is None) == (t.tokens is None):
        r.add(("train",), "give exactly one of `steps` or `tokens` (a token budget)")
    elif _check_derived(recipe, r) and t.warmup_steps >= t.total_steps \
            and t.schedule != "constant":
        budget = "" if t.steps is not None else ", from the token budget"
        r.add(("train", "warmup_steps"), f"must be below steps ({t.total_steps}{budget})",
              t.warmup_steps)
    dp = data_parallel_size(recipe)
    if t.global_batch_size % (t.micro_batch_size * dp):
        r.add(("train", "global_batch_size"),
              f"must be divisible by micro_batch_size x data-parallel size "
              f"({t.micro_batch_size} x {dp})", t.global_batch_size)
    if isinstance(t.lr, float) and t.min_lr > t.lr:
        r.add(("train", "min_lr"), f"is above lr ({t.lr})", t.min_lr)
    if recipe.parallel.cp > 1 and t.seq_length % (2 * recipe.parallel.cp):
        r.add(("train", "seq_length"), f"must be divisible by 2 x cp ({2 * recipe.parallel.cp})",
              t.seq_length)


def _check_derived(recipe: Recipe, r: _Report) -> bool:
    """The step count a budget gives and the LR a scaling law gives, before `show` or the
    trainer compute them; False when the step count itself is unusable."""
    t = recipe.train
    assert t is not None
    loc = ("train", "steps") if t.steps is not None else ("train", "tokens")
    steps = t.total_steps
    if steps > MAX_STEPS:
        r.add(loc, f"that is {steps:.3g} optimizer steps of {t.tokens_per_step} tokens; at most "
                   f"{MAX_STEPS} (2^31-1)", t.steps if t.steps is not None else t.tokens)
        return False
    if steps * t.tokens_per_step > INT64_MAX:
        r.add(loc, "more tokens in total than a 64-bit counter holds",
              t.steps if t.steps is not None else t.tokens)
        return False
    if isinstance(t.lr, LearningRate):
        law = t.lr.scaling_law
        try:
            lr = t.peak_lr
        except (OverflowError, ZeroDivisionError):
            lr = math.inf
        if not (math.isfinite(lr) and lr > 0):
            r.add(("train", "lr", "scaling_law", "exponent"),
                  f"LR* = B x D^exponent = {law.B:g} x {t.total_tokens:.3g}^{law.exponent:g} "
                  f"is {'zero' if lr == 0 else 'not a finite number'}",
                  law.exponent, hint="the Phi-4-Mini law has exponent -0.32")
    return True


def _check_precision(recipe: Recipe, r: _Report) -> None:
    pr = recipe.precision
    if pr.fp8 != "off" and pr.params != "bf16":
        r.add(("precision", "fp8"), "FP8 training needs bf16 params (precision.params: bf16)",
              pr.fp8)
    if pr.fp8 != "off" and recipe.resources.gpus_per_node == 0:
        r.add(("precision", "fp8"), "FP8 needs GPUs (resources.gpus_per_node is 0)", pr.fp8)
