"""ResnetBlock2D, Downsample2D and Upsample2D as used by the SD/SDXL UNet (sdxl.md §2.2, §2.3).

Module names (``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``; ``conv``) mirror diffusers so its
state dict loads strictly. Every Linear/Conv2d is a plain ``nn`` module called through its ``forward`` so LoRA
side-branch wrappers can replace it. Residual adds write into the fresh output of the preceding conv (a wrapper or
forward hook must return a new tensor, not a view of its input, as ``output + delta`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from w2sd.sdxl.unet.embeddings import activation, activation_inplace

__all__ = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a time-embedding injection.

    ``h = conv1(act(norm1(x)))``; ``h = h + time_emb_proj(act(temb))[:, :, None, None]`` ("default"), or
    ``norm2(h) * (1 + scale) + shift`` ("scale_shift"); ``h = conv2(dropout(act(norm2(h))))``;
    ``out = (shortcut(x) + h) / output_scale_factor``; ``shortcut`` is a 1x1 conv when channels change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-5,
        act_fn: str = "silu",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        time_embedding_norm: str = "default",
    ) -> None:
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm={time_embedding_norm!r} is not supported")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.output_scale_factor = float(output_scale_factor)
        self.time_embedding_norm = time_embedding_norm
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is not None:
            proj_out = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj: nn.Linear | None = nn.Linear(temb_channels, proj_out)
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.act = activation(act_fn)
        self.act_ = activation_inplace(act_fn)  # used when autograd is off: activations overwrite the norm output
        self.conv_shortcut: nn.Conv2d | None = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """``x (B, Cin, H, W)``, ``temb (B, temb_channels)`` -> ``(B, Cout, H, W)``."""
        act = self.act if torch.is_grad_enabled() else self.act_
        h = self.conv1(act(self.norm1(x)))  # (B, Cout, H, W)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, Cout or 2*Cout, 1, 1)
            if self.time_embedding_norm == "default":
                h = self.norm2(h.add_(t))  # in place into the fresh conv1 output (conv backward needs no output)
            else:
                scale, shift = t.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(act(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = h.add_(skip)  # in place into the fresh conv2 output; equals skip + h
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor)
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (``conv``). With ``padding=0`` the input is first padded on the right/bottom by one."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))``."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``) followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, 2H, 2W)`` or ``(B, C, *output_size)``."""
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)
