"""The speech encoder's parts: x8 conv subsampling, T5-style relative bias, conformer block.

Shapes are [batch, time, channels] throughout. Parameter names follow the released checkpoint
(``feed_forward_in.gate_up_proj``, ``self_attn.q_proj``, ``conv.glu.b1``, ...) so weights map
one to one. These are plain torch modules, replicated on every tensor-parallel rank: the
block's macaron FFNs, relative bias and convolution module have no megatron counterpart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phi4core.config import AudioConfig


def subsampled_length(frames: int | torch.Tensor, time_reduction: int):
    """Frames after the stride-2 convolutions: ceil(frames / time_reduction)."""
    if isinstance(frames, torch.Tensor):
        return torch.div(frames + time_reduction - 1, time_reduction, rounding_mode="floor")
    return math.ceil(frames / time_reduction)


class ConvSubsampling(nn.Module):
    """dw_striding ("nemo_conv"): Conv2d(1 -> C, 3, s2, p1), ReLU, then per further factor 2 a
    depthwise Conv2d(C, 3, s2, p1) + pointwise 1x1 + ReLU; channels x frequency flattened into
    Linear(C * F' -> attention_dim). x8 in time and frequency (80 -> 10)."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        c = ac.conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, 2, 1), nn.ReLU()]
        for _ in range(int(math.log2(ac.time_reduction)) - 1):
            layers += [nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        freq = ac.num_mel_bins
        for _ in range(int(math.log2(ac.time_reduction))):
            freq = math.ceil(freq / 2)
        self.out = nn.Linear(c * freq, ac.attention_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # [b, c, t', f']
        b, _, t, _ = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, -1))


class RelativeAttentionBias(nn.Module):
    """T5-style bias without buckets, asymmetric: Embedding(2 * max_distance, heads) indexed by
    the offset key - query clipped to [-max_distance, max_distance - 1] plus max_distance."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        self.max_distance = ac.relative_attention_max_distance
        self.bias_values = nn.Embedding(2 * self.max_distance, ac.num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """[1, heads, length, length]."""
        pos = torch.arange(length, device=self.bias_values.weight.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)
        return self.bias_values(rel + self.max_distance).permute(2, 0, 1).unsqueeze(0)


class FeedForward(nn.Module):
    """LayerNorm, Linear(d -> 2f) split into up and gate, up * swish(gate), Linear(f -> d)."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(ac.attention_dim)
        self.gate_up_proj = nn.Linear(ac.attention_dim, 2 * ac.ffn_dim)
        self.down_proj = nn.Linear(ac.ffn_dim, ac.attention_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class SelfAttention(nn.Module):
    """Multi-head attention with biases; the additive bias carries the relative positions and
    -inf on padded keys."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        d = ac.attention_dim
        self.heads = ac.num_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)), attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class GLUPointwiseConv(nn.Module):
    """1x1 Conv1d(d -> 2d) and a GLU with its own biases: (a + b1) * swish(b + b2)."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        d = ac.attention_dim
        self.ext_pw_conv_1d = nn.Conv1d(d, 2 * d, 1)
        self.b1 = nn.Parameter(torch.zeros(1, d, 1))
        self.b2 = nn.Parameter(torch.zeros(1, d, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, d, t] -> [b, d, t]
        a, g = self.ext_pw_conv_1d(x).chunk(2, dim=1)
        return (a + self.b1) * F.silu(g + self.b2)


class DepthwiseSeparableConv(nn.Module):
    """Causal depthwise Conv1d (kernel k, padded k-1 both sides, the last k-1 outputs dropped
    by the caller) followed by a pointwise 1x1."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        d, k = ac.attention_dim, ac.conv_kernel
        self.dw_conv = nn.Conv1d(d, d, k, 1, padding=k - 1, groups=d)
        self.pw_conv = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))


class ConvModule(nn.Module):
    """LayerNorm, GLU pointwise conv, causal depthwise-separable conv, swish, 1x1 conv."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        self.kernel = ac.conv_kernel
        self.layer_norm = nn.LayerNorm(ac.attention_dim)
        self.glu = GLUPointwiseConv(ac)
        self.dw_sep_conv_1d = DepthwiseSeparableConv(ac)
        self.ext_pw_conv_1d = nn.Conv1d(ac.attention_dim, ac.attention_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw_sep_conv_1d(self.glu(self.layer_norm(x).transpose(1, 2)))
        if self.kernel > 1:
            y = y[:, :, : -(self.kernel - 1)]  # causal: output t sees inputs t-k+1 .. t
        return self.ext_pw_conv_1d(F.silu(y)).transpose(1, 2)


class ConformerBlock(nn.Module):
    """x + FFN/2; x + MHSA(LN x); x + Conv(x); x + FFN/2; LayerNorm."""

    def __init__(self, ac: AudioConfig) -> None:
        super().__init__()
        self.feed_forward_in = FeedForward(ac)
        self.self_attn = SelfAttention(ac)
        self.conv = ConvModule(ac)
        self.feed_forward_out = FeedForward(ac)
        self.layer_norm_att = nn.LayerNorm(ac.attention_dim)
        self.layer_norm = nn.LayerNorm(ac.attention_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)
