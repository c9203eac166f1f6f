"""megatron's DDP wrapper and optimizer for a stage, and the optimizer step with its checks.

`step` takes or skips one optimizer step: skipped, with the reason, when fp16's loss scale
overflowed or the loss or the global gradient norm is not finite, so a non-finite value never
reaches the weights. The trainer counts skipped steps and fails the stage after too many in a
row (`train.max_skipped_steps`). Global-norm clipping is done here on CPU and GPU alike, after
the norm is known to be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phi4core import dtypes
from phi4core.config import StageSpec


def wrap_ddp(chunks: list, on_gpu: bool) -> list:
    """Megatron DistributedDataParallel around each chunk (frozen params get no grad buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=on_gpu,
    )
    return [
        DistributedDataParallel(chunk.config, cfg, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(spec: StageSpec, ddp_chunks: list, on_gpu: bool):
    """AdamW with the recipe's betas/eps/weight decay. megatron's own `step()` (which clips
    inside, with CUDA-only code) is never called: `step` below clips, so clip_grad is 0 here."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t, p = spec.train, spec.precision
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.peak_lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_eps=t.eps,
        clip_grad=0.0,
        bf16=p.params == "bf16",
        fp16=p.params == "fp16",
        params_dtype=dtypes.to_dtype(p.params),
        use_distributed_optimizer=on_gpu,
    )
    return get_megatron_optimizer(cfg, ddp_chunks)


def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def set_lr(optimizer, lr: float) -> None:
    for opt in sub_optimizers(optimizer):
        for group in opt.param_groups:
            group["lr"] = lr


def global_grad_norm(optimizer) -> float:
    """L2 norm of all gradients over the model-parallel ranks. megatron's own filter
    (`get_main_grads_for_grad_norm`) drops TP-duplicated params on tp rank > 0 and the shared
    embedding's second copy, so nothing is counted twice; squares are summed over the
    optimizer's grad-stats group (tp x pp)."""
    import torch.distributed as dist

    total = torch.zeros(1, dtype=torch.float64)
    group = None
    for opt in sub_optimizers(optimizer):
        for g in opt.get_main_grads_for_grad_norm():
            total += g.detach().double().pow(2).sum().cpu()
        group = opt.get_grad_stats_parallel_group()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, group=group)
    return math.sqrt(total.item())


@dataclass
class StepOutcome:
    applied: bool
    grad_norm: float  # before clipping; NaN when fp16's overflow check stopped the step first
    skipped_because: str | None = None


def clip_grads(optimizer, max_norm: float, norm: float) -> None:
    """Scale the main gradients by max_norm / norm when the norm is above max_norm."""
    if max_norm <= 0 or norm <= max_norm:
        return
    grads = [g.grad for opt in sub_optimizers(optimizer) for g in opt.get_parameters()
             if g.grad is not None]
    if grads:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


def step(optimizer, max_norm: float, loss: float, on_gpu: bool) -> StepOutcome:
    """One optimizer step with global-norm clipping, or a skipped one (collective: every rank
    reaches the same decision, from the all-reduced loss and norm)."""
    if optimizer.prepare_grads():  # fp16: inf/NaN in the unscaled gradients
        return StepOutcome(False, float("nan"), "fp16 loss-scale overflow")
    # megatron's norm is CUDA code; on CPU the same sum is taken in float64 here.
    norm = float(optimizer.get_grad_norm()) if on_gpu else global_grad_norm(optimizer)
    if not math.isfinite(loss):
        return StepOutcome(False, norm, f"loss is {loss}")
    if not math.isfinite(norm):
        return StepOutcome(False, norm, f"gradient norm is {norm}")
    clip_grads(optimizer, max_norm, norm)
    optimizer.step_with_ready_grads()
    return StepOutcome(True, norm)
