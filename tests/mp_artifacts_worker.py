"""Stage artifacts across layouts (run by tests/test_artifacts_mp.py under torchrun, gloo).

`save SRC` (1 process, TP=1): a tiny multimodal model, its LoRA B factors random so the
adapters are not zeros, saved as three artifacts SRC/backbone, SRC/vision and SRC/speech, each
with exactly its module groups. `assemble SRC OUT TP PP`: the same model built from other
seeds at TP x PP, its groups loaded from the three artifacts, saved whole to OUT/model.
`siglip DIR OUT TP PP`: the model at TP x PP, its vision encoder loaded from the transformers
SigLIP folder DIR, saved whole to OUT/model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ARTIFACTS = {
    "backbone": ["backbone"],
    "vision": ["lora.vision", "vision.encoder", "vision.projector"],
    "speech": ["lora.speech", "audio.encoder", "audio.projector"],
}


def _chunks(tp: int, pp: int, seed: int):
    from phi4core.config import preset
    from phi4core.models.multimodal import build_multimodal_chunks
    from phi4core.parallel import ParallelSettings, init_parallel

    par = ParallelSettings(tp=tp, pp=pp)
    init_parallel(par, seed=seed)
    torch.manual_seed(seed)
    mc = preset("phi4_multimodal_tiny")
    return mc, build_multimodal_chunks(mc, par, lora_seed=seed)


def save(src: Path) -> None:
    from phi4core.model_weights import save_model_weights

    mc, chunks = _chunks(1, 1, seed=1)
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    for artifact, groups in ARTIFACTS.items():
        save_model_weights(chunks, src / artifact, mc, groups=groups)


def assemble(src: Path, out: Path, tp: int, pp: int) -> None:
    from phi4core.model_weights import load_model_weights, save_model_weights

    mc, chunks = _chunks(tp, pp, seed=7)
    for artifact, groups in ARTIFACTS.items():
        load_model_weights(chunks, src / artifact, groups=groups)
    save_model_weights(chunks, out / "model", mc)


def siglip(folder: Path, out: Path, tp: int, pp: int) -> None:
    from phi4core.interop.hf_siglip import load_siglip_weights
    from phi4core.model_weights import save_model_weights

    mc, chunks = _chunks(tp, pp, seed=7)
    load_siglip_weights(chunks, folder, mc)
    save_model_weights(chunks, out / "model", mc)


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    elif sys.argv[1] == "siglip":
        siglip(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        assemble(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
