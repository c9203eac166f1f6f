"""CPU fast paths for the local-spec decoder: megatron's math with less Python and fewer ops.

On a CPU the tiny and small decoders are bound by per-op overhead, not by FLOPs: megatron's
local modules spend most of a step in Python (TP bookkeeping around every linear, RoPE applied
to q and k separately with cos/sin recomputed per layer, the layer's recompute/offload/
inference branches). ``apply(model)`` swaps, by class, each module it can serve for a subclass
whose forward computes the same function with plain torch calls:

* linears: ``F.linear`` (TP=1: megatron's autograd function reduces to the same matmuls);
* the word embedding: ``F.embedding`` (TP=1: the reduction is an identity);
* self-attention: one qkv matmul; splitting q/k/v and RoPE on q and k as one autograd node
  (cos/sin computed once and reused by every layer); torch SDPA with ``is_causal`` and
  native GQA;
* the MLP: SwiGLU as one autograd node writing its gradient in place (no split/cat);
* the transformer layer: norm, attention, residual add, norm, MLP, residual add.

Every fast forward is exactly the megatron computation (same ops on the same values, so the
same logits and gradients); any call it does not cover (explicit masks, packed sequences,
inference contexts, dropout in training, recomputation, ...) goes to megatron's forward.
Parameters and buffers stay where they are, so ``state_dict`` keys do not change.

``applies()`` is False with a GPU or with Transformer Engine: the GPU path never sees any of
this. ``build_model`` calls ``apply`` there; ``remove`` restores megatron's classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from phi4core.models.attention import SDPADotProductAttention


def applies(use_te: bool) -> bool:
    """True where the fast paths may be used: a CPU-only torch and the local layer spec."""
    return not use_te and not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Linears and the embedding
# ---------------------------------------------------------------------------------------------


def _plain_linear_ok(m) -> bool:
    """TP=1 and none of the features that make megatron's linear more than a matmul."""
    cfg = m.config
    return (
        m.tp_group.size() == 1
        and not m.sequence_parallel
        and not m.gradient_accumulation_fusion
        and not cfg.defer_embedding_wgrad_compute
        and not getattr(m, "explicit_expert_comm", False)
    )


def _linear_out(m, input_, weight):
    bias = m.bias if not m.skip_bias_add else None
    out = F.linear(input_, weight, bias)
    return out, (m.bias if m.skip_bias_add else None)


class FastColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None:
            if self.weight is None:
                return super().forward(input_, weight, runtime_gather_output)
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            return super().forward(input_, weight, runtime_gather_output)  # megatron's error
        return _linear_out(self, input_, weight)


class FastRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        return _linear_out(self, input_, self.weight)


class FastVocabParallelEmbedding(VocabParallelEmbedding):
    def forward(self, input_):
        return F.embedding(input_, self.weight)


def _fast_linears(*linears) -> bool:
    """Each linear is still one of the fast plain ones: a linear given LoRA adapters (or any
    other subclass) has a forward of its own that the fused attention/MLP paths would skip."""
    return all(type(m) in (FastColumnParallelLinear, FastRowParallelLinear) for m in linears)


def _embedding_ok(m) -> bool:
    return (
        m.tp_group.size() == 1
        and not m.deterministic_mode
        and not m.reduce_scatter_embeddings
    )


# ---------------------------------------------------------------------------------------------
# RoPE, self-attention, MLP
# ---------------------------------------------------------------------------------------------


def rope_tables(freqs: torch.Tensor, mscale: float, dtype: torch.dtype):
    """(cos of the first half, cos of the second, sin of the first, sin of the second), each
    ``(f(freqs) * mscale).to(dtype)`` as megatron computes them, shaped to broadcast over
    [s, b, groups, heads per group, head dim]."""
    cos = (torch.cos(freqs) * mscale).to(dtype).unsqueeze(-2)
    sin = (torch.sin(freqs) * mscale).to(dtype).unsqueeze(-2)
    half = freqs.shape[-1] // 2
    return cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]


def _rope_into(out: torch.Tensor, t: torch.Tensor, tables, tmp: torch.Tensor) -> None:
    """Write megatron's ``t * cos + rotate_half(t) * sin`` (rotary part; the rest copied) to
    ``out``. ``a + (-b) * s`` is ``a - b * s`` exactly in IEEE arithmetic, and each product is
    rounded once, as in megatron's sequence of ops. ``out`` and ``tmp`` (half the rotary width)
    are laid out position-innermost, so these small-headed elementwise ops run in long rows."""
    c1, c2, s1, s2 = tables
    h = c1.shape[-1]
    x1, x2 = t[..., :h], t[..., h : 2 * h]
    o1, o2 = out[..., :h], out[..., h : 2 * h]
    torch.mul(x1, c1, out=o1)
    o1.sub_(torch.mul(x2, s1, out=tmp))
    torch.mul(x2, c2, out=o2)
    o2.add_(torch.mul(x1, s2, out=tmp))
    out[..., 2 * h :].copy_(t[..., 2 * h :])


def _rope_grad_into(out: torch.Tensor, grad: torch.Tensor, tables, tmp: torch.Tensor) -> None:
    """The gradient autograd computes through megatron's RoPE: grad * cos plus the rotated-back
    grad * sin, i.e. [g1 c1 + g2 s2, g2 c2 - g1 s1]; the rest passed through."""
    c1, c2, s1, s2 = tables
    h = c1.shape[-1]
    g1, g2 = grad[..., :h], grad[..., h : 2 * h]
    o1, o2 = out[..., :h], out[..., h : 2 * h]
    torch.mul(g1, c1, out=o1)
    o1.add_(torch.mul(g2, s2, out=tmp))
    torch.mul(g2, c2, out=o2)
    o2.sub_(torch.mul(g1, s1, out=tmp))
    out[..., 2 * h :].copy_(grad[..., 2 * h :])


def _heads_major(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """A new tensor stored [b, groups, heads, s, d], viewed as [s, b, groups, heads, d]."""
    b, ng, heads, s, d = shape
    return t.new_empty(b, ng, heads, s, d).permute(3, 0, 1, 2, 4)


class _QKVRope(torch.autograd.Function):
    """megatron's grouped qkv projection [s, b, groups, heads per group + 2, d] to SDPA's
    (query [b, heads, s, d], key [b, groups, s, d] with RoPE applied, value [b, groups, s, d])
    as one autograd node. All three are written once, straight into SDPA's layout; the
    backward writes the three gradients into one tensor instead of zero-filling and summing
    one per slice."""

    @staticmethod
    def forward(ctx, mixed, tables, per_group):
        s, b, ng, _, d = mixed.shape
        query = _heads_major(mixed, b, ng, per_group, s, d)
        key = _heads_major(mixed, b, ng, 1, s, d)
        q_in, k_in = mixed[:, :, :, :per_group], mixed[:, :, :, per_group : per_group + 1]
        if tables is None:
            query.copy_(q_in)
            key.copy_(k_in)
        else:
            tmp = _heads_major(mixed, b, ng, per_group, s, tables[0].shape[-1])
            _rope_into(query, q_in, tables, tmp)
            _rope_into(key, k_in, tables, tmp[:, :, :, :1])
        value = _heads_major(mixed, b, ng, 1, s, d)
        value.copy_(mixed[:, :, :, per_group + 1 :])
        ctx.tables, ctx.per_group, ctx.shape = tables, per_group, mixed.shape
        return tuple(t.permute(1, 2, 3, 0, 4).reshape(b, -1, s, d) for t in (query, key, value))

    @staticmethod
    def backward(ctx, grad_query, grad_key, grad_value):
        per_group, tables = ctx.per_group, ctx.tables
        s, b, ng, _, d = ctx.shape
        gq = grad_query.reshape(b, ng, per_group, s, d).permute(3, 0, 1, 2, 4)
        gk = grad_key.reshape(b, ng, 1, s, d).permute(3, 0, 1, 2, 4)
        grad = _heads_major(grad_query, b, ng, per_group + 2, s, d)
        if tables is None:
            grad[:, :, :, :per_group].copy_(gq)
            grad[:, :, :, per_group : per_group + 1].copy_(gk)
        else:
            tmp = _heads_major(grad_query, b, ng, per_group, s, tables[0].shape[-1])
            _rope_grad_into(grad[:, :, :, :per_group], gq, tables, tmp)
            _rope_grad_into(grad[:, :, :, per_group : per_group + 1], gk, tables,
                            tmp[:, :, :, :1])
        grad[:, :, :, per_group + 1].copy_(grad_value.permute(2, 0, 1, 3))
        return grad, None, None


class FastSelfAttention(SelfAttention):
    """SelfAttention for the plain causal, unpacked training/eval case."""

    def fast_forward(self, hidden_states, rotary_pos_emb):
        ng = self.num_query_groups_per_partition
        heads = self.num_attention_heads_per_partition
        per_group = heads // ng
        hn = self.hidden_size_per_attention_head
        mixed = F.linear(hidden_states, self.linear_qkv.weight, self._qkv_bias())
        s, b = mixed.shape[0], mixed.shape[1]
        # megatron's qkv layout: per query group, its query heads, then one key, one value.
        mixed = mixed.view(s, b, ng, per_group + 2, hn)
        tables = None
        if rotary_pos_emb is not None:
            tables = self._rope_tables(rotary_pos_emb, mixed.dtype)
        query, key, value = _QKVRope.apply(mixed, tables, per_group)
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=self.core_attention.softmax_scale,
            enable_gqa=ng != heads,
        )
        out = out.permute(2, 0, 1, 3).reshape(s, b, heads * hn)
        proj = self.linear_proj
        return F.linear(out, proj.weight, None if proj.skip_bias_add else proj.bias), (
            proj.bias if proj.skip_bias_add else None
        )

    def _qkv_bias(self):
        lin = self.linear_qkv
        return None if lin.skip_bias_add else lin.bias

    def _rope_tables(self, freqs, dtype):
        """cos/sin for these angles, kept while megatron passes the same (cached) angles;
        never kept from inference mode, whose tensors autograd cannot save."""
        cached = self.__dict__.get("_phi4_rope")
        if cached is not None and cached[0] is freqs and cached[1] == dtype:
            return cached[2]
        tables = rope_tables(freqs, self._phi4_mscale, dtype)
        if not torch.is_inference_mode_enabled():
            self.__dict__["_phi4_rope"] = (freqs, dtype, tables)
        return tables

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, **kwargs):
        if _attention_call_ok(self, attention_mask, key_value_states, inference_context,
                              rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                              attention_bias, packed_seq_params, kwargs):
            return self.fast_forward(hidden_states, rotary_pos_emb)
        return super().forward(
            hidden_states, attention_mask, key_value_states=key_value_states,
            inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
            **kwargs,
        )


def _attention_call_ok(attn, attention_mask, key_value_states, inference_context, rotary_pos_emb,
                       rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin, attention_bias,
                       packed_seq_params, kwargs) -> bool:
    return (
        attention_mask is None
        and key_value_states is None
        and inference_context is None
        and rotary_pos_cos is None
        and rotary_pos_sin is None
        and rotary_pos_cos_sin is None
        and attention_bias is None
        and packed_seq_params is None
        and not kwargs.get("inference_params")
        and isinstance(rotary_pos_emb, (torch.Tensor, type(None)))
        and not (attn.training and attn.core_attention.attention_dropout.p > 0.0)
        and _fast_linears(attn.linear_qkv, attn.linear_proj)
    )


def _attention_ok(m) -> bool:
    cfg = m.config
    return (
        type(m.core_attention) is SDPADotProductAttention
        and getattr(m.core_attention, "softmax_offset", None) is None
        and getattr(cfg, "window_size", None) is None
        and m.attention_type == "self"
        and m.attn_mask_type == AttnMaskType.causal  # the fast path is SDPA with is_causal
        and _fast_linears(m.linear_qkv, m.linear_proj)  # swapped already: children first
        and m.num_attention_heads_per_partition % m.num_query_groups_per_partition == 0
        and (m.q_layernorm is None or isinstance(m.q_layernorm, IdentityOp))
        and (m.k_layernorm is None or isinstance(m.k_layernorm, IdentityOp))
        and not cfg.attention_output_gate
        and not cfg.rotary_interleaved
        and not cfg.multi_latent_attention
        and not cfg.apply_rope_fusion
        and not cfg.no_rope_freq
        and not cfg.test_mode
        and not m.checkpoint_core_attention
        and not (m.offload_qkv_linear or m.offload_core_attention or m.offload_attn_proj)
    )


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b for x = [a, b] (last dim), as one node. Saves x and silu(a), as autograd
    does for ``silu(a) * b``, and computes the same products and the same silu_backward, but
    writes both halves of the gradient straight into one tensor (no split/cat copies)."""

    @staticmethod
    def forward(ctx, x):
        a, b = torch.chunk(x, 2, dim=-1)
        silu_a = F.silu(a)
        ctx.save_for_backward(x, silu_a)
        return silu_a * b

    @staticmethod
    def backward(ctx, grad):
        x, silu_a = ctx.saved_tensors
        a, b = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_a, grad_b = torch.chunk(grad_x, 2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        torch.mul(grad, silu_a, out=grad_b)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(x)


class FastMLP(MLP):
    def fast_forward(self, hidden_states):
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        h = F.linear(hidden_states, fc1.weight, None if fc1.skip_bias_add else fc1.bias)
        if fc1.skip_bias_add and fc1.bias is not None:
            h = h + fc1.bias
        out = F.linear(swiglu(h), fc2.weight, None if fc2.skip_bias_add else fc2.bias)
        return out, (fc2.bias if fc2.skip_bias_add else None)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is None and _fast_linears(self.linear_fc1, self.linear_fc2):
            return self.fast_forward(hidden_states)
        return super().forward(hidden_states, per_token_scale, **kwargs)


def _mlp_ok(m) -> bool:
    cfg = m.config
    return (
        type(m) is MLP
        and cfg.gated_linear_unit
        and cfg.activation_func is F.silu
        and not cfg.use_te_activation_func
        and not cfg.bias_activation_fusion
        and getattr(cfg, "activation_func_clamp_value", None) is None
        and getattr(cfg, "glu_linear_offset", 0.0) == 0.0
        and _fast_linears(m.linear_fc1, m.linear_fc2)  # swapped already: children first
    )


# ---------------------------------------------------------------------------------------------
# The transformer layer
# ---------------------------------------------------------------------------------------------


class FastTransformerLayer(TransformerLayer):
    """norm -> self-attention -> + residual -> norm -> MLP -> + residual, without megatron's
    recompute/offload/inference/cross-attention branches (none of which is configured)."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
        attn = self.self_attention
        kwargs.pop("dynamic_inference_decode_only", None)
        if not (
            context is None
            and context_mask is None
            and (not self.training or self.hidden_dropout == 0.0)
            and _attention_call_ok(attn, attention_mask, None, inference_context,
                                   rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                                   rotary_pos_cos_sin, attention_bias, packed_seq_params, kwargs)
            and _fast_linears(self.mlp.linear_fc1, self.mlp.linear_fc2)
        ):
            return super().forward(
                hidden_states, attention_mask=attention_mask, context=context,
                context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                inference_context=inference_context, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs,
            )
        # megatron's bias-dropout-add without bias and with p = 0 is ``residual + out``.
        out, bias = attn.fast_forward(self.input_layernorm(hidden_states), rotary_pos_emb)
        hidden_states = hidden_states + (out if bias is None else out + bias)
        out, bias = self.mlp.fast_forward(self.pre_mlp_layernorm(hidden_states))
        hidden_states = hidden_states + (out if bias is None else out + bias)
        return hidden_states, context


def _layer_ok(m) -> bool:
    cfg = m.config
    return (
        type(m) is TransformerLayer
        and isinstance(m.self_attention, FastSelfAttention)
        and isinstance(m.mlp, FastMLP)
        and not m.is_moe_layer
        and isinstance(m.pre_cross_attn_layernorm, IdentityOp)
        and isinstance(m.cross_attention, IdentityOp)
        and not (m.recompute_input_layernorm or m.recompute_pre_mlp_layernorm or m.recompute_mlp)
        and not (m.offload_attn_norm or m.offload_mlp_norm)
        and not cfg.inference_fuse_tp_communication
        and cfg.recompute_granularity is None
        and not cfg.fp32_residual_connection
    )


# ---------------------------------------------------------------------------------------------
# Swapping
# ---------------------------------------------------------------------------------------------

# (megatron class, fast class, check); children before parents, so a layer sees its parts.
_SWAPS = (
    (ColumnParallelLinear, FastColumnParallelLinear, _plain_linear_ok),
    (RowParallelLinear, FastRowParallelLinear, _plain_linear_ok),
    (VocabParallelEmbedding, FastVocabParallelEmbedding, _embedding_ok),
    (SelfAttention, FastSelfAttention, _attention_ok),
    (MLP, FastMLP, _mlp_ok),
    (TransformerLayer, FastTransformerLayer, _layer_ok),
)
_FAST = {fast: base for base, fast, _ in _SWAPS}


def apply(model: torch.nn.Module) -> int:
    """Swap every module that qualifies for its fast class; returns how many were swapped."""
    swapped = 0
    for base, fast, ok in _SWAPS:
        for m in model.modules():
            if type(m) is base and ok(m):
                m.__class__ = fast
                if fast is FastSelfAttention:
                    m._phi4_mscale = float(_yarn_get_concentration_factor_from_config(m.config))
                swapped += 1
    return swapped


def remove(model: torch.nn.Module) -> int:
    """Put megatron's classes back (tests compare the two paths on the same weights)."""
    restored = 0
    for m in model.modules():
        base = _FAST.get(type(m))
        if base is not None:
            m.__class__ = base
            m.__dict__.pop("_phi4_rope", None)
            restored += 1
    return restored


def is_applied(model: torch.nn.Module) -> bool:
    return any(type(m) in _FAST for m in model.modules())
