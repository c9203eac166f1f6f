"""Multi-process check of the Phi-4-Multimodal HF import at TP=2 and PP=2 on CPU (gloo), run
under torchrun with 2 processes by tests/test_mm_hf_interop.py:

    torchrun --nproc_per_node 2 tests/mp_mm_hf_worker.py HF_DIR INPUTS_PT OUT_DIR

A: TP=1 logits of the imported folder in every input mode. B: the same at TP=2 (towers,
decoder and LoRA factors sharded by the mapping table). C: hf-to-phi4 at TP=2 and at PP=2, each
exported back at TP=1 (the test compares those folders with HF_DIR bit for bit). Rank 0 writes
OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def logits(loaded, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {mode: loaded(input_mode=mode, **x) for mode, x in inputs.items()}


def main() -> None:
    hf_dir, inputs_pt, out_dir = sys.argv[1:4]
    import torch.distributed as dist

    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf
    from phi4core.interop.hf import load_hf_model
    from phi4core.parallel import ParallelSettings

    inputs = torch.load(inputs_pt)
    res: dict = {}
    ref = logits(load_hf_model(hf_dir, parallel=ParallelSettings(tp=1)), inputs)

    loaded = load_hf_model(hf_dir, parallel=ParallelSettings(tp=2))
    vision = loaded.model.vision
    res["tp2_vision_qkv_rows"] = vision.encoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    res["tp2_lora_qkv_B_rows"] = (loaded.model.decoder.layers[0].self_attention.linear_qkv
                                  .lora_vision.B.shape[0])
    got = logits(loaded, inputs)
    res["tp2_maxdiff"] = {m: (got[m] - ref[m]).abs().max().item() for m in ref}
    res["scale"] = {m: ref[m].abs().max().item() for m in ref}

    for name, par in (("tp2", ParallelSettings(tp=2)), ("pp2", ParallelSettings(pp=2))):
        ckpt = hf_to_phi4(hf_dir, os.path.join(out_dir, f"ckpt_{name}"), parallel=par)
        phi4_to_hf(ckpt, os.path.join(out_dir, f"hf_from_{name}"),
                   parallel=ParallelSettings(tp=1))
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
