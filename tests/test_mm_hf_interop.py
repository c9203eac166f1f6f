"""Phi-4-Multimodal Hugging Face folders both ways: a random tiny transformers
Phi4MultimodalForCausalLM saved with PEFT adapters, imported, against transformers' logits in
every input mode; bit-exact round trips (both layouts); merged-adapter export; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from phi4core.config import LoraConfig, preset

pytest.importorskip("peft")
try:
    import torchvision  # noqa: F401  (made importable by phi4core.torchvision_compat)
except Exception:  # pragma: no cover - the shim's platform check
    pytest.skip("torchvision not importable", allow_module_level=True)

TOL = 1e-4


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


@pytest.fixture(scope="module")
def mc():
    return preset("phi4_multimodal_tiny").model_copy(update={
        "name": "mm_tiny_hf",
        "lora_vision": LoraConfig(rank=8, alpha=16, dropout=0.0),
        "lora_speech": LoraConfig(rank=16, alpha=32, dropout=0.01),
    })


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if name.endswith("global_invstd"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("norm.weight") or "layernorm" in name:
                t.copy_(1.0 + torch.randn(t.shape, generator=g) * scale)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def make_hf_folder(mc, folder: Path, seed: int = 0) -> Path:
    """A random transformers Phi4MultimodalForCausalLM of `mc` (every config field from our
    export) saved with its two adapters as PEFT folders, as the released model ships."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    from phi4core.interop.hf_multimodal import PEFT_TARGETS, hf_config_from_model_config

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config_from_model_config(mc)))
    cfg = Phi4MultimodalConfig.from_pretrained(folder)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    peft_model = None
    for adapter, lc in (("vision", mc.lora_vision), ("speech", mc.lora_speech)):
        pc = PeftLora(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                      target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(model, pc, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, pc)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_dir = folder / "_peft"
    peft_model.save_pretrained(peft_dir)
    for adapter in ("vision", "speech"):
        shutil.move(str(peft_dir / adapter), str(folder / f"{adapter}-lora"))
    shutil.rmtree(peft_dir)
    return folder


def hf_reference(folder: Path):
    """Transformers' model of `folder` with both adapters through PEFT, eager attention."""
    from peft import PeftModel
    from transformers import Phi4MultimodalForCausalLM

    model = Phi4MultimodalForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model.config.vision_config._attn_implementation = "eager"
    model.config.audio_config._attn_implementation = "eager"
    peft_model = PeftModel.from_pretrained(model, folder / "vision-lora", adapter_name="vision")
    peft_model.load_adapter(folder / "speech-lora", adapter_name="speech")
    return peft_model.eval()


def hf_reference_without(folder: Path, adapter: str):
    """Transformers' model of an export whose ``adapter`` is merged: no adapter loaded."""
    from transformers import Phi4MultimodalForCausalLM

    model = Phi4MultimodalForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model.config.vision_config._attn_implementation = "eager"
    model.config.audio_config._attn_implementation = "eager"
    return model.eval()


def _image(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed + w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def mode_inputs(mc) -> dict[str, dict]:
    """Per mode: input_ids with expanded placeholders and the processors' outputs: transformers'
    own feature extractor; the HD transform's (equal to transformers' image processor at 448-
    pixel crops: tests/test_mm_towers.py) at the tiny model's crops, which that processor
    does not take."""
    from transformers import Phi4MultimodalFeatureExtractor

    from phi4core.models.hd_transform import process_images

    img = process_images([_image(500, 300)], mc.vision.image_size)
    clip = (np.random.default_rng(3).standard_normal(24000) * 0.1).astype(np.float32)
    aud = Phi4MultimodalFeatureExtractor()(clip, sampling_rate=16000, return_tensors="pt")
    n_img, n_aud = int(img["num_img_tokens"][0]), int(aud["audio_embed_sizes"][0])
    vis = {k: img[k] for k in ("image_pixel_values", "image_sizes", "image_attention_mask")}
    spk = {k: aud[k] for k in ("audio_input_features", "audio_embed_sizes")}

    def ids(*parts):
        out = []
        for p in parts:
            out += p
        return torch.tensor([out])

    text = [1, 40, 41, 42]
    return {
        "language": {"input_ids": ids(text, [50, 51, 52, 2])},
        "vision": {"input_ids": ids(text, [mc.image_token_id] * n_img, [60, 61]), **vis},
        "speech": {"input_ids": ids(text, [mc.audio_token_id] * n_aud, [70]), **spk},
        "vision_speech": {"input_ids": ids(text, [mc.image_token_id] * n_img, [80],
                                           [mc.audio_token_id] * n_aud, [81]), **vis, **spk},
    }


def reference_logits(ref, mode: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        if mode == "language":
            with ref.disable_adapter():
                return ref(**inputs).logits.float()
        ref.set_adapter("speech" if mode == "speech" else "vision")
        return ref(**inputs).logits.float()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, mc, single):
    return make_hf_folder(mc, tmp_path_factory.mktemp("mm") / "hf")


@pytest.fixture(scope="module")
def reference(hf_folder, mc):
    ref = hf_reference(hf_folder)
    inputs = mode_inputs(mc)
    logits = {m: reference_logits(ref, m, x) for m, x in inputs.items()}
    with torch.no_grad(), ref.disable_adapter():  # speech inputs without the speech LoRA
        logits["speech_base"] = ref(**inputs["speech"]).logits.float()
    return inputs, logits


def _ours(loaded, mode, inputs):
    with torch.no_grad():
        return loaded(input_mode=mode, **inputs)


def test_imported_logits_match_transformers_in_every_mode(hf_folder, reference, mc):
    from phi4core.interop.hf import HFLoadedMultimodalModel, load_hf_model

    inputs, ref = reference
    loaded = load_hf_model(hf_folder)
    assert isinstance(loaded, HFLoadedMultimodalModel)
    assert loaded.model_cfg.lora_vision == mc.lora_vision.model_copy(
        update={"targets": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]})
    assert loaded.model_cfg.lora_speech.rank == 16
    assert loaded.model_cfg.lora_speech.dropout == pytest.approx(0.01)
    outs = {}
    for mode, x in inputs.items():
        outs[mode] = _ours(loaded, mode, x)
        assert outs[mode].dtype == torch.float32
        assert outs[mode].shape == ref[mode].shape, mode
        diff = (outs[mode] - ref[mode]).abs().max().item()
        assert diff <= TOL, (mode, diff)
    # The comparison can fail: each mode's adapter changes the logits.
    assert not torch.allclose(ref["vision"], _ours(loaded, "language", inputs["vision"]),
                              atol=1e-3)
    assert not torch.allclose(ref["speech"], ref["speech_base"], atol=1e-3)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        rel = f.parent.relative_to(folder)
        out.update({f"{rel}/{k}": v for k, v in load_file(f).items()})
    return out


def _assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    return len(ta)


def test_hf_phi4_hf_round_trip_bit_exact(hf_folder, tmp_path, reference):
    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf

    ckpt = hf_to_phi4(hf_folder, tmp_path / "phi4")
    out = phi4_to_hf(ckpt, tmp_path / "back")
    n = _assert_same_tensors(hf_folder, out)
    assert n > 100
    for adapter in ("vision", "speech"):
        cfg = json.loads((out / f"{adapter}-lora" / "adapter_config.json").read_text())
        src = json.loads((hf_folder / f"{adapter}-lora" / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (src["r"], src["lora_alpha"])
    # and transformers + PEFT load the export to the same logits
    inputs, ref = reference
    again = hf_reference(out)
    for mode in ("vision", "speech"):
        assert torch.equal(reference_logits(again, mode, inputs[mode]), ref[mode])


def test_bf16_folder_round_trips_at_bf16(hf_folder, tmp_path):
    """A bfloat16 folder (as released) comes back bfloat16, bit for bit, buffers included."""
    from safetensors.torch import load_file, save_file

    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf

    bf16 = tmp_path / "bf16"
    shutil.copytree(hf_folder, bf16)
    for f in bf16.rglob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})
    out = phi4_to_hf(hf_to_phi4(bf16, tmp_path / "phi4"), tmp_path / "back")
    assert _assert_same_tensors(bf16, out) > 100
    assert all(t.dtype == torch.bfloat16 for t in _all_tensors(out).values())


def to_phi4mm(hf_folder: Path, dst: Path, mc) -> Path:
    """The same model in the original remote-code layout: one folder, adapters inside."""
    from safetensors.torch import load_file, save_file

    from phi4core.interop.hf_mapping import to_phi4mm as rename

    dst.mkdir()
    tensors = {}
    for k, v in load_file(hf_folder / "model.safetensors").items():
        tensors[rename(k, lora_base=True)] = v
    for adapter in ("vision", "speech"):
        for k, v in load_file(hf_folder / f"{adapter}-lora" / "adapter_model.safetensors").items():
            tensors[rename(k.removeprefix("base_model.model."), adapter=adapter)] = v
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((hf_folder / "config.json").read_text())
    vc, ac = cfg.pop("vision_config"), cfg.pop("audio_config")
    cfg.update({
        "model_type": "phi4mm", "architectures": ["Phi4MMForCausalLM"],
        # The released config has neither (SigLIP-so400m and ids 200010/200011 are assumed).
        "vision_config": vc, "audio_token_id": ac["audio_token_id"],
        "audio_processor": {"name": "cascades", "config": {
            "attention_dim": ac["hidden_size"], "attention_heads": ac["num_attention_heads"],
            "linear_units": ac["intermediate_size"], "num_blocks": ac["num_blocks"],
            "nemo_conv_settings": {"conv_channels": ac["nemo_conv_channels"]},
            "relative_attention_bias_args": {"t5_bias_max_distance": ac["bias_max_distance"]},
            "time_reduction": 8, "input_size": 80, "kernel_size": 3}},
        "vision_lora": {"r": mc.lora_vision.rank, "lora_alpha": mc.lora_vision.alpha, "dp": 0.0},
        "speech_lora": {"r": mc.lora_speech.rank, "lora_alpha": mc.lora_speech.alpha,
                        "dp": 0.01},
    })
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_phi4mm_layout_imports_the_same(hf_folder, tmp_path, mc, reference):
    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf
    from phi4core.interop.hf import load_hf_model

    original = to_phi4mm(hf_folder, tmp_path / "phi4mm", mc)
    inputs, ref = reference
    loaded = load_hf_model(original)
    for mode in ("vision_speech", "speech"):
        assert (_ours(loaded, mode, inputs[mode]) - ref[mode]).abs().max() <= TOL
    out = phi4_to_hf(hf_to_phi4(original, tmp_path / "phi4"), tmp_path / "back")
    _assert_same_tensors(hf_folder, out)  # written in transformers' layout


def test_merged_adapter_export_gives_the_unmerged_logits(hf_folder, tmp_path, reference):
    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf
    from phi4core.interop.hf import load_hf_model

    inputs, ref = reference
    out = phi4_to_hf(hf_to_phi4(hf_folder, tmp_path / "phi4"), tmp_path / "merged",
                     merge_adapters=("vision",))
    assert not (out / "vision-lora").exists() and (out / "speech-lora").is_dir()
    assert load_hf_model(out).model_cfg.lora_vision is None
    _assert_same_tensors(hf_folder / "speech-lora", out / "speech-lora")  # untouched
    # transformers runs the merged base without the adapter: the unmerged vision logits
    model = hf_reference_without(out, "vision")
    for mode in ("vision", "vision_speech"):
        with torch.no_grad():
            got = model(**inputs[mode]).logits.float()
        assert (got - ref[mode]).abs().max() <= 1e-5, mode


def test_folders_that_are_neither_exit_2(tmp_path, hf_folder):
    """`phi4 convert hf-to-phi4` on a folder of another model, one without a config, a
    multimodal folder with a broken adapter and one with a tensor the model has no place for:
    exit 2, naming what is wrong."""
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    not_hf = tmp_path / "empty"
    not_hf.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(hf_folder, broken)
    (broken / "speech-lora" / "adapter_config.json").write_text("{")
    extra = tmp_path / "extra"
    shutil.copytree(hf_folder, extra)
    from safetensors.torch import load_file, save_file

    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, extra / "model.safetensors")
    for folder, words in ((bad, "model_type"), (not_hf, "config.json"),
                          (broken, "speech-lora/adapter_config.json"),
                          (extra, "model.layers.0.mlp.extra_proj.weight")):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "convert", "hf-to-phi4",
                               str(folder), str(tmp_path / "out")], capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 2, (folder, proc.stderr[-2000:])
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.cpu_only  # gloo ranks on one machine
def test_tp2_and_pp2_import_equal_tp1(hf_folder, reference, mc, tmp_path):
    """Imported at TP=2, the logits of every mode equal TP=1's within 1e-5; converted at TP=2
    and at PP=2 and exported back at TP=1, every tensor equals the source folder's."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    inputs, _ = reference
    torch.save(inputs, tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(root / "tests" / "mp_mm_hf_worker.py"), str(hf_folder),
           str(tmp_path / "inputs.pt"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["tp2_vision_qkv_rows"] == 3 * mc.vision.hidden_size // 2  # really split
    assert res["tp2_lora_qkv_B_rows"] == (mc.num_attention_heads + 2 * mc.num_query_groups) \
        * mc.kv_channels // 2
    for mode, diff in res["tp2_maxdiff"].items():
        assert res["scale"][mode] > 0.1
        assert diff <= 1e-5, (mode, diff)
    for name in ("tp2", "pp2"):
        _assert_same_tensors(hf_folder, tmp_path / f"hf_from_{name}")
