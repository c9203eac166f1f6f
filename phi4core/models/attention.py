"""Core attention for the local (non-Transformer-Engine) layer spec.

megatron's ``DotProductAttention`` materialises the [b, heads, s, s] score matrix, masks and
softmaxes it in separate steps and repeats the K/V heads for GQA. For the plain causal case
without packing, this subclass calls ``torch.nn.functional.scaled_dot_product_attention``
(fused kernels on CPU and GPU, GQA without copies) instead, and defers to megatron for
everything else (explicit masks, packed sequences, sliding windows, softmax offsets).
Same inputs ([s, b, heads, head_dim]) and output ([s, b, heads * head_dim]) as megatron's.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    def _sdpa_applies(self, query, key, attention_mask, mask_type, attention_bias,
                      packed_seq_params) -> bool:
        return (
            packed_seq_params is None
            and attention_bias is None
            and attention_mask is None
            and mask_type == AttnMaskType.causal
            and query.shape[0] == key.shape[0]
            and getattr(self, "softmax_offset", None) is None
            and getattr(self.config, "window_size", None) is None
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if not self._sdpa_applies(query, key, attention_mask, mask_type, attention_bias,
                                  packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        sq, b, heads, hn = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        p = self.attention_dropout.p if self.training else 0.0
        gqa = k.shape[1] != heads
        if p > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
            )
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def use_sdpa_core_attention(spec):
    """Swap the core attention of a local GPT layer spec for SDPADotProductAttention."""
    attn = spec.submodules.self_attention.submodules
    if attn.core_attention is DotProductAttention:
        attn.core_attention = SDPADotProductAttention
    return spec

