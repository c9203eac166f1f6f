"""Tiny transformers Phi-4-Multimodal towers with random weights, and their weights mapped onto
phi4core's towers (through phi4core.interop.hf_mapping's table)."""

from __future__ import annotations

import torch

from phi4core.config import ModelConfig


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


def _tower_state(hf: dict, hf_prefix: str, mc: ModelConfig, tower: torch.nn.Module,
                 attr: str) -> dict:
    """A transformers tower's state dict (names inside its embedding module) as our tower's,
    through phi4core's HF mapping table."""
    from phi4core.interop.hf import state_from_hf

    return state_from_hf(tower, f"{attr}.", lambda n: hf[n.removeprefix(hf_prefix)], mc)


def vision_state_from_hf(hf: dict[str, torch.Tensor], mc: ModelConfig, tower) -> dict:
    """A Phi4MultimodalImageEmbedding state dict as a VisionTower state dict."""
    return _tower_state(hf, "model.embed_tokens_extend.image_embed.", mc, tower, "vision")


def audio_state_from_hf(hf: dict[str, torch.Tensor], mc: ModelConfig, tower) -> dict:
    """A Phi4MultimodalAudioEmbedding state dict as an AudioTower state dict."""
    return _tower_state(hf, "model.embed_tokens_extend.audio_embed.", mc, tower, "audio")


def load_exact(module: torch.nn.Module, state: dict) -> None:
    """load_state_dict that ignores only megatron's `_extra_state` entries."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
