"""Tiny transformers Phi-4-Multimodal towers with random weights, and their weights mapped onto
phi4core's towers (test-only: the table-driven HF interop is issue 11 item 6)."""

from __future__ import annotations

import torch

from phi4core.config import AudioConfig, ModelConfig, VisionConfig


def hf_config(mc: ModelConfig):
    """A transformers Phi4MultimodalConfig whose towers are those of `mc` (every field set:
    the class defaults are not the released model)."""
    from transformers import Phi4MultimodalConfig

    vc, ac = mc.vision, mc.audio
    return Phi4MultimodalConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
        intermediate_size=mc.ffn_hidden_size, num_hidden_layers=1,
        num_attention_heads=mc.num_attention_heads, num_key_value_heads=mc.num_query_groups,
        tie_word_embeddings=True, pad_token_id=mc.pad_token_id, bos_token_id=mc.bos_token_id,
        eos_token_id=mc.eos_token_id,
        vision_config=dict(
            hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
            num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_heads,
            image_size=vc.image_size, patch_size=vc.patch_size, crop_size=vc.image_size,
            layer_norm_eps=vc.layer_norm_eps, feature_layer=vc.feature_layer,
            image_token_id=mc.image_token_id,
        ),
        audio_config=dict(
            hidden_size=ac.attention_dim, intermediate_size=ac.ffn_dim,
            num_blocks=ac.num_blocks, num_attention_heads=ac.num_heads,
            ext_pw_out_channel=ac.attention_dim, depthwise_separable_out_channel=ac.attention_dim,
            nemo_conv_channels=ac.conv_channels, kernel_size=ac.conv_kernel,
            bias_max_distance=ac.relative_attention_max_distance, time_reduction=ac.time_reduction,
            input_size=ac.num_mel_bins, chunk_size=-1, audio_token_id=mc.audio_token_id,
        ),
    )


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Every parameter and float buffer random (separators and GLU biases start at zero in
    both implementations, which would let their mistakes pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("global_invstd"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def hf_image_embedding(mc: ModelConfig, seed: int = 0):
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as m

    cfg = hf_config(mc)
    cfg.vision_config._attn_implementation = "eager"  # SDPA runs it causal without padding
    emb = m.Phi4MultimodalImageEmbedding(cfg).eval()
    randomize(emb, seed)
    return emb


def hf_audio_embedding(mc: ModelConfig, seed: int = 0):
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as m

    cfg = hf_config(mc)
    cfg.audio_config._attn_implementation = "eager"
    emb = m.Phi4MultimodalAudioEmbedding(cfg).eval()
    randomize(emb, seed)
    return emb


def _qkv(q, k, v, heads: int) -> torch.Tensor:
    """HF's separate q/k/v (weights or biases) as megatron's fused linear_qkv: per head
    [q_h | k_h | v_h] (multi-head attention: one query group per head)."""
    parts = [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def vision_state_from_hf(hf: dict[str, torch.Tensor], vc: VisionConfig) -> dict:
    """A Phi4MultimodalImageEmbedding state dict as a VisionTower state dict."""
    out: dict[str, torch.Tensor] = {}
    p = "img_processor."
    out["embeddings.patch_embedding.weight"] = hf[p + "embeddings.patch_embedding.weight"]
    out["embeddings.patch_embedding.bias"] = hf[p + "embeddings.patch_embedding.bias"]
    out["embeddings.position_embedding.weight"] = hf[p + "embeddings.position_embedding.weight"]
    for i in range(vc.used_layers):
        s, d = f"{p}encoder.layers.{i}.", f"encoder.layers.{i}."
        for ln_hf, ln in (("layer_norm1", "input_layernorm"), ("layer_norm2", "pre_mlp_layernorm")):
            out[d + ln + ".weight"] = hf[s + ln_hf + ".weight"]
            out[d + ln + ".bias"] = hf[s + ln_hf + ".bias"]
        for kind in ("weight", "bias"):
            out[d + f"self_attention.linear_qkv.{kind}"] = _qkv(
                *(hf[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv"), vc.num_heads)
            out[d + f"self_attention.linear_proj.{kind}"] = hf[s + f"self_attn.out_proj.{kind}"]
            out[d + f"mlp.linear_fc1.{kind}"] = hf[s + f"mlp.fc1.{kind}"]
            out[d + f"mlp.linear_fc2.{kind}"] = hf[s + f"mlp.fc2.{kind}"]
    for name, t in hf.items():
        if name.startswith(p) and not name.startswith(p + "embeddings."):
            rest = name[len(p):]
            layer = rest.split(".")[2] if rest.startswith("encoder.layers.") else None
            if layer is None or int(layer) >= vc.used_layers:
                out["unused_tail." + rest] = t
    out["sub_GN"] = hf["sub_img_feature_extensor"]
    out["glb_GN"] = hf["global_img_feature_extensor"]
    for kind in ("weight", "bias"):
        out[f"projector.linear_fc1.{kind}"] = hf[f"img_projection_up.{kind}"]
        out[f"projector.linear_fc2.{kind}"] = hf[f"img_projection_down.{kind}"]
    return out


def audio_state_from_hf(hf: dict[str, torch.Tensor], ac: AudioConfig) -> dict:
    """A Phi4MultimodalAudioEmbedding state dict as an AudioTower state dict (the encoder's
    names are the checkpoint's)."""
    out = {k: v for k, v in hf.items() if k.startswith("encoder.")}
    for kind in ("weight", "bias"):
        for mode in ("speech", "vision_speech"):
            out[f"projector_{mode}.linear_fc1.{kind}"] = hf[f"up_proj_for_{mode}.{kind}"]
            out[f"projector_{mode}.linear_fc2.{kind}"] = hf[f"down_proj_for_{mode}.{kind}"]
    return out


def load_exact(module: torch.nn.Module, state: dict) -> None:
    """load_state_dict that ignores only megatron's `_extra_state` entries."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
