"""Tiled and sliced decoding: decode large latents piece by piece to bound peak memory.

Tiled decode splits the latent into overlapping tiles, decodes each one, and blends the decoded tiles with linear
ramps across each overlap (a weighted average whose weights are normalised per pixel, so the blend is a convex
combination everywhere). The result is *not* identical to a full decode: the decoder's GroupNorm statistics and the
mid-block attention are computed per tile instead of over the whole image, and tile borders see zero padding
instead of their neighbours. diffusers' ``tiled_decode`` has the same limitation. If the whole latent fits in one
tile, tiled decode is a plain decode.

Sliced decode runs the batch one sample at a time; every operation in the decoder is per-sample, so the result is
the same as a batched decode.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["tile_spans", "overlap_ramp", "tiled_decode", "sliced_apply"]


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open ``[start, stop)`` spans of at most ``tile`` covering ``[0, length)``; neighbours share at least
    ``overlap`` entries. The last span is aligned to the end, so every span has full size when ``length >= tile``.
    """
    if tile < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile_size), got overlap={overlap}, tile_size={tile}")
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return [(s, s + tile) for s in starts]


def overlap_ramp(n: int, ramp_in: int, ramp_out: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D blend weight of length ``n``: rises linearly over the first ``ramp_in`` entries, falls over the last
    ``ramp_out``, 1 in between. Ramp values are ``(k + 0.5) / L``, so a falling and a rising ramp over the same
    ``L`` entries sum to 1 and no weight is 0.
    """
    w = torch.ones(n, dtype=dtype, device=device)
    if ramp_in > 0:
        w[:ramp_in] *= (torch.arange(ramp_in, dtype=dtype, device=device) + 0.5) / ramp_in
    if ramp_out > 0:
        w[n - ramp_out:] *= (torch.arange(ramp_out, 0, -1, dtype=dtype, device=device) - 0.5) / ramp_out
    return w


def _axis_weights(spans: list[tuple[int, int]], scale: int, dtype: torch.dtype, device: torch.device
                  ) -> list[torch.Tensor]:
    """Per-span output-space weights along one axis; ramps cover exactly the overlap with each neighbour."""
    out = []
    for i, (a, b) in enumerate(spans):
        ramp_in = (spans[i - 1][1] - a) * scale if i > 0 else 0
        ramp_out = (b - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        out.append(overlap_ramp((b - a) * scale, ramp_in, ramp_out, dtype=dtype, device=device))
    return out


def tiled_decode(decode_tile: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *, tile_size: int,
                 overlap: int, scale_factor: int) -> torch.Tensor:
    """Decode ``latents`` (B, C, h, w) tile by tile and blend the tiles linearly across their overlaps.

    Args:
        decode_tile: maps a latent tile (B, C, th, tw) to an image tile (B, 3, th * scale_factor, tw * scale_factor).
        latents: the full latent (B, C, h, w).
        tile_size: tile edge in latent pixels.
        overlap: minimum overlap of neighbouring tiles in latent pixels (``0 <= overlap < tile_size``).
        scale_factor: image pixels per latent pixel.

    Returns:
        The image (B, 3, h * scale_factor, w * scale_factor) in the dtype ``decode_tile`` returns.
    """
    b, _, h, w = latents.shape
    rows, cols = tile_spans(h, tile_size, overlap), tile_spans(w, tile_size, overlap)
    out: torch.Tensor | None = None
    wsum = None
    wr = wc = None
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            img = decode_tile(latents[:, :, r0:r1, c0:c1])  # (B, 3, th*s, tw*s)
            if out is None:
                out = img.new_zeros(b, img.shape[1], h * scale_factor, w * scale_factor)
                wsum = img.new_zeros(h * scale_factor, w * scale_factor)
                wr = _axis_weights(rows, scale_factor, img.dtype, img.device)
                wc = _axis_weights(cols, scale_factor, img.dtype, img.device)
            weight = wr[i][:, None] * wc[j][None, :]  # (th*s, tw*s)
            ys, xs = slice(r0 * scale_factor, r1 * scale_factor), slice(c0 * scale_factor, c1 * scale_factor)
            out[:, :, ys, xs] += img * weight
            wsum[ys, xs] += weight
    return out / wsum


def sliced_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to each sample of the batch separately and concatenate (bounds activation memory)."""
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])], dim=0)
