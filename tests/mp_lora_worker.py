"""Multi-process check of the Mixture of LoRAs under tensor/pipeline/sequence parallelism on CPU
(gloo), run under torchrun with 2 processes by tests/test_lora_mp.py:

    torchrun --nproc_per_node 2 tests/mp_lora_worker.py OUT_DIR

A: TP=1 (every rank a full replica): the decoder with both adapters (B randomised), written as
   an HF folder + two PEFT adapter folders; logits in each mode; a few AdamW steps training
   LoRA_V only, in vision mode; the adapter after them.
B: TP=2 from those folders: the same logits (also with LoRA_V merged) and steps; the adapter
   after them; a dist checkpoint. C: PP=2 (1F1B): the same steps. D: the TP=2 checkpoint
   loaded at TP=1.
E: sequence parallelism at TP=2 on a column (qkv-like) -> row (down-like) pair of wrapped
   linears, against TP=1: outputs and every factor's gradient (megatron's local layer spec
   cannot run sequence parallelism on CPU, so the pair is built on its own).
Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mp_parallel_worker import max_diff, run_steps  # noqa: E402

MODES = (1, 2)  # vision, speech
SEQ = 80


def _model_cfg():
    from phi4core.config import LoraConfig, preset

    # The text decoder with the multimodal preset's adapters (an HF Phi3 folder holds it).
    return preset("phi4_mini_tiny").model_copy(update={
        "lora_vision": LoraConfig(rank=4, alpha=8),
        "lora_speech": LoraConfig(rank=6, alpha=12),
    })


def _tokens(vocab):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _build(mc, par, **kw):
    from phi4core.models.multimodal import build_multimodal_chunks

    return build_multimodal_chunks(mc, par, towers={}, **kw)


def _logits(chunks, mc):
    x = _tokens(mc.vocab_size)
    out = {}
    with torch.no_grad():
        for mode in MODES:
            out[mode] = chunks[0](x, None, None, input_mode=mode,
                                  runtime_gather_output=True).float()
    return out


def _train_lora(chunks, mc, par):
    from phi4core.train.freezing import apply_freezing

    apply_freezing(chunks, ["lora.vision"])
    for c in chunks:
        c.train()
    return run_steps(chunks, mc, par, input_mode=1)


def _all_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def sequence_parallel_pair(tp: int, sp: bool) -> dict:
    """Outputs and factor gradients of a wrapped column -> row pair, whole (gathered)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from phi4core.config import LoraConfig, preset
    from phi4core.interop.hf import gather_tp
    from phi4core.models.decoder import transformer_config
    from phi4core.models.lora import TARGETS, LoraRouter, wrap_linear
    from phi4core.parallel import ParallelSettings

    mc = preset("phi4_mini_tiny")
    cfg = transformer_config(mc, ParallelSettings(tp=tp))
    cfg.sequence_parallel = sp
    h, f, s, b = mc.hidden_size, mc.ffn_hidden_size, 16, 2
    g = torch.Generator().manual_seed(11)
    w_col = torch.randn(2 * f, h, generator=g) * 0.05
    w_row = torch.randn(h, f, generator=g) * 0.05
    x = torch.randn(s, b, h, generator=g)
    col = ColumnParallelLinear(h, 2 * f, config=cfg, init_method=torch.nn.init.zeros_,
                               bias=False, gather_output=False)
    row = RowParallelLinear(f, h, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        gate, up = w_col.chunk(2)
        col.weight.copy_(torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]))
        row.weight.copy_(w_row.chunk(tp, dim=1)[rank])
    router = LoraRouter()
    lcfg = {"speech": LoraConfig(rank=5, alpha=10)}
    wrap_linear(col, TARGETS["gate_up_proj"], lcfg, router, layer=0)
    wrap_linear(row, TARGETS["down_proj"], lcfg, router, layer=0)
    with torch.no_grad():  # B starts at zero: give it values, the same at every layout
        full_b = torch.randn(2 * f, 5, generator=g) * 0.1
        gate, up = full_b.chunk(2)
        col.lora_speech.B.copy_(torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]))
        row.lora_speech.B.copy_(torch.randn(h, 5, generator=g) * 0.1)
    router.select(2)
    x_local = x.chunk(tp)[rank] if sp else x
    inter, _ = col(x_local)
    gate_out, up_out = inter.chunk(2, dim=-1)
    y, _ = row(torch.nn.functional.silu(gate_out) * up_out)
    y.pow(2).sum().backward()
    if sp:  # what finalize_model_grads does for replicated factors under sequence parallelism
        for p in (col.lora_speech.A, row.lora_speech.B):
            assert p.sequence_parallel
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    # loss is summed over the sequence: under SP each rank holds its slice of y
    y_full = y
    if sp and tp > 1:
        parts = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(parts, y.contiguous(), group=ps.get_tensor_model_parallel_group())
        y_full = torch.cat(parts)
    return {
        "y": y_full.detach(),
        "col.A.grad": col.lora_speech.A.grad,
        "col.B.grad": gather_tp("gate_up", col.lora_speech.B.grad),
        "row.A.grad": gather_tp("row", row.lora_speech.A.grad),
        "row.B.grad": row.lora_speech.B.grad,
    }


def main() -> None:
    out_dir = sys.argv[1]
    import torch.distributed as dist

    from phi4core.interop.hf import load_hf_weights, save_hf
    from phi4core.interop.lora_adapters import adapter_state_dict, load_adapter, save_adapter
    from phi4core.model_weights import load_model_weights, save_model_weights
    from phi4core.models.lora import lora_linears, merge_adapter
    from phi4core.parallel import ParallelSettings, init_parallel

    mc = _model_cfg()
    hf_dir = os.path.join(out_dir, "hf")
    adapters = {a: os.path.join(out_dir, f"{a}-lora") for a in ("vision", "speech")}
    ckpt = os.path.join(out_dir, "ckpt_tp2")
    res: dict = {}

    # A: TP=1 reference.
    par = init_parallel(ParallelSettings(tp=1), seed=1234)
    chunks = _build(mc, par)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, linear in lora_linears(chunks):
            for f in linear.lora_factors().values():
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.05)
    save_hf(chunks, hf_dir, mc)
    for a, folder in adapters.items():
        save_adapter(chunks, a, folder)
    ref_logits = _logits(chunks, mc)
    res["loss_tp1"] = _train_lora(chunks, mc, par)
    ref_after = adapter_state_dict(chunks, "vision")
    ref_speech = adapter_state_dict(chunks, "speech")

    def load(chunks):
        load_hf_weights(chunks, hf_dir, mc)
        for a, folder in adapters.items():
            load_adapter(chunks, a, folder)

    # B: TP=2.
    par = init_parallel(ParallelSettings(tp=2), seed=1234)
    chunks = _build(mc, par, perform_initialization=False)
    load(chunks)
    qkv = chunks[0].decoder.layers[0].self_attention.linear_qkv
    res["tp2_qkv_lora_shapes"] = [list(qkv.lora_vision.A.shape), list(qkv.lora_vision.B.shape)]
    proj = chunks[0].decoder.layers[0].self_attention.linear_proj
    res["tp2_proj_lora_shapes"] = [list(proj.lora_vision.A.shape),
                                   list(proj.lora_vision.B.shape)]
    logits = _logits(chunks, mc)
    res["tp2_logits_maxdiff"] = {m: (logits[m] - ref_logits[m]).abs().max().item()
                                 for m in MODES}
    # merged at TP=2 (each rank its shard of W + scale * B A): language mode gives the
    # unmerged vision logits of TP=1
    merged = _build(mc, par, perform_initialization=False)
    load(merged)
    merge_adapter(merged, "vision")
    with torch.no_grad():
        got = merged[0](_tokens(mc.vocab_size), None, None, input_mode=0,
                        runtime_gather_output=True).float()
    res["tp2_merged_vision_maxdiff"] = (got - ref_logits[1]).abs().max().item()
    del merged
    res["loss_tp2"] = _train_lora(chunks, mc, par)
    res["tp2_adapter_after_maxdiff"] = max_diff(adapter_state_dict(chunks, "vision"), ref_after)
    res["tp2_frozen_speech_maxdiff"] = max_diff(adapter_state_dict(chunks, "speech"), ref_speech)
    tp2_after = adapter_state_dict(chunks, "vision")
    save_model_weights(chunks, ckpt, mc)

    # C: PP=2 (1F1B).
    par = init_parallel(ParallelSettings(pp=2), seed=1234)
    chunks = _build(mc, par, perform_initialization=False)
    load(chunks)
    res["loss_pp2"] = _train_lora(chunks, mc, par)
    mine = adapter_state_dict(chunks, "vision")
    res["pp2_adapter_after_maxdiff"] = _all_max(
        max_diff(mine, {k: ref_after[k] for k in mine}))
    res["pp2_adapter_tensors"] = _all_max(float(len(mine)))

    # D: the TP=2 dist checkpoint (LoRA factors sharded as declared) loaded at TP=1.
    par = init_parallel(ParallelSettings(tp=1), seed=1234)
    chunks = _build(mc, par, perform_initialization=False)
    load_model_weights(chunks, ckpt)
    res["ckpt_tp2_to_tp1_adapter_maxdiff"] = max_diff(adapter_state_dict(chunks, "vision"),
                                                      tp2_after)

    # E: sequence parallelism on a wrapped column -> row pair.
    init_parallel(ParallelSettings(tp=1), seed=1234)
    ref = sequence_parallel_pair(1, sp=False)
    init_parallel(ParallelSettings(tp=2), seed=1234)
    for sp in (False, True):
        got = sequence_parallel_pair(2, sp=sp)
        # relative to the largest reference value (the gradients of a summed square are big)
        res[f"sp_pair_maxdiff_sp{int(sp)}"] = {
            k: (got[k] - ref[k]).abs().max().item() / max(1.0, ref[k].abs().max().item())
            for k in ref}
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
