"""Multi-process check of tensor/pipeline parallelism on CPU (gloo), run under torchrun with 2
processes by tests/test_parallel_mp.py:

    torchrun --nproc_per_node 2 tests/mp_parallel_worker.py OUT_DIR

A: TP=1 (every rank a full replica): random init, written as an HF folder; reference losses of
   a few AdamW steps. B: TP=2 from that HF folder: same steps; saves a checkpoint. C: PP=2
   (1F1B) from the HF folder: same steps; then the TP=2 checkpoint loaded at PP=2 and compared
   tensor by tensor, and exported back to HF. D: the TP=2 checkpoint loaded at TP=1.
Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

STEPS = 3
BATCH = 4
MICRO = 2
SEQ = 80  # > the tiny preset's original context (64): the long LongRoPE factors are in play
LR = 1e-3


def batch_for(step: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)


def run_steps(chunks, model_cfg, par, **forward_kwargs) -> list[float]:
    """STEPS AdamW steps with megatron's forward/backward schedule; the loss of each step
    (mean token cross-entropy over the batch, before the update), on every rank.
    ``forward_kwargs`` go to every model call (the multimodal model's input_mode)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    fb = get_forward_backward_func()
    losses = []
    for step in range(STEPS):
        tokens = batch_for(step, model_cfg.vocab_size)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        micro = [(inputs[i : i + MICRO], labels[i : i + MICRO]) for i in range(0, BATCH, MICRO)]
        # one iterator per model chunk (interleaved schedules read each chunk's own)
        it = iter(micro) if len(chunks) == 1 else [iter(micro) for _ in chunks]

        def forward_step(data_iterator, m):
            x, y = next(data_iterator)
            out = m(x, None, None, labels=y, **forward_kwargs)

            def loss_func(per_token):
                loss = per_token.float().mean()
                return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

            return out, loss_func

        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        results = fb(
            forward_step_func=forward_step,
            data_iterator=it,
            model=chunks,
            num_microbatches=len(micro),
            seq_length=SEQ,
            micro_batch_size=MICRO,
            forward_only=False,
        )
        # Tied embeddings across pipeline stages: sum the two copies' gradients.
        if par.pp > 1 and model_cfg.tie_embeddings:
            for c in chunks:
                if c.pre_process or c.post_process:
                    w = c.shared_embedding_or_output_weight()
                    if w is not None and w.grad is not None:
                        dist.all_reduce(w.grad, group=ps.get_embedding_group())
        opt.step()
        if results:
            loss = torch.stack([r["loss"] for r in results]).mean()
        else:
            loss = torch.zeros(())
        # Share the last stage's loss with every rank.
        if par.pp > 1:
            src = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(loss, src=src, group=ps.get_pipeline_model_parallel_group())
        losses.append(float(loss))
    return losses


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        if k not in b:
            raise KeyError(f"{k} missing")
        worst = max(worst, (v.float() - b[k].float()).abs().max().item())
    return worst


def main() -> None:
    out_dir = sys.argv[1]
    import torch.distributed as dist

    from phi4core.config import preset
    from phi4core.interop.hf import hf_state_dict, load_hf_weights, save_hf
    from phi4core.model_weights import load_model_weights, save_model_weights
    from phi4core.models.decoder import build_model_chunks
    from phi4core.parallel import ParallelSettings, init_parallel

    t0 = time.time()
    mc = preset("phi4_mini_tiny")
    hf_dir = os.path.join(out_dir, "hf_init")
    ckpt = os.path.join(out_dir, "ckpt_tp2")
    res: dict = {"timings": {}}

    # A: TP=1 reference.
    par = init_parallel(ParallelSettings(tp=1), seed=1234)
    chunks = build_model_chunks(mc, par)
    save_hf(chunks, hf_dir, mc)
    res["loss_tp1"] = run_steps(chunks, mc, par)
    res["timings"]["tp1"] = time.time() - t0

    # B: TP=2 from the same weights.
    par = init_parallel(ParallelSettings(tp=2), seed=1234)
    chunks = build_model_chunks(mc, par, perform_initialization=False)
    load_hf_weights(chunks, hf_dir, mc)
    qkv = chunks[0].decoder.layers[0].self_attention.linear_qkv
    res["tp2_qkv_shard_shape"] = list(qkv.weight.shape)
    res["loss_tp2"] = run_steps(chunks, mc, par)
    save_model_weights(chunks, ckpt, mc)
    ref = hf_state_dict(chunks, mc)  # full tensors, on both TP ranks
    res["timings"]["tp2"] = time.time() - t0

    # C: PP=2 (1F1B) from the same weights.
    par = init_parallel(ParallelSettings(pp=2), seed=1234)
    chunks = build_model_chunks(mc, par, perform_initialization=False)
    load_hf_weights(chunks, hf_dir, mc)
    res["pp2_layers_per_stage"] = len(chunks[0].decoder.layers)
    res["loss_pp2"] = run_steps(chunks, mc, par)
    # The TP=2 checkpoint loaded at PP=2: every tensor of this stage equals TP=2's.
    chunks = build_model_chunks(mc, par, perform_initialization=False)
    load_model_weights(chunks, ckpt)
    mine = hf_state_dict(chunks, mc)
    diff = torch.tensor(max_diff(mine, ref))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    res["ckpt_tp2_to_pp2_maxdiff"] = float(diff)
    res["ckpt_tp2_to_pp2_tensors"] = len(mine)
    # Tied output layer on the last stage follows the embedding.
    m = chunks[0]
    if m.post_process and not m.pre_process:
        res_tied = (m.output_layer.weight - ref["model.embed_tokens.weight"]).abs().max().item()
        res["pp2_last_stage_tied_maxdiff"] = res_tied
    hf_pp2 = os.path.join(out_dir, "hf_from_pp2")
    save_hf(chunks, hf_pp2, mc)
    res["timings"]["pp2"] = time.time() - t0

    # D: the TP=2 checkpoint at TP=1.
    par = init_parallel(ParallelSettings(tp=1), seed=1234)
    chunks = build_model_chunks(mc, par, perform_initialization=False)
    load_model_weights(chunks, ckpt)
    full = hf_state_dict(chunks, mc)
    res["ckpt_tp2_to_tp1_maxdiff"] = max_diff(full, ref)
    res["ckpt_tp2_to_tp1_tensors"] = len(full)
    if dist.get_rank() == 0:
        from phi4core.interop.hf import HFCheckpoint

        ck = HFCheckpoint(hf_pp2)
        res["hf_from_pp2_maxdiff"] = max_diff({k: ck.get(k) for k in ck.keys()}, ref)
        res["hf_from_pp2_tensors"] = len(ck.keys())

    # E: interleaved 1F1B (PP=2 x 2 virtual stages) on a 4-layer variant, against its TP=1.
    mc4 = mc.model_copy(update={"num_layers": 4, "name": "phi4_mini_tiny_4l"})
    hf4 = os.path.join(out_dir, "hf_init_4l")
    par = init_parallel(ParallelSettings(tp=1), seed=1234)
    chunks = build_model_chunks(mc4, par)
    save_hf(chunks, hf4, mc4)
    res["loss_tp1_4l"] = run_steps(chunks, mc4, par)
    par = init_parallel(ParallelSettings(pp=2, vpp=2), seed=1234)
    chunks = build_model_chunks(mc4, par, perform_initialization=False)
    load_hf_weights(chunks, hf4, mc4)
    res["vpp_layers_per_chunk"] = [len(c.decoder.layers) for c in chunks]
    res["loss_pp2_vpp2_4l"] = run_steps(chunks, mc4, par)
    res["timings"]["total"] = time.time() - t0
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
