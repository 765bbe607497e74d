"""Down, mid and up blocks of the SD/SDXL UNet (diffusers ``unet_2d_blocks.py`` names; sdxl.md §2.2).

Down blocks append every resnet/attention output and the downsample output to the shared skip list; up blocks
take their skips (last first) and concatenate ``cat([h, skip], dim=1)`` -- current features first.
All blocks share the call signature used by :class:`w2sd.sdxl.unet.model.UNet2DConditionModel`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from w2sd.sdxl.unet.attention import Transformer2DModel
from w2sd.sdxl.unet.resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D"]


def _depths(transformer_layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Transformer depth per resnet of a block: an int is repeated, a sequence is used as is."""
    if isinstance(transformer_layers, int):
        return [transformer_layers] * num_layers
    depths = list(transformer_layers)
    if len(depths) < num_layers:
        raise ValueError(f"transformer_layers_per_block {depths} has fewer entries than the block's "
                         f"{num_layers} resnets")
    return depths


def resnet_kwargs(
    temb_channels: int, groups: int, eps: float, act_fn: str, dropout: float = 0.0,
    output_scale_factor: float = 1.0, time_embedding_norm: str = "default",
) -> dict:
    """Bundle the resnet options that are the same for every block of a UNet."""
    return dict(temb_channels=temb_channels, groups=groups, eps=eps, act_fn=act_fn, dropout=dropout,
                output_scale_factor=output_scale_factor, time_embedding_norm=time_embedding_norm)



def _downsample(h: torch.Tensor, downsamplers: nn.ModuleList | None, skips: list[torch.Tensor]) -> torch.Tensor:
    """The optional downsampler that ends a down block; its output is a skip connection too."""
    if downsamplers is not None:
        for down in downsamplers:
            h = down(h)
        skips.append(h)
    return h

class DownBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional stride-2 downsampler. No attention."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 downsample_padding: int, resnet: dict) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **resnet)
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, downsample_padding)])
                             if add_downsample else None)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        """Run the block on ``h (B, Cin, H, W)``, appending each output to ``skips``; returns the last output."""
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        return _downsample(h, self.downsamplers, skips)


class CrossAttnDownBlock2D(nn.Module):
    """Pairs (resnet, Transformer2DModel), then an optional downsampler."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 downsample_padding: int, resnet: dict, heads: int, cross_attention_dim: int,
                 transformer_layers: int | Sequence[int], use_linear_projection: bool) -> None:
        super().__init__()
        depths = _depths(transformer_layers, num_layers)
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **resnet)
            for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, out_channels // heads, out_channels, depths[i], cross_attention_dim,
                               resnet["groups"], use_linear_projection, resnet["dropout"])
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, downsample_padding)])
                             if add_downsample else None)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        """Run the block on ``h (B, Cin, H, W)``, appending each output to ``skips``; returns the last output."""
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(h, temb), context)
            skips.append(h)
        return _downsample(h, self.downsamplers, skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnets.0``, then ``num_layers`` pairs (attentions.i, resnets.i+1)."""

    has_cross_attention = True

    def __init__(self, channels: int, resnet: dict, heads: int, cross_attention_dim: int,
                 transformer_layers: int | Sequence[int], use_linear_projection: bool, num_layers: int = 1) -> None:
        super().__init__()
        depths = _depths(transformer_layers, num_layers)
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, **resnet) for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, channels // heads, channels, depths[i], cross_attention_dim,
                               resnet["groups"], use_linear_projection, resnet["dropout"])
            for i in range(num_layers)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context), temb)
        return h


def _up_resnets(in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int,
                resnet: dict) -> nn.ModuleList:
    # Resnet i sees cat([h, skip]): h has prev_output_channel (i == 0) or out_channels; the last skip comes from
    # the previous resolution level and has in_channels.
    return nn.ModuleList([
        ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                      + (in_channels if i == num_layers - 1 else out_channels), out_channels, **resnet)
        for i in range(num_layers)])


class UpBlock2D(nn.Module):
    """``num_layers`` resnets on ``cat([h, skip])``, then an optional nearest-x2 upsampler."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int,
                 add_upsample: bool, resnet: dict) -> None:
        super().__init__()
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, resnet)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor | None, upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Consume ``len(self.resnets)`` skips from the end of ``skips`` (popped); return the upsampled output."""
        for resnet in self.resnets:
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                h = up(h, upsample_size)
        return h


class CrossAttnUpBlock2D(nn.Module):
    """Pairs (resnet on ``cat([h, skip])``, Transformer2DModel), then an optional upsampler."""

    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int,
                 add_upsample: bool, resnet: dict, heads: int, cross_attention_dim: int,
                 transformer_layers: int | Sequence[int], use_linear_projection: bool) -> None:
        super().__init__()
        depths = _depths(transformer_layers, num_layers)
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, resnet)
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, out_channels // heads, out_channels, depths[i], cross_attention_dim,
                               resnet["groups"], use_linear_projection, resnet["dropout"])
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor | None, upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Consume ``len(self.resnets)`` skips from the end of ``skips`` (popped); return the upsampled output."""
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(torch.cat([h, skips.pop()], dim=1), temb), context)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                h = up(h, upsample_size)
        return h
