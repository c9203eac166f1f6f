"""`python -m phi4core train SPEC.json`: one stage, from a StageSpec, to its artifacts.

run(spec) -> exit code. Steps: distributed + megatron state, model (+ inputs), freezing and
frozen checksums, megatron DDP + optimizer, data addressed by consumed samples, resume from the
newest intact checkpoint, the step loop (LR from `lr_at`, grad accumulation through megatron's
forward-backward schedule, global-norm clipping), periodic and preemption checkpoints, and the
artifacts (`output_dir/<output>`: phi4 weights + tokenizer/ + frozen_checksums.json +
train_summary.json).

A multimodal stage (a model with towers) builds the MultimodalModel, loads each input's module
groups (phi4core.train.inputs), trains the groups of `trainable` with the rest frozen, feeds
micro-batches of one input mode with their media, and writes each output artifact with exactly
its groups (`vision`: vision encoder, separators, projector, LoRA_V; `speech`: audio encoder,
projectors, LoRA_A; `model`: the whole model).

A step whose loss or gradients are not finite (or that fp16's loss scaler rejects) is skipped
and counted (`skipped` in metrics.jsonl); more than `train.max_skipped_steps` in a row fail the
stage (exit 1), and weights that are not finite are never written as the artifact.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from phi4core import exitcodes
from phi4core.config import StageSpec
from phi4core.files import json_text
from phi4core.module_groups import (
    ADAPTER_ARTIFACT,
    ARTIFACT_GROUPS,
    artifact_groups,
    groups_of,
)
from phi4core.train.schedules import lr_at

log = logging.getLogger("phi4core.train")


class SpecError(ValueError):
    """The spec cannot be trained here (exit code 2)."""


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite values (exit code 1)."""


@dataclass
class Hooks:
    """Test seams: freeze extra parameters by name; act on the model after each step."""

    extra_frozen: Callable[[str], bool] | None = None
    after_step: Callable[[int, list], None] | None = None


def load_spec(path: str | os.PathLike) -> StageSpec:
    return StageSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))


def is_multimodal(spec: StageSpec) -> bool:
    """A model with towers or the multimodal LoRAs (a text model's lora.text is not)."""
    return any(g not in ("backbone", "lora.text") for g in groups_of(spec.model))


def output_groups(spec: StageSpec) -> dict[str, tuple[str, ...]]:
    """{output artifact: the module groups it holds}."""
    mine = groups_of(spec.model)
    out = {}
    for artifact in spec.outputs:
        if artifact != "model" and artifact not in ARTIFACT_GROUPS:
            raise SpecError(f"output {artifact!r} is not an artifact kind; known: model, "
                            f"{', '.join(a for a in ARTIFACT_GROUPS if a != 'model')}")
        groups = artifact_groups(artifact, mine, spec.trainable)
        if artifact == ADAPTER_ARTIFACT and not groups:
            raise SpecError(f"output {artifact!r} holds the LoRA adapters a stage trains; "
                            f"this one trains none of {', '.join(ARTIFACT_GROUPS[artifact])}")
        if artifact not in ("model", ADAPTER_ARTIFACT) and groups != ARTIFACT_GROUPS[artifact]:
            lacking = [g for g in ARTIFACT_GROUPS[artifact] if g not in groups]
            raise SpecError(f"output {artifact!r} holds {', '.join(ARTIFACT_GROUPS[artifact])}"
                            f"; model {spec.model.name} has no {', '.join(lacking)}")
        out[artifact] = groups
    return out


def check_spec(spec: StageSpec) -> None:
    """What this trainer cannot run, said before anything heavy starts."""
    outputs = output_groups(spec)
    kept = {g for groups in outputs.values() for g in groups}
    lost = [g for g in spec.trainable if g not in kept]
    if lost:
        raise SpecError(f"trainable groups {', '.join(lost)} are in none of the outputs "
                        f"{', '.join(spec.outputs)}: their training would be thrown away")
    t = spec.train
    dp = spec.world_size // spec.parallel.model_parallel_size
    if dp < 1 or spec.world_size % spec.parallel.model_parallel_size:
        raise SpecError(f"world_size {spec.world_size} is not a multiple of tp*pp*cp")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise SpecError(f"global_batch_size {t.global_batch_size} is not a multiple of "
                        f"micro_batch_size*dp = {t.micro_batch_size}*{dp}")


def _peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    def __init__(self, spec: StageSpec, hooks: Hooks | None = None) -> None:
        self.spec, self.hooks = spec, hooks or Hooks()

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads

        from phi4core.models.decoder import build_model_chunks
        from phi4core.parallel import init_parallel
        from phi4core.train import data as tdata
        from phi4core.train.feature_stats import fit_fresh_feature_norms
        from phi4core.train.freezing import apply_freezing, frozen_checksums
        from phi4core.train.inputs import check_input_tokenizers, load_inputs
        from phi4core.train.optim import build_optimizer, wrap_ddp

        spec, t = self.spec, self.spec.train
        self.on_gpu = torch.cuda.is_available()
        init_parallel(spec.parallel, seed=t.seed)
        if dist.get_world_size() != spec.world_size:
            raise SpecError(f"spec.world_size is {spec.world_size} but {dist.get_world_size()} "
                            "processes were started")
        self.rank = dist.get_rank()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        torch.manual_seed(t.seed)

        self.kind = tdata.data_kind(spec)
        self.tokenizer = tdata.tokenizer_for(spec)
        check_input_tokenizers(spec, self.tokenizer)
        # Stream sources (energon, lhotse) and mixed modalities: a MixedBatches whose loader
        # position goes into the checkpoints; otherwise one sample set addressed by index.
        self.samples, self.mixture = None, None
        if tdata.uses_streams(spec):
            self.mixture = tdata.build_mixed_batches(
                spec, self.tokenizer, t.total_steps * t.global_batch_size, self.dp_rank,
                self.dp, block_mask=not self.on_gpu)
        else:
            self.samples = tdata.build_samples(spec, self.tokenizer,
                                               t.total_steps * t.global_batch_size)
        reports = [] if self.samples is None else tdata.data_reports(self.samples)
        if reports and self.rank == 0:  # the counts `phi4 data preview` shows
            from phi4core.files import write_json

            write_json(Path(spec.stage_dir) / "data_report.json",
                       [{"source": i, "name": r.name, **r.to_dict()}
                        for i, r in enumerate(reports)])

        if is_multimodal(spec):
            from phi4core.models.multimodal import build_multimodal_chunks

            chunks = build_multimodal_chunks(spec.model, spec.parallel, spec.precision,
                                             lora_seed=t.seed, calculate_per_token_loss=True)
        else:
            chunks = build_model_chunks(spec.model, spec.parallel, spec.precision,
                                        model_kwargs={"lora_seed": t.seed},
                                        calculate_per_token_loss=True)
        self.loaded_inputs = load_inputs(spec, chunks)
        fit_fresh_feature_norms(chunks, self.samples, spec.data.sources)
        apply_freezing(chunks, spec.trainable, self.hooks.extra_frozen)
        if not any(p.requires_grad for c in chunks for p in c.parameters()):
            raise SpecError(f"nothing to train: trainable groups {spec.trainable} are empty")
        self.raw_chunks = chunks
        self.checksums_before = frozen_checksums(chunks)
        self.model = wrap_ddp(chunks, self.on_gpu)
        self.optimizer = build_optimizer(spec, self.model, self.on_gpu)
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            config.no_sync_func = config.no_sync_func[0]
        if self.rank == 0:
            log.info("stage %s: %d steps, peak lr %.4g, dp %d, %d micro-batches/step, %s data",
                     spec.name, t.total_steps, t.peak_lr, self.dp, self.num_micro, self.kind)

    # -- one step --------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        attention_mask = batch.get("attention_mask")
        packed = None
        if "cu_seqlens" in batch and self.on_gpu:
            # THD attention with cu_seqlens replaces the S x S mask on GPU.
            from phi4core.data.packing import packed_seq_params

            packed = packed_seq_params(batch)
            batch = {k: batch[k].reshape(1, -1)
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            attention_mask = None
        dev = torch.cuda.current_device() if self.on_gpu else "cpu"
        tokens = batch["tokens"].to(dev)
        media = {}
        if "input_mode" in batch:  # a multimodal batch: its mode and media, as keywords
            from phi4core.data.multimodal import MEDIA_KEYS

            media = {k: batch[k].to(dev) for k in MEDIA_KEYS if k in batch}
            media["input_mode"] = int(batch["input_mode"])
        out = model(tokens, batch["position_ids"].to(dev),
                    attention_mask.to(dev) if attention_mask is not None else None,
                    labels=batch["labels"].to(dev), packed_seq_params=packed, **media)
        loss_mask = batch["loss_mask"].to(dev).float()

        def loss_func(losses):
            total = (losses.float() * loss_mask).sum()
            n = loss_mask.sum().to(torch.int)
            return total, n, {"lm loss": torch.stack([total.detach(), n.float()])}

        return out, loss_func

    def train_step(self, step: int, batches: list[dict]) -> dict:
        """Forward, backward and the optimizer step (or its skip) over `batches`, this rank's
        micro-batches of `step`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from phi4core.train import optim

        t = self.spec.train
        lr = lr_at(step, t)
        optim.set_lr(self.optimizer, lr)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        iters = [iter(batches) for _ in self.model]
        reduced = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_micro,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        loss = self._global_loss(reduced)
        outcome = optim.step(self.optimizer, t.grad_clip, loss, self.on_gpu)
        return {"loss": loss, "lr": lr, "grad_norm": outcome.grad_norm,
                "skipped": not outcome.applied, "skipped_because": outcome.skipped_because}

    def _global_loss(self, reduced: list) -> float:
        """Token-weighted mean loss over all micro-batches and DP ranks (last stage, tp 0)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        acc = torch.zeros(2, dtype=torch.float64)
        if (ps.is_pipeline_last_stage(ignore_virtual=True)
                and ps.get_tensor_model_parallel_rank() == 0):
            for r in reduced:
                acc += r["lm loss"].detach().double().cpu()
        if dist.get_world_size() > 1:
            dist.all_reduce(acc)
        return float(acc[0] / acc[1].clamp(min=1))

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        from phi4core import model_weights
        from phi4core.train import resume_checkpoints as ckpt
        from phi4core.train.data import StepBatches, collator_for
        from phi4core.train.freezing import check_unchanged, frozen_checksums
        from phi4core.train.metrics import MetricsWriter
        from phi4core.train.signals import PreemptionFlag, die_with_launcher

        spec, t = self.spec, self.spec.train
        flag = PreemptionFlag().install()
        die_with_launcher()
        self.setup()
        stage_dir, ckpt_root = Path(spec.stage_dir), Path(spec.stage_dir) / "checkpoints"
        start, consumed, first_loss, last_loss = 0, 0, None, None
        skips = SkippedSteps(t.max_skipped_steps)
        resume = ckpt.newest_intact(ckpt_root)
        if resume is not None:
            progress = ckpt.load(resume, self.model, self.optimizer,
                                 with_data_state=self.mixture is not None)
            if self.mixture is not None:
                self.mixture.load_state_dict(progress.pop("data_state"))
            start, consumed = progress["step"], progress["consumed_samples"]
            first_loss, last_loss = progress.get("first_loss"), progress.get("last_loss")
            skips.restore(progress)
            if self.rank == 0:
                log.info("resumed from %s (step %d, %d samples consumed)", resume, start, consumed)
        metrics = MetricsWriter(stage_dir, t.total_steps, spec.logging, self.rank == 0,
                                spec.run, resumed=resume is not None)
        batches = self.mixture or StepBatches(
            self.samples, start, t.total_steps, t.global_batch_size, t.micro_batch_size,
            self.dp_rank, self.dp, block_mask=not self.on_gpu,
            num_workers=spec.data.num_workers,
            collate=collator_for(spec, self.tokenizer, not self.on_gpu))
        if self.rank == 0:
            print(f"stage {spec.name}: peak lr {t.peak_lr:.6g} ({t.schedule}), "
                  f"{t.total_steps} steps from step {start}", flush=True)
        meta = model_weights.model_meta(self.raw_chunks, spec.model)

        def progress(step: int) -> dict:
            return {"step": step, "consumed_samples": consumed, "first_loss": first_loss,
                    "last_loss": last_loss, "seed": t.seed, **skips.state()}

        def save(step: int) -> None:
            ckpt.save(ckpt_root, step, self.model, self.optimizer, progress(step), t.keep_last,
                      meta, data_state=None if self.mixture is None else batches.state_dict())

        tokens_per_step = t.global_batch_size * t.seq_length
        completed = False
        try:
            for step in range(start, t.total_steps):
                began = time.perf_counter()
                out = self.train_step(step, batches.next_step())
                consumed += t.global_batch_size
                elapsed = time.perf_counter() - began
                first_loss = out["loss"] if first_loss is None else first_loss
                last_loss = out["loss"]
                skips.record(step, out["skipped_because"], self.rank == 0)
                metrics.log(step, {**out, "skipped_steps": skips.total,
                                   "tokens_per_s": tokens_per_step / elapsed,
                                   "step_time_s": elapsed, "peak_mem_mb": _peak_mem_mb(),
                                   "consumed_samples": consumed})
                if self.rank == 0 and (step % spec.logging.interval == 0
                                       or step + 1 == t.total_steps):
                    metrics.progress(step, out["loss"], out["lr"])
                skips.check()
                if self.hooks.after_step is not None:
                    self.hooks.after_step(step, self.raw_chunks)
                done = step + 1
                saved = done % t.save_interval == 0 and done < t.total_steps
                if saved:
                    save(done)
                # Asked after the periodic save: a signal that came while it was written
                # needs no second checkpoint of the same step.
                if flag.agreed():
                    if not saved:
                        save(done)
                    if self.rank == 0:
                        print(f"preempted (signal {flag.signum}): checkpoint at step {done}",
                              flush=True)
                    return exitcodes.PREEMPTED
            if start < t.total_steps or resume is None:
                save(t.total_steps)
            completed = True
        finally:
            batches.close()
            metrics.close(ok=completed)
        after = frozen_checksums(self.raw_chunks)
        check_unchanged(self.checksums_before, after)
        self.write_artifacts({"before": self.checksums_before, "after": after},
                             first_loss, last_loss, start, skips.total)
        if self.rank == 0:
            self.evaluate()
        return exitcodes.OK

    def evaluate(self) -> None:
        """The held-out evaluations (phi4core.evaluation.stage) into the stage folder, and
        printed. One process holding the whole model runs them: a model split by tp or pp
        is measured by an evaluation stage instead. A failed evaluation is logged, never
        fails the trained stage."""
        if len(self.raw_chunks) != 1 or self.spec.parallel.model_parallel_size != 1:
            log.info("held-out evaluation skipped: the model is split across processes")
            return
        began = time.perf_counter()
        try:
            from phi4core.evaluation.stage import evaluate_stage, write_evaluation

            results = evaluate_stage(self.spec, self.raw_chunks[0], self.tokenizer)
        except Exception:
            log.exception("held-out evaluation of stage %s failed", self.spec.name)
            return
        if results is None:
            return
        path = write_evaluation(self.spec, results)
        for r in results:
            print(f"evaluation {self.spec.name}: {r.line()}", flush=True)
        log.info("held-out evaluation in %.1f s: %s", time.perf_counter() - began, path)

    def write_artifacts(self, checksums: dict, first_loss, last_loss, start: int,
                        skipped: int) -> None:
        """`output_dir/<output>` for each output: the weights of its module groups (refused
        when not finite) with the tokenizer, frozen_checksums.json and train_summary.json."""
        from phi4core.interop.hf import copy_tokenizer
        from phi4core.model_weights import save_model_weights
        from phi4core.train.freezing import weights_sha256
        from phi4core.train.signals import shielded_helpers

        spec, t = self.spec, self.spec.train

        def add_tokenizer(folder: Path) -> None:
            (folder / "tokenizer").mkdir()
            copy_tokenizer(self.tokenizer.path, folder / "tokenizer")

        weights = weights_sha256(self.raw_chunks)
        for artifact, groups in output_groups(spec).items():
            out = Path(spec.output_dir) / artifact
            with shielded_helpers():
                save_model_weights(self.raw_chunks, out, spec.model, add_files=add_tokenizer,
                                   extra={"stage": spec.name, "fingerprint": spec.fingerprint},
                                   groups=groups)
            if self.rank != 0:
                continue
            (out / "frozen_checksums.json").write_text(json_text(checksums, indent=1))
            summary = {
                "stage": spec.name, "fingerprint": spec.fingerprint, "steps": t.total_steps,
                "resumed_from_step": start, "tokens": t.total_steps * t.tokens_per_step,
                "first_loss": first_loss, "last_loss": last_loss, "peak_lr": t.peak_lr,
                "skipped_steps": skipped, "inputs": self.loaded_inputs,
                "trainable": spec.trainable, "groups": list(groups),
                "weights_sha256": weights,
            }
            if self.mixture is not None:  # what the stream loaders skipped, with examples
                summary["data_reports"] = [r.to_dict() for r in self.mixture.reports()]
            (out / "train_summary.json").write_text(json_text(summary, indent=1))


class SkippedSteps:
    """Skipped optimizer steps: in all, and in a row (the stage fails past `limit`). Kept in
    the resume checkpoints, so a resumed run fails or not exactly as an uninterrupted one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0
        self.last_reason: str | None = None
        self.last_step = -1

    def state(self) -> dict:
        return {"skipped_steps": self.total, "skipped_in_a_row": self.in_a_row}

    def restore(self, progress: dict) -> None:
        self.total = progress.get("skipped_steps", 0)
        self.in_a_row = progress.get("skipped_in_a_row", 0)

    def record(self, step: int, reason: str | None, report: bool) -> None:
        if reason is None:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        self.last_reason, self.last_step = reason, step
        if report:
            log.warning("step %d skipped: %s (%d in a row, %d in all; the stage fails after "
                        "%d in a row)", step, reason, self.in_a_row, self.total, self.limit)

    def check(self) -> None:
        if self.in_a_row > self.limit:
            first = self.last_step - self.in_a_row + 1
            steps = f"steps {first}-{self.last_step}" if self.in_a_row > 1 else f"step {first}"
            raise TrainingDiverged(
                f"{self.in_a_row} optimizer step(s) in a row skipped ({steps}; last: "
                f"{self.last_reason}), more than train.max_skipped_steps ({self.limit}): the "
                "loss or gradients are not finite; lower train.lr or check the inputs and data")


def run(spec: StageSpec, hooks: Hooks | None = None) -> int:
    """Train one stage; returns the process exit code (see phi4core.exitcodes)."""
    from phi4core.data.report import DataError
    from phi4core.model_weights import NonFiniteWeights
    from phi4core.train.data import DataSpecError
    from phi4core.train.freezing import FrozenWeightsChanged
    from phi4core.train.inputs import InputError

    try:
        check_spec(spec)
        return Trainer(spec, hooks).run()
    except (SpecError, DataSpecError, InputError, DataError) as e:
        # DataError: a bad record met while training under data.on_bad_record: fail
        log.error("cannot train stage %s: %s", spec.name, e)
        return exitcodes.BAD_SPEC
    except (FrozenWeightsChanged, NonFiniteWeights, TrainingDiverged) as e:
        log.error("stage %s failed: %s; nothing is published", spec.name, e)
        return exitcodes.FAILURE
