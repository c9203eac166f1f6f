"""Phi-4-Multimodal's image tower: SigLIP-so400m on megatron-core layers, 2x2 pooling, the
"sub_glb" separators and the 2-layer GELU projector.

    tower = VisionTower(model_cfg.vision, model_cfg.hidden_size)     # parallel state set up
    embeds = tower(image_pixel_values, image_sizes, image_attention_mask)  # [tokens, hidden]

The encoder is a megatron ``TransformerBlock`` (LayerNorm, bidirectional attention with the
padding-only patches masked as keys, GELU(tanh) MLP with biases; column/row-parallel linears,
Transformer Engine's on a GPU), after a patch convolution and a learned position embedding
whose positions are rescaled over the valid patches of a padded crop (SigLIP-NaViT, as the
released model). Features are ``hidden_states[feature_layer]`` (-2: the output of layer 25 of
27), so only the layers up to it are built as modules. The rest of the checkpoint's tower
(the last layer, the post-layernorm and the attention-pooling head) is carried in
``unused_tail`` as persistent buffers under their Hugging Face names: it loads and saves with
the model and counts in ``parameter_counts()``, but never runs and is never trained (as
parameters it would get no gradient, which data-parallel training and "every trainable
parameter has a gradient" both forbid).

megatron's own ``CLIPViTModel`` (subtype "siglip") does not fit: fixed positions without patch
masks, no key padding, features only after the last layer and its post-layernorm, and a
``.cuda()`` at construction; its layer spec (``vit_layer_specs``) is used, with the mask type
changed to padding.

``num_image_tokens`` (the processor's count) and the HD transform live in the torch-only
``hd_transform`` module and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.vision.vit_layer_specs import (
    get_vit_layer_with_local_spec,
    get_vit_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from phi4core.config import VisionConfig
from phi4core.models.hd_transform import num_image_tokens, process_images  # noqa: F401
from phi4core.models.tower_common import (
    BufferTree,
    ShardedCheckpointing,
    base_config_kwargs,
    count,
    decoder_settings,
    lecun_normal_,
    place_like_megatron,
    projector_config,
    tp_group,
    use_transformer_engine,
)
from phi4core.param_counts import siglip_tail_shapes

__all__ = ["VisionTower", "build_tower", "num_image_tokens", "process_images",
           "siglip_tail_shapes"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def encoder_config(vc: VisionConfig, **overrides) -> TransformerConfig:
    """The SigLIP layers as a megatron TransformerConfig (only the layers that run)."""
    kw = base_config_kwargs(**overrides)
    kw.update(
        num_layers=vc.used_layers,
        hidden_size=vc.hidden_size,
        ffn_hidden_size=vc.intermediate_size,
        num_attention_heads=vc.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vc.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        add_bias_linear=True,
        add_qkv_bias=True,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


class PaddingSDPAAttention(DotProductAttention):
    """megatron's core attention for a key padding mask ([b, 1, 1, s], True = hidden), through
    torch SDPA instead of materialising, masking and softmaxing the scores step by step (the
    local spec's attention; TE's fused attention takes the same mask on a GPU)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        s, b, heads, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        keep = None if attention_mask is None else ~attention_mask
        p = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * hn)


def encoder_layer_spec(use_te: bool):
    """Megatron's ViT layer spec with the attention bidirectional over a key padding mask."""
    spec = (get_vit_layer_with_transformer_engine_spec() if use_te
            else get_vit_layer_with_local_spec())
    attn = spec.submodules.self_attention
    attn.params = {"attn_mask_type": AttnMaskType.padding}
    if not use_te:
        attn.submodules.core_attention = PaddingSDPAAttention
    return spec


class PatchEmbedding(nn.Module):
    """Patch convolution + learned positions; a padded crop's valid patches are spread over the
    whole position grid (fractional coordinates bucketed, as SigLIP-NaViT), padding gets 0."""

    def __init__(self, vc: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = vc.image_size // vc.patch_size
        self.patch_embedding = nn.Conv2d(3, vc.hidden_size, vc.patch_size, vc.patch_size,
                                         dtype=dtype)
        self.position_embedding = nn.Embedding(self.side * self.side, vc.hidden_size,
                                               dtype=dtype)
        # As transformers initialises SigLIP: a LeCun-normal patch convolution with a zero bias,
        # positions of std 1/sqrt(width). torch's defaults (positions of std 1) bury a fresh
        # tower's patch content under its positions, and a projector trained on such a tower
        # learns nothing of the image (docs/media_learning_investigation.md).
        with torch.no_grad():
            lecun_normal_(self.patch_embedding.weight)
            nn.init.zeros_(self.patch_embedding.bias)
            nn.init.normal_(self.position_embedding.weight, std=vc.hidden_size ** -0.5)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        n, s = patch_mask.shape[0], self.side
        boundaries = torch.arange(1 / s, 1.0, 1 / s, device=patch_mask.device)
        step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
        idx = torch.arange(s, device=patch_mask.device, dtype=torch.float32)
        frac_h = torch.clamp(idx[None, :] * step_h[:, None], max=1.0 - 1e-6)
        frac_w = torch.clamp(idx[None, :] * step_w[:, None], max=1.0 - 1e-6)
        bh = torch.bucketize(frac_h, boundaries, right=True)
        bw = torch.bucketize(frac_w, boundaries, right=True)
        ids = (bh[:, :, None] * s + bw[:, None, :]).reshape(n, -1)
        return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [n, s*s, hidden]
        return x + self.position_embedding(self.position_ids(patch_mask))


class VisionTower(ShardedCheckpointing, nn.Module):
    """Pixels of the HD transform -> projected image embeddings, in the processor's order."""

    def __init__(self, vc: VisionConfig, out_hidden: int, *, dtype: torch.dtype = torch.float32,
                 use_te: bool | None = None, **config_overrides) -> None:
        super().__init__()
        self.vc = vc
        if use_te is None:
            use_te = use_transformer_engine()
        self.side = vc.image_size // vc.patch_size
        self.pooled = self.side // vc.pool
        self.config = encoder_config(vc, params_dtype=dtype, **config_overrides)
        self.embeddings = PatchEmbedding(vc, dtype)
        self.encoder = TransformerBlock(self.config, encoder_layer_spec(use_te),
                                        pre_process=True, post_process=False)
        self.unused_tail = BufferTree(siglip_tail_shapes(vc), dtype)
        h = vc.hidden_size
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, h, dtype=dtype))
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, h, dtype=dtype))
        pcfg = projector_config(out_hidden, F.gelu, params_dtype=dtype, **config_overrides)
        self.projector = MLP(pcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                 linear_fc2=RowParallelLinear),
                             input_size=h, ffn_hidden_size=out_hidden, tp_group=tp_group())
        self.to(dtype)  # megatron's torch LayerNorms are created in float32 whatever the dtype
        place_like_megatron(self, self.config)

    def parameter_counts(self) -> dict[str, int]:
        """The reference table's rows for this tower (full sizes at TP=1)."""
        return {
            "encoder_used": count(self.embeddings) + count(self.encoder),
            "encoder_unused_tail": sum(b.numel() for b in self.unused_tail.buffers()),
            "separators": self.sub_GN.numel() + self.glb_GN.numel(),
            "projector": count(self.projector),
        }

    def crop_features(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops and [n, s, s] patch masks -> pooled [n, g, g, hidden]."""
        n = pixels.shape[0]
        mask = patch_mask.to(torch.bool)
        x = self.embeddings(pixels, mask)
        # megatron: [seq, batch, hidden]; a True in the mask hides that key.
        x = self.encoder(x.transpose(0, 1).contiguous(), ~mask.reshape(n, 1, 1, -1))
        x = x.transpose(0, 1).reshape(n, self.side, self.side, -1).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, self.vc.pool, self.vc.pool)
        return x.permute(0, 2, 3, 1)

    def arrange(self, feats: torch.Tensor, image_size: torch.Tensor,
                pooled_mask: torch.Tensor | None) -> torch.Tensor:
        """One image's [crops+1, g, g, hidden] features as the token sequence: HD rows each
        followed by sub_GN, then glb_GN, then the global view's rows each followed by sub_GN."""
        g, h = self.pooled, feats.shape[-1]
        crop = self.vc.image_size
        gh, gw = int(image_size[0]) // crop, int(image_size[1]) // crop
        glob = torch.cat([feats[0], self.sub_GN[0].expand(g, 1, h)], dim=1).reshape(-1, h)
        hd = (feats[1: 1 + gh * gw].reshape(gh, gw, g, g, h).transpose(1, 2)
              .reshape(gh * g, gw * g, h))
        if pooled_mask is not None:
            m = (pooled_mask[1: 1 + gh * gw].reshape(gh, gw, g, g).transpose(1, 2)
                 .reshape(gh * g, gw * g))
            hd = hd[: int(m[:, 0].sum().item()), : int(m[0, :].sum().item())]
        rows = hd.shape[0]
        hd = torch.cat([hd, self.sub_GN[0].expand(rows, 1, h)], dim=1).reshape(-1, h)
        return torch.cat([hd, self.glb_GN[0], glob], dim=0)

    def forward(self, image_pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None, *,
                input_mode=None) -> torch.Tensor:
        """[B, crops+1, 3, H, W], [B, 2], [B, crops+1, s, s] -> [sum of tokens, out_hidden].
        ``input_mode`` (the multimodal model's tower contract) does not change the image path:
        VISION and VISION_SPEECH embed images alike."""
        if image_sizes is None:
            raise ValueError("image_sizes is required with image_pixel_values: the [height, "
                             "width] of each image's HD grid (the image processor's output)")
        b, n = image_pixel_values.shape[:2]
        if image_attention_mask is None:
            image_attention_mask = image_pixel_values.new_ones(b, n, self.side, self.side)
        feats = self.crop_features(image_pixel_values.flatten(0, 1),
                                   image_attention_mask.flatten(0, 1))
        feats = feats.reshape(b, n, self.pooled, self.pooled, -1)
        pooled_mask = image_attention_mask[:, :, 0::self.vc.pool, 0::self.vc.pool]
        tokens = torch.cat([self.arrange(feats[i], image_sizes[i], pooled_mask[i])
                            for i in range(b)], dim=0)
        out, bias = self.projector(tokens)
        return out + bias if bias is not None else out


def build_tower(model_cfg, config: TransformerConfig) -> VisionTower:
    """The multimodal model's vision tower (phi4core.models.multimodal's builder contract):
    ``model_cfg.vision`` projected to the decoder's width, in the decoder config's dtype and
    initialisation."""
    return VisionTower(model_cfg.vision, model_cfg.hidden_size, **decoder_settings(config))
