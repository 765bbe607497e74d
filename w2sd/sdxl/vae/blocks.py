"""Building blocks of the KL autoencoder (diffusers ``ResnetBlock2D`` with ``temb=None``, ``Downsample2D``,
``Upsample2D``, the single-head mid-block ``Attention``, ``DownEncoderBlock2D``, ``UpDecoderBlock2D``,
``UNetMidBlock2D``), with diffusers' parameter names so a diffusers state dict loads strictly.

Every GroupNorm uses eps 1e-6 (sdxl.md §5.2, §7). The layers are thin subclasses of ``nn.Conv2d`` / ``nn.Linear``
/ ``nn.GroupNorm`` that cast their weights to the dtype of the input when the two differ. This is how the model
runs an fp16 checkpoint in fp32 (``force_upcast``, sdxl.md §5.4) without an fp32 copy of the whole network: only
one layer's weights exist in fp32 at a time, transiently. When the dtypes agree the cast is a no-op, so fp32 parity
is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "VAE_NORM_EPS", "CastConv2d", "CastLinear", "CastGroupNorm", "ResnetBlock2D", "Downsample2D", "Upsample2D",
    "VAEAttention", "DownEncoderBlock2D", "UpDecoderBlock2D", "MidBlock2D",
]

VAE_NORM_EPS = 1e-6  # every VAE GroupNorm (diffusers vae.py passes resnet_eps=1e-6 everywhere)


def _cast(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if p is None else p.to(dtype)


class CastConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes in the input's dtype (weights cast on the fly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype))


class CastLinear(nn.Linear):
    """``nn.Linear`` that computes in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype))


class CastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that computes in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


def group_norm(channels: int, groups: int) -> CastGroupNorm:
    """The VAE's GroupNorm (affine, eps 1e-6)."""
    return CastGroupNorm(num_groups=groups, num_channels=channels, eps=VAE_NORM_EPS)


class ResnetBlock2D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1-projected if widths differ) input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = CastConv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = CastConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = CastConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h  # output_scale_factor is 1 in the VAE


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv with padding 0 after an explicit right/bottom zero pad (diffusers ``padding=0`` path)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CastConv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CastConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        if x.shape[0] >= 64:  # upsample_nearest on channels-last inputs fails for large batches (diffusers #984)
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual connection.

    diffusers ``Attention(C, heads=1, dim_head=C, residual_connection=True, bias=True, norm_num_groups=groups,
    eps=1e-6)``; q/k/v/out are ``Linear(C, C)`` with bias; softmax scale ``C ** -0.5`` (SDPA's default).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = CastLinear(channels, channels)
        self.to_k = CastLinear(channels, channels)
        self.to_v = CastLinear(channels, channels)
        self.to_out = nn.ModuleList([CastLinear(channels, channels)])  # to_out.1 in diffusers is a Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, hgt, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(h).unsqueeze(1)  # (B, 1, HW, C)
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        o = self.to_out[0](o)
        return o.transpose(1, 2).reshape(b, c, hgt, wid) + x


class DownEncoderBlock2D(nn.Module):
    """``layers`` resnets, then (except in the last block) a stride-2 downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers`` resnets (the decoder uses layers_per_block + 1), then (except in the last block) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 (diffusers ``UNetMidBlock2D`` with one layer and temb=None)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)
