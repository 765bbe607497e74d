"""Spatial transformer of the SD/SDXL UNet: Attention, GEGLU, FeedForward, BasicTransformerBlock, Transformer2DModel.

Follows diffusers' ``Transformer2DModel`` (continuous input, ``norm_type="layer_norm"``, ``activation_fn="geglu"``)
with ``AttnProcessor2_0`` semantics (sdxl.md §2.3, §7). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with the default scale ``head_dim ** -0.5``.

Every Linear/Conv2d is a plain ``nn`` module called through its ``forward`` (LoRA hooks/wrappers can replace it);
residual adds write into the fresh output of the branch's last Linear, so a wrapper must return a new tensor.

``upcast_attention`` is accepted for config compatibility and, exactly like diffusers' default SDPA processor,
has no effect on the computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "GEGLU", "FeedForward", "BasicTransformerBlock", "Transformer2DModel"]

TRANSFORMER_GROUPNORM_EPS = 1e-6  # diffusers Transformer2DModel: GroupNorm eps is hard-coded (sdxl.md §7)


class Attention(nn.Module):
    """Multi-head attention with bias-free ``to_q/to_k/to_v`` and ``to_out = [Linear, Dropout]``.

    Self-attention when ``context`` is None, cross-attention otherwise (keys/values from ``context``).
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, query_dim)``, ``context (B, S, kv_dim)`` or None -> ``(B, L, query_dim)``."""
        b, n, _ = x.shape
        ctx = x if context is None else context
        h, d = self.heads, self.dim_head
        # (B, L, h*d) -> (B, h, L, d): a strided view, the layout SDPA kernels take without a copy.
        q = self.to_q(x).view(b, -1, h, d).transpose(1, 2)
        k = self.to_k(ctx).view(b, -1, h, d).transpose(1, 2)
        v = self.to_v(ctx).view(b, -1, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        o = o.transpose(1, 2).reshape(b, n, h * d)  # (B, L, h*d)
        return self.to_out[1](self.to_out[0](o))


class GEGLU(nn.Module):
    """``proj`` to 2*dim_out, split into (value, gate), return ``value * gelu(gate)`` (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim_in) -> (..., dim_out)``."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return value * F.gelu(gate)
        return F.gelu(gate).mul_(value)  # without autograd: multiply into the fresh gelu buffer


class FeedForward(nn.Module):
    """``net = [GEGLU(dim, 4*dim), Dropout, Linear(4*dim, dim)]`` (state-dict names ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim) -> (B, L, dim)``."""
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))`` (LayerNorm eps 1e-5)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.attn1 = Attention(dim, heads, dim_head, None, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (B, L, dim)``, ``context (B, S, cross_attention_dim)`` -> ``(B, L, dim)``."""
        # Each branch ends in a Linear whose fresh output autograd does not need, so the residual is added in
        # place into that output (no extra buffer; same values as ``branch + x``).
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        x = self.ff(self.norm3(x)).add_(x)
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input (residual).

    ``use_linear_projection=True`` (SDXL, SD2): ``proj_in/proj_out`` are Linear layers applied to tokens.
    ``False`` (SD1.x): they are 1x1 convs applied in NCHW. ``norm`` has eps 1e-6 regardless of the UNet's
    ``norm_eps``.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int = 1280,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.inner_dim = inner
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=TRANSFORMER_GROUPNORM_EPS, affine=True)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim, dropout)
            for _ in range(num_layers)])
        if use_linear_projection:
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)``, ``context (B, S, cross_attention_dim)`` -> ``(B, C, H, W)``."""
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c))  # (B, HW, inner)
        else:
            h = self.proj_in(h)  # (B, inner, H, W)
            h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, self.inner_dim)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).view(b, hgt, wid, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        else:
            h = self.proj_out(h.view(b, hgt, wid, self.inner_dim).permute(0, 3, 1, 2).contiguous())
            return h.add_(x)  # fresh conv output: add the residual in place
        # Residual first: the sum takes the NCHW-contiguous layout of x (one pass instead of copy + add).
        return x + h
