"""megatron's DDP wrapper and optimizer for a stage, and global-norm clipping on CPU."""

from __future__ import annotations

import math

import torch

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
    """AdamW with the recipe's betas/eps/weight decay. On CPU megatron's clipping asserts CUDA
    tensors, so clip_grad=0 there and `clip_and_norm` clips instead."""
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
        clip_grad=t.grad_clip if on_gpu else 0.0,
        bf16=p.params == "bf16",
        fp16=p.params == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[p.params],
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


def clip_and_step(optimizer, max_norm: float) -> float:
    """One optimizer step with our clipping (CPU path); returns the pre-clip grad norm."""
    if optimizer.prepare_grads():  # fp16 overflow: megatron skips the step
        return float("nan")
    norm = global_grad_norm(optimizer)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for opt in sub_optimizers(optimizer):
            for g in opt.get_parameters():
                if g.grad is not None:
                    g.grad.mul_(scale)
    optimizer.step_with_ready_grads()
    return norm
