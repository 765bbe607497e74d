"""The KL autoencoder of SD / SDXL (diffusers ``AutoencoderKL``): encoder, decoder, latent scaling, fp16 upcast.

Parameter names mirror diffusers exactly (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``, ...), so a diffusers
``vae/diffusion_pytorch_model.safetensors`` loads with a strict ``load_state_dict``. Decode path: sdxl.md §5.2.

Value ranges: ``encode``/``decode`` work on images in [-1, 1] and raw (unscaled) latents, exactly like diffusers'
``vae.encode(x).latent_dist`` and ``vae.decode(z).sample`` (no clamp). ``image_to_latents``/``latents_to_image``
are the pipeline-facing helpers: images in [0, 1], latents scaled for the diffusion model,
``z_model = (z - shift_factor) * scaling_factor``.

fp16 (sdxl.md §5.4): the original SDXL VAE overflows in fp16. When the weights are fp16 and
``config.force_upcast`` is true, ``encode``/``decode`` compute in fp32 and return the caller's dtype. The weights
stay fp16: every conv/linear/norm casts its own weight to the activation dtype when it runs (``blocks.Cast*``), so
the extra memory is one layer's fp32 weights at a time plus fp32 activations. diffusers instead converts the whole
VAE to fp32 (an fp32 copy of all ~84M parameters); both compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from w2sd.errors import CheckpointError

from .blocks import CastConv2d, DownEncoderBlock2D, MidBlock2D, UpDecoderBlock2D, group_norm
from .config import VAEConfig
from .tiling import sliced_apply, tiled_decode

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "LatentDistribution", "LOGVAR_MIN", "LOGVAR_MAX"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution clamps log-variance to this range
DEFAULT_TILE_SIZE = 64  # latent pixels (512 image pixels for SDXL)
DEFAULT_TILE_OVERLAP = 16  # latent pixels


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), f = 2 ** (blocks - 1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CastConv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = CastConv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out, h * f, w * f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = tuple(reversed(ch))
        self.conv_in = CastConv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = group_norm(ch[0], g)
        self.conv_out = CastConv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


@dataclass
class LatentDistribution:
    """Diagonal Gaussian posterior q(z | x) of the encoder; ``mean``/``logvar`` are (B, latent_channels, h, w)."""

    mean: torch.Tensor
    logvar: torch.Tensor  # already clamped to [LOGVAR_MIN, LOGVAR_MAX]

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        """The posterior mode (= mean)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` on the generator's device (as
        diffusers' ``randn_tensor`` does for a single generator), then moved to the mean's device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class AutoencoderKL(nn.Module):
    """diffusers-compatible KL autoencoder. Build with a :class:`VAEConfig`, load a diffusers state dict strictly
    (``load_state_dict`` or :meth:`from_state_dict`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        n = config.latent_channels
        self.quant_conv = CastConv2d(2 * n, 2 * n, 1) if config.use_quant_conv else None
        self.post_quant_conv = CastConv2d(n, n, 1) if config.use_post_quant_conv else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(cls, config: VAEConfig, state_dict: Mapping[str, torch.Tensor], *,
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None
                        ) -> "AutoencoderKL":
        """Build the model and load a diffusers-named state dict strictly, without a random initialisation.

        The tensors keep their dtype (an fp16 file gives an fp16 model) unless ``dtype`` is given. Raises
        ``CheckpointError`` listing every missing, unexpected and mis-shaped key.
        """
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state_dict)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    # ------------------------------------------------------------------ properties
    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel, ``2 ** (len(block_out_channels) - 1)`` (SDXL 8, the tiny test VAE 2)."""
        return self.config.scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations use: fp32 for an fp16 model with ``force_upcast``, else the weights' dtype."""
        if self.dtype == torch.float16 and self.config.force_upcast:
            return torch.float32
        return self.dtype

    # ------------------------------------------------------------------ encoder
    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder(images)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode(self, images: torch.Tensor, *, sliced: bool = False) -> LatentDistribution:
        """Posterior parameters of ``images`` (B, in_channels, H, W) in [-1, 1].

        Returns mean and clamped log-variance (B, latent_channels, ceil(H / f), ceil(W / f)), unscaled, in the
        images' dtype. ``sliced`` encodes one sample at a time (same result, less memory).
        """
        _check_images(images, self.config.in_channels, "images")
        x = images.to(device=self.device, dtype=self.compute_dtype)
        moments = sliced_apply(self._moments, x) if sliced else self._moments(x)
        mean, logvar = moments.to(images.dtype).chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def encode_mean(self, images: torch.Tensor, *, sliced: bool = False) -> torch.Tensor:
        """Posterior mean (mode) of ``images`` in [-1, 1]; unscaled latents."""
        return self.encode(images, sliced=sliced).mean

    def encode_sample(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                      sliced: bool = False) -> torch.Tensor:
        """A posterior sample of ``images`` in [-1, 1]; unscaled latents."""
        return self.encode(images, sliced=sliced).sample(generator)

    # ------------------------------------------------------------------ decoder
    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: torch.Tensor, *, tile: bool = False, tile_size: int = DEFAULT_TILE_SIZE,
               overlap: int = DEFAULT_TILE_OVERLAP, sliced: bool = False) -> torch.Tensor:
        """Raw decoder output (B, out_channels, h * f, w * f), nominally in [-1, 1], not clamped.

        Args:
            latents: unscaled latents (B, latent_channels, h, w) (divide model latents by ``scaling_factor``
                first, or use :meth:`latents_to_image`).
            tile: decode overlapping ``tile_size`` x ``tile_size`` latent tiles and blend them linearly across
                ``overlap`` latent pixels (approximate, see ``tiling.py``; bounded memory for large images).
            sliced: decode one sample at a time (identical result, less memory). Combines with ``tile``.

        Returns the image in the latents' dtype; the computation runs in :attr:`compute_dtype`.
        """
        _check_images(latents, self.config.latent_channels, "latents")
        z = latents.to(device=self.device, dtype=self.compute_dtype)
        if tile:
            def one(x: torch.Tensor) -> torch.Tensor:
                return tiled_decode(self._decode_raw, x, tile_size=tile_size, overlap=overlap,
                                    scale_factor=self.scale_factor)
        else:
            one = self._decode_raw
        out = sliced_apply(one, z) if sliced else one(z)
        return out.to(latents.dtype)

    # ------------------------------------------------------------------ pipeline helpers
    def latents_to_image(self, latents_scaled: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        """Diffusion-model latents -> image in [0, 1]: ``decode(z / scaling_factor + shift_factor)``, then
        ``(x / 2 + 0.5).clamp(0, 1)`` (diffusers ``VaeImageProcessor.postprocess`` with ``do_normalize``).
        ``decode_kwargs`` go to :meth:`decode` (``tile``, ``tile_size``, ``overlap``, ``sliced``)."""
        z = latents_scaled / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        return (self.decode(z, **decode_kwargs) / 2 + 0.5).clamp(0, 1)

    def image_to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None, *,
                         sample: bool = False, sliced: bool = False) -> torch.Tensor:
        """Image in [0, 1] (B, in_channels, H, W) -> diffusion-model latents
        ``(z - shift_factor) * scaling_factor`` with ``z`` the posterior mean, or a posterior sample drawn from
        ``generator`` when ``sample`` is true (diffusers img2img uses a sample; inversion usually the mean)."""
        dist = self.encode(images * 2 - 1, sliced=sliced)
        z = dist.sample(generator) if sample else dist.mode()
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: decode(encode(images)); the posterior mean, or a sample when ``generator`` is given."""
        dist = self.encode(images)
        return self.decode(dist.sample(generator) if generator is not None else dist.mode())


def _check_images(x: torch.Tensor, channels: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor (B, {channels}, H, W), got {shape}")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected and mis-shaped key of ``state_dict``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                       for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape)
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys {misshaped}")
    if problems:
        raise CheckpointError("VAE state dict does not match the config: " + "; ".join(problems))
