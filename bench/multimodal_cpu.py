"""Forward+backward time per sample of the tiny phi4core MultimodalModel against transformers'
Phi4MultimodalForCausalLM (with its two adapters through PEFT) of the same config and the same
weights, per input mode, with each tower's share of the time, measured in one run.

    OMP_NUM_THREADS=1 python bench/multimodal_cpu.py [--seconds 4] [--rounds 8]
        [--modes language,vision,speech,vision_speech]

One sample: one image of a few crops and/or one short clip, made by transformers' own image
processor and feature extractor, in a short prompt. Every parameter is trainable in both models
(so the step is the same work in both: the whole graph's gradients).

Shares: each tower is timed ALONE with the same inputs (its forward, then a backward of its
output against a fixed random gradient) in the same rounds as the full step; its share is
tower time / full step time, and the decoder's share is the rest (embedding, placeholder
assembly, layers, head, loss). transformers' towers are its ``image_embed`` / ``audio_embed``
modules (which also write their rows into the text embeddings).

The steps run in alternating short rounds (the order flips every round), so load from other
processes hits both alike; figures are medians of the per-round values, with their spread.
"ratio" = ours / transformers in samples/s (higher is better for us). Set-up is the trainer's:
``phi4core.runtime.init()`` first. Prints one JSON object, then one human line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from decoder_cpu import _spread, _timed  # noqa: E402  (bench/ is not a package)

MODES = ("language", "vision", "speech", "vision_speech")
TOWER_OF_INPUT = {"vision": "vision", "speech": "audio"}  # mode part -> our tower attribute


def _towers(mode: str) -> list[str]:
    return [TOWER_OF_INPUT[p] for p in mode.split("_") if p in TOWER_OF_INPUT]


def sample_inputs(mc) -> dict[str, dict]:
    """Per mode: one sample's input_ids (placeholders expanded) and the processors' outputs."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))  # 2 crops
    img = Phi4MultimodalImageProcessor()(images=[image], return_tensors="pt")
    clip = (rng.standard_normal(24000) * 0.1).astype(np.float32)  # 1.5 s at 16 kHz
    aud = Phi4MultimodalFeatureExtractor()(clip, sampling_rate=16000, return_tensors="pt")
    n_img, n_aud = int(img["num_img_tokens"][0]), int(aud["audio_embed_sizes"][0])
    vis = {k: img[k] for k in ("image_pixel_values", "image_sizes", "image_attention_mask")}
    spk = {k: aud[k] for k in ("audio_input_features", "audio_embed_sizes")}
    prompt, answer = [1, 40, 41, 42], [50, 51, 52, 53, 2]
    ids = {
        "language": prompt + answer,
        "vision": prompt + [mc.image_token_id] * n_img + answer,
        "speech": prompt + [mc.audio_token_id] * n_aud + answer,
        "vision_speech": prompt + [mc.image_token_id] * n_img + [60]
        + [mc.audio_token_id] * n_aud + answer,
    }
    extra = {"language": {}, "vision": vis, "speech": spk, "vision_speech": {**vis, **spk}}
    return {m: {"input_ids": torch.tensor([ids[m]]), **extra[m]} for m in MODES}


def build_pair(mc):
    """Our model (random, LoRA factors random too) and transformers' model of its HF export."""
    import torch
    from peft import PeftModel
    from transformers import Phi4MultimodalForCausalLM

    from phi4core.interop.hf import save_hf
    from phi4core.models.multimodal import build_multimodal_model

    ours = build_multimodal_model(mc)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the logits
        for name, p in ours.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d, mc)
        base = Phi4MultimodalForCausalLM.from_pretrained(d, attn_implementation="sdpa")
        # The towers in eager attention: transformers' SDPA path runs them causal, unpadded.
        base.config.vision_config._attn_implementation = "eager"
        base.config.audio_config._attn_implementation = "eager"
        ref = PeftModel.from_pretrained(base, f"{d}/vision-lora", adapter_name="vision")
        ref.load_adapter(f"{d}/speech-lora", adapter_name="speech")
    return ours, ref


class RefModel:
    """transformers' model in one input mode: adapter selected, every parameter trainable."""

    def __init__(self, peft_model):
        self.peft = peft_model
        self.hf = peft_model.get_base_model()

    def select(self, mode: str) -> None:
        if mode == "language":
            self.peft.base_model.disable_adapter_layers()
        else:
            self.peft.base_model.enable_adapter_layers()
            self.peft.set_adapter("speech" if mode == "speech" else "vision")
        for p in self.peft.parameters():  # PEFT freezes all but the active adapter
            p.requires_grad_(p.dtype.is_floating_point)

    def logits(self, x: dict):
        return self.hf(**x, use_cache=False).logits

    def tower(self, tower: str, mode: str, x: dict):
        ext = self.hf.model.embed_tokens_extend
        text = self.hf.model.embed_tokens(x["input_ids"]).detach()
        if tower == "vision":
            return ext.image_embed(x["input_ids"], text, image_pixel_values=x["image_pixel_values"],
                                   image_sizes=x["image_sizes"],
                                   image_attention_mask=x["image_attention_mask"])
        return ext.audio_embed(x["input_ids"], text,
                               audio_input_features=x["audio_input_features"],
                               audio_embed_sizes=x["audio_embed_sizes"],
                               audio_projection_mode="vision" if mode == "vision_speech"
                               else "speech")


def make_steps(ours, ref: RefModel, mode: str, x: dict) -> dict:
    """{(model, part): one forward+backward}; part is "step" or a tower name."""
    import torch
    import torch.nn.functional as F

    from phi4core.models.lora import InputMode

    im = InputMode[mode.upper()]
    ref.select(mode)  # the steps of one mode run together
    labels = x["input_ids"][:, 1:].reshape(-1)
    ours_kwargs = {k: v for k, v in x.items() if k != "input_ids"}

    def loss_backward(logits, model):
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels).backward()
        model.zero_grad(set_to_none=True)

    def step_ours():
        loss_backward(ours(x["input_ids"], None, None, input_mode=im, **ours_kwargs), ours)

    def step_ref():
        loss_backward(ref.logits(x), ref.peft)

    grads: dict = {}

    def tower_step(name, run, model):
        def step():
            out = run()
            g = grads.setdefault(name, torch.randn(out.shape, generator=torch.Generator()
                                                   .manual_seed(2)))
            (out * g).sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    steps = {("ours", "step"): step_ours, ("ref", "step"): step_ref}
    for tower in _towers(mode):
        module = getattr(ours, tower)
        names = [n for n in ours_kwargs if n.startswith("image" if tower == "vision" else "audio")]
        steps[("ours", tower)] = tower_step(
            ("ours", tower), lambda m=module, n=names: m(input_mode=im, **{k: x[k] for k in n}),
            ours)
        steps[("ref", tower)] = tower_step(
            ("ref", tower), lambda t=tower: ref.tower(t, mode, x), ref.peft)
    return steps


def measure(steps: dict, seconds: float, rounds: int) -> dict:
    """Per-round seconds/call of every step, alternating the order every round."""
    for _ in range(2):  # warm-up: allocator, autograd graph caches
        for step in steps.values():
            step()
    full = max(_timed(steps[("ours", "step")], 1)[0], _timed(steps[("ref", "step")], 1)[0])
    n = max(1, round(seconds / rounds / full))
    keys = list(steps)
    out = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 else keys[::-1]):
            out[k].append(_timed(steps[k], n)[0])
    return {"times": out, "calls_per_round": n}


def summarize(mode: str, m: dict) -> dict:
    t = m["times"]
    ratios = [r / o for o, r in zip(t[("ours", "step")], t[("ref", "step")])]
    res = {"calls_per_round": m["calls_per_round"]}
    for who, label in (("ours", "phi4core"), ("ref", "transformers")):
        full = t[(who, "step")]
        shares = {}
        for tower in _towers(mode):
            per_round = [a / b for a, b in zip(t[(who, tower)], full)]
            shares[tower] = round(statistics.median(per_round), 3)
        shares["decoder"] = round(1.0 - sum(shares.values()), 3)
        res[label] = {"ms_per_sample": round(1000 * statistics.median(full), 2),
                      "shares": shares}
    res["ratio"] = round(statistics.median(ratios), 3)
    res["ratio_spread"] = _spread(ratios)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="measuring time per mode for each model's full step")
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating rounds the measuring time is split into")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {', '.join(MODES)}")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {bad}; expected some of {', '.join(MODES)}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    from phi4core import runtime

    runtime.init()

    import torch

    from phi4core.config import LoraConfig, preset
    from phi4core.parallel import init_single_process

    torch.manual_seed(0)
    init_single_process()
    tiny = preset("phi4_multimodal_tiny")
    mc = tiny.model_copy(update={
        "name": "phi4_multimodal_tiny_r8_16",
        # the released 448-pixel crops, which transformers' image processor makes (the tiny
        # preset's own are 112)
        "vision": tiny.vision.model_copy(update={"image_size": 448}),
        "lora_vision": LoraConfig(rank=8, alpha=16, dropout=0.0),
        "lora_speech": LoraConfig(rank=16, alpha=32, dropout=0.0),
    })
    ours, peft_model = build_pair(mc)
    ref = RefModel(peft_model)
    inputs = sample_inputs(mc)

    from phi4core.models.lora import InputMode

    diffs = {}
    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        for mode in modes:
            x = inputs[mode]
            ref.select(mode)
            mine = ours(x["input_ids"], None, None, input_mode=InputMode[mode.upper()],
                        **{k: v for k, v in x.items() if k != "input_ids"})
            diffs[mode] = (mine.float() - ref.logits(x).float()).abs().max().item()
    ours.train()
    peft_model.train()

    out = {
        "bench": "multimodal_cpu",
        "preset": mc.name,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "towers_timed": "alone, same inputs; decoder share = the rest",
        "image_crops": int(inputs["vision"]["image_pixel_values"].shape[1]),
        "image_tokens": int((inputs["vision"]["input_ids"] == mc.image_token_id).sum()),
        "audio_tokens": int((inputs["speech"]["input_ids"] == mc.audio_token_id).sum()),
        "modes": {},
    }
    for mode in modes:
        m = measure(make_steps(ours, ref, mode, inputs[mode]), args.seconds, args.rounds)
        out["modes"][mode] = {"seq": int(inputs[mode]["input_ids"].shape[1]),
                              **summarize(mode, m), "logits_max_abs_diff": diffs[mode]}
    print(json.dumps(out))
    for mode, r in out["modes"].items():
        o, t, s = r["phi4core"], r["transformers"], r["ratio_spread"]

        def shares(d):
            return ", ".join(f"{k} {v:.0%}" for k, v in d.items())

        print(f"{mode}: phi4core {o['ms_per_sample']} ms/sample ({shares(o['shares'])}) vs "
              f"transformers {t['ms_per_sample']} ms/sample ({shares(t['shares'])}): ratio "
              f"{r['ratio']}x median of {args.rounds} rounds (spread {s['min']}-{s['max']})",
              file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
