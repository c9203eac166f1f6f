"""Phi-4-Multimodal Hugging Face folders: their configs, their LoRA adapters, their tensors.

Two layouts are read:

* ``transformers``' ``Phi4MultimodalForCausalLM`` (``model_type: phi4_multimodal``): the base
  weights and both towers in the model, each LoRA adapter as a PEFT folder beside it
  (``vision-lora/``, ``speech-lora/``: ``adapter_config.json`` + ``adapter_model.safetensors``,
  keys with or without PEFT's ``base_model.model.`` prefix). A missing adapter folder means the
  model has no such adapter (for instance one merged into the base at export).
* the original remote code's (``model_type: phi4mm``, ``Phi4MMForCausalLM``): one folder, the
  adapters inside the model (``...qkv_proj.lora_A.vision.weight`` beside
  ``...qkv_proj.base_layer.weight``), the tower modules under their original names, rank and
  alpha in ``vision_lora`` / ``speech_lora``. Its config has no SigLIP section (the remote code
  hard-wires SigLIP-so400m) and no placeholder ids (200010, 200011): the released values are
  used unless a ``vision_config`` (with ``image_token_id``) or an ``audio_token_id`` is present.

Only the first is written (``phi4core.interop.hf.save_hf``), with every config field set: the
``transformers`` config class defaults are not the released model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from phi4core.config import AudioConfig, LoraConfig, ModelConfig, VisionConfig, preset
from phi4core.interop.hf import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    ConversionError,
    HFCheckpoint,
    decoder_fields_from_hf,
    read_hf_config,
)
from phi4core.interop.hf import (
    hf_config_from_model_config as decoder_hf_config,
)
from phi4core.interop.hf_mapping import LORA_LINEARS, from_phi4mm
from phi4core.interop.lora_adapters import adapter_config, read_adapter_config
from phi4core.module_groups import LORA_ADAPTERS

ADAPTER_FOLDER = "{}-lora"  # vision-lora/, speech-lora/
# PEFT's target_modules as transformers' conversion writes it: a full-name regex, so that the
# conformer's own o_proj / gate_up_proj / down_proj are not wrapped too.
PEFT_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
# The remote code's placeholder ids (not in its config).
PHI4MM_IMAGE_TOKEN, PHI4MM_AUDIO_TOKEN = 200010, 200011
_RELEASED = preset("phi4_multimodal")


def is_multimodal(mc: ModelConfig) -> bool:
    """Exported as Phi4MultimodalForCausalLM (both towers), else as Phi3ForCausalLM (a decoder
    with adapters but no towers: its backbone); a config with only one tower has no Hugging
    Face counterpart."""
    towers = (mc.vision is not None, mc.audio is not None)
    if towers == (False, False):
        return False
    if not all(towers):
        raise ConversionError(f"model {mc.name!r} has only one tower: Phi4MultimodalForCausalLM "
                              "needs both the vision and the audio tower")
    return True


# ---------------------------------------------------------------------------------------------
# Config: HF -> ModelConfig
# ---------------------------------------------------------------------------------------------


def _expect_value(section: str, cfg: dict, key: str, want) -> None:
    got = cfg.get(key, want)
    if got != want:
        raise ConversionError(f"config field {section}{key!r} is {got!r}: only {want!r} is "
                              "supported (the Phi-4-Multimodal architecture)")


def _vision_from_hf(vc: dict) -> VisionConfig:
    s = "vision_config."
    _expect_value(s, vc, "hidden_act", "gelu_pytorch_tanh")
    _expect_value(s, vc, "num_channels", 3)
    if vc.get("crop_size", vc.get("image_size")) != vc.get("image_size", 448):
        raise ConversionError(f"config fields {s}crop_size ({vc.get('crop_size')}) and "
                              f"{s}image_size ({vc.get('image_size')}) differ")
    r = _RELEASED.vision
    return VisionConfig(
        num_layers=int(vc.get("num_hidden_layers", r.num_layers)),
        hidden_size=int(vc.get("hidden_size", r.hidden_size)),
        intermediate_size=int(vc.get("intermediate_size", r.intermediate_size)),
        num_heads=int(vc.get("num_attention_heads", r.num_heads)),
        patch_size=int(vc.get("patch_size", r.patch_size)),
        image_size=int(vc.get("image_size", r.image_size)),
        layer_norm_eps=float(vc.get("layer_norm_eps", r.layer_norm_eps)),
        feature_layer=int(vc.get("feature_layer", r.feature_layer)),
    )


def _audio_from_hf(ac: dict) -> AudioConfig:
    s = "audio_config."
    for key, want in (("activation", "swish"), ("conv_activation", "swish"),
                      ("conv_glu_type", "swish"), ("nemo_activation", "relu"),
                      ("bias_symmetric", False), ("chunk_size", -1), ("depthwise_multiplier", 1)):
        _expect_value(s, ac, key, want)
    dim = int(ac["hidden_size"])
    for key in ("ext_pw_out_channel", "depthwise_separable_out_channel"):
        _expect_value(s, ac, key, dim)
    return AudioConfig(
        num_mel_bins=int(ac.get("input_size", 80)),
        conv_channels=int(ac["nemo_conv_channels"]),
        time_reduction=int(ac.get("time_reduction", 8)),
        num_blocks=int(ac["num_blocks"]),
        attention_dim=dim,
        num_heads=int(ac["num_attention_heads"]),
        ffn_dim=int(ac["intermediate_size"]),
        conv_kernel=int(ac.get("kernel_size", 3)),
        relative_attention_max_distance=int(ac["bias_max_distance"]),
    )


def _phi4mm_audio(cfg: dict) -> dict:
    """The remote code's audio_processor.config in transformers' spelling."""
    try:
        ac = dict(cfg["audio_processor"]["config"])
        return {
            "hidden_size": ac["attention_dim"], "num_attention_heads": ac["attention_heads"],
            "intermediate_size": ac["linear_units"], "num_blocks": ac["num_blocks"],
            "nemo_conv_channels": ac["nemo_conv_settings"]["conv_channels"],
            "bias_max_distance": ac["relative_attention_bias_args"]["t5_bias_max_distance"],
            "time_reduction": ac.get("time_reduction", 8), "input_size": ac.get("input_size", 80),
            "kernel_size": ac.get("kernel_size", 3),
            "ext_pw_out_channel": ac.get("ext_pw_out_channel", ac["attention_dim"]),
            "depthwise_separable_out_channel": ac.get("depthwise_separable_out_channel",
                                                      ac["attention_dim"]),
        }
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"phi4mm config: audio_processor.config lacks {exc}") from None


def _lora_config(peft: dict, where: str, targets: list[str]) -> LoraConfig:
    try:
        r, alpha = peft["r"], peft["lora_alpha"]
    except KeyError as exc:
        raise ConversionError(f"{where}: field {exc} is missing") from None
    if float(alpha) != int(alpha):
        raise ConversionError(f"{where}: lora_alpha {alpha} is not a whole number")
    dropout = peft.get("lora_dropout", peft.get("dp", 0.0))
    return LoraConfig(rank=int(r), alpha=int(alpha), dropout=float(dropout), targets=targets)


def _targets_present(keys, adapter_suffix: str = "") -> list[str]:
    """The LoRA target names (qkv_proj, ...) whose layer-0 factors are among ``keys``."""
    out = []
    for _, hf, _, _ in LORA_LINEARS:
        if f"model.layers.0.{hf}.lora_A{adapter_suffix}.weight" in keys:
            out.append(hf.split(".")[-1])
    return out


def multimodal_config_from_hf(cfg: dict, name: str | None = None,
                              folder: str | os.PathLike | None = None) -> ModelConfig:
    """ModelConfig of a Phi4MultimodalForCausalLM (adapters from ``folder``'s PEFT folders)
    or phi4mm config (adapters from its ``vision_lora``/``speech_lora`` and, with ``folder``,
    the tensors present)."""
    fields = decoder_fields_from_hf(cfg, name or Path(cfg.get("_name_or_path") or
                                                      "hf_phi4_multimodal").name)
    original = cfg.get("model_type") == "phi4mm"
    try:
        if original:
            vc = cfg.get("vision_config") or {}
            vision = _vision_from_hf(vc)
            audio = _audio_from_hf(_phi4mm_audio(cfg))
            image_token = int(vc.get("image_token_id", PHI4MM_IMAGE_TOKEN))
            audio_token = int(cfg.get("audio_token_id", PHI4MM_AUDIO_TOKEN))
        else:
            vc, ac = cfg.get("vision_config"), cfg.get("audio_config")
            if not isinstance(vc, dict) or not isinstance(ac, dict):
                raise ConversionError("config needs 'vision_config' and 'audio_config' objects")
            vision, audio = _vision_from_hf(vc), _audio_from_hf(ac)
            image_token = int(vc.get("image_token_id", PHI4MM_IMAGE_TOKEN))
            audio_token = int(ac.get("audio_token_id", PHI4MM_AUDIO_TOKEN))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"the tower config does not fit: {exc}") from None
    loras: dict[str, LoraConfig | None] = {}
    for adapter, group in LORA_ADAPTERS.items():
        loras[group.module] = None
        if original:
            peft = cfg.get(f"{adapter}_lora")
            if peft is None:
                continue
            targets = [t for _, hf, _, _ in LORA_LINEARS for t in [hf.split(".")[-1]]]
            if folder is not None:
                keys = {from_phi4mm(k)[0] for k in HFCheckpoint(folder).keys()
                        if f".{adapter}." in k}
                targets = _targets_present(keys) or targets
            loras[group.module] = _lora_config(peft, f"config field '{adapter}_lora'", targets)
        elif folder is not None and (Path(folder) / ADAPTER_FOLDER.format(adapter)).is_dir():
            sub = Path(folder) / ADAPTER_FOLDER.format(adapter)
            keys = adapter_keys(sub)
            targets = _targets_present(keys)
            if not targets:
                raise ConversionError(f"{sub / ADAPTER_WEIGHTS}: no LoRA factors of the decoder "
                                      "layers (model.layers.0.<module>.lora_A.weight)")
            loras[group.module] = _lora_config(read_adapter_config(sub), str(sub / ADAPTER_CONFIG),
                                               targets)
    try:
        return ModelConfig(**fields, vision=vision, audio=audio, image_token_id=image_token,
                           audio_token_id=audio_token, **loras)
    except ValueError as exc:
        raise ConversionError(f"HF config does not make a valid ModelConfig: {exc}") from exc


def adapter_keys(folder: Path) -> set[str]:
    return {k.removeprefix(PEFT_PREFIX) for k in HFCheckpoint(folder, ADAPTER_WEIGHTS).keys()}


# ---------------------------------------------------------------------------------------------
# Config: ModelConfig -> HF
# ---------------------------------------------------------------------------------------------


def hf_config_from_model_config(mc: ModelConfig, dtype: torch.dtype | str = "float32") -> dict:
    """A Phi4MultimodalForCausalLM ``config.json`` with every field set."""
    text = mc.model_copy(update={"vision": None, "audio": None, "lora_vision": None,
                                 "lora_speech": None})
    cfg = decoder_hf_config(text, dtype)
    vc, ac = mc.vision, mc.audio
    cfg.update({
        "architectures": ["Phi4MultimodalForCausalLM"],
        "model_type": "phi4_multimodal",
        "vision_config": {
            "model_type": "phi4_multimodal_vision",
            "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": vc.num_layers, "num_attention_heads": vc.num_heads,
            "num_channels": 3, "image_size": vc.image_size, "patch_size": vc.patch_size,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vc.layer_norm_eps,
            "attention_dropout": 0.0, "crop_size": vc.image_size,
            "image_token_id": mc.image_token_id, "feature_layer": vc.feature_layer,
        },
        "audio_config": {
            "model_type": "phi4_multimodal_audio",
            "hidden_size": ac.attention_dim, "intermediate_size": ac.ffn_dim,
            "num_blocks": ac.num_blocks, "num_attention_heads": ac.num_heads,
            "activation": "swish", "chunk_size": -1, "left_chunk": 18, "dropout_rate": 0.0,
            "ext_pw_out_channel": ac.attention_dim,
            "depthwise_separable_out_channel": ac.attention_dim, "depthwise_multiplier": 1,
            "kernel_size": ac.conv_kernel, "conv_activation": "swish",
            "input_size": ac.num_mel_bins, "conv_glu_type": "swish",
            "time_reduction": ac.time_reduction,
            "bias_max_distance": ac.relative_attention_max_distance, "bias_symmetric": False,
            "nemo_activation": "relu", "nemo_conv_channels": ac.conv_channels,
            "downsample_rate": 1, "initializer_range": 0.02,
            "audio_token_id": mc.audio_token_id, "feature_layer": -2,
        },
    })
    return cfg


def adapter_configs(chunks) -> dict[str, dict]:
    """The PEFT adapter_config.json of each adapter the model still has (not merged)."""
    out = {}
    for adapter in LORA_ADAPTERS:
        try:
            cfg = adapter_config(chunks, adapter)
        except ValueError:
            continue  # not in the model, or merged into the base weights
        out[adapter] = {**cfg, "target_modules": PEFT_TARGETS}
    return out


# ---------------------------------------------------------------------------------------------
# Reading tensors by transformers name, whatever the layout
# ---------------------------------------------------------------------------------------------


class HFSource:
    """The tensors of an HF folder under transformers' names: ``get(name, adapter)``, the
    adapter's factors by their PEFT key less the prefix."""

    def __init__(self, path: Path, model_config: ModelConfig, backbone_only: bool) -> None:
        self.path = path
        self.model_config = model_config
        self.backbone_only = backbone_only  # a Phi-3 folder: the decoder's tensors only
        self._index: dict[tuple[str, str | None], tuple[HFCheckpoint, str]] = {}
        self._used: set[tuple[str, str | None]] = set()

    def add(self, ck: HFCheckpoint, rename) -> None:
        """Index ``ck``'s tensors under ``rename(key)``; a key renamed to None is left out."""
        for key in ck.keys():
            name = rename(key)
            if name is not None:
                self._index[name] = (ck, key)

    def has(self, name: str, adapter: str | None = None) -> bool:
        return (name, adapter) in self._index

    def get(self, name: str, adapter: str | None = None) -> torch.Tensor:
        if (name, adapter) not in self._index:
            which = f" (the {adapter} LoRA)" if adapter else ""
            raise ConversionError(f"tensor {name!r}{which} is missing from {self.path}")
        self._used.add((name, adapter))
        ck, key = self._index[(name, adapter)]
        return ck.get(key)

    def unused(self) -> list[tuple[str, str | None]]:
        """(name, adapter) of every tensor not read yet."""
        return [k for k in self._index if k not in self._used]

    def dtype(self) -> torch.dtype:
        ck, key = next(iter(self._index.values()))
        return ck.get(key).dtype


def open_hf_source(path: str | os.PathLike) -> HFSource:
    """An HF folder of either kind (Phi-3 or Phi-4-Multimodal, either layout), checked."""
    from phi4core.interop.hf import model_config_from_hf

    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{p}: not a folder")
    cfg = read_hf_config(p)
    mc = model_config_from_hf(cfg, folder=p)
    model_type = cfg.get("model_type")
    source = HFSource(p, mc, backbone_only=model_type == "phi3")
    ck = HFCheckpoint(p)
    if model_type == "phi4mm":
        source.add(ck, from_phi4mm)
        return source
    source.add(ck, lambda k: (k, None))
    for adapter, group in LORA_ADAPTERS.items():
        if getattr(mc, group.module) is None:
            continue
        sub = p / ADAPTER_FOLDER.format(adapter)
        source.add(HFCheckpoint(sub, ADAPTER_WEIGHTS),
                   lambda k, a=adapter: (k.removeprefix(PEFT_PREFIX), a))
    return source
