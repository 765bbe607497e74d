"""Sinusoidal timestep embedding and the small MLP that follows it (sdxl.md §2.3, §7 first bullet)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["timestep_embedding", "TimestepEmbedding", "activation", "activation_inplace"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _mish_(x: torch.Tensor) -> torch.Tensor:
    return F.mish(x, inplace=True)


def _relu_(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)


# module-level functions (not lambdas) so modules holding them stay picklable
_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": _silu_, "swish": _silu_, "mish": _mish_, "gelu": F.gelu, "relu": _relu_,  # gelu has no in-place form
}


def activation_inplace(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Like :func:`activation` but overwriting its input where torch allows it (use only without autograd)."""
    activation(name)  # validate the name
    return _INPLACE[name]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The functional activation diffusers' ``get_activation(name)`` builds (silu/swish, mish, gelu, relu)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})") from None


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) timesteps, always in float32.

    ``freqs_i = exp(-ln(max_period) * i / (half - freq_shift))`` for ``i < half = dim // 2``;
    the result is ``[sin(t f), cos(t f)]``, or ``[cos, sin]`` with ``flip_sin_to_cos`` (SDXL and SD use True and
    ``freq_shift=0``). An odd ``dim`` gets one zero column at the end.

    Args:
        timesteps: ``(N,)`` tensor, any numeric dtype.
        dim: embedding width.
    Returns:
        ``(N, dim)`` float32 tensor on ``timesteps.device``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = timesteps[:, None].float() * freqs[None, :]  # (N, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> act -> linear_2`` (diffusers ``TimestepEmbedding`` without cond_proj / post_act).

    Used for ``time_embedding`` (in = block_out_channels[0]) and, in SDXL, ``add_embedding``
    (in = projection_class_embeddings_input_dim).
    """

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels) -> (B, time_embed_dim)``."""
        return self.linear_2(self.act(self.linear_1(sample)))
