"""``UNet2DConditionModel``: the SD 1.x/2.x and SDXL denoising UNet (sdxl.md §2).

Attribute names mirror diffusers' state-dict keys, so a diffusers ``unet/diffusion_pytorch_model.safetensors``
loads with ``load_state_dict(strict=True)``. Building under ``torch.device("meta")`` allocates nothing; a loader
can then call ``load_state_dict(sd, strict=True, assign=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from w2sd.sdxl.unet.blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    resnet_kwargs,
)
from w2sd.sdxl.unet.config import UNetConfig
from w2sd.sdxl.unet.embeddings import TimestepEmbedding, activation, activation_inplace, timestep_embedding

__all__ = ["UNet2DConditionModel"]


class UNet2DConditionModel(nn.Module):
    """Text-conditioned UNet predicting the noise (or v) for a latent ``sample``.

    Args:
        config: a :class:`UNetConfig` (``UNetConfig.from_dict(json.load(open("unet/config.json")))``).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        cfg = config
        self.config = cfg
        chans = cfg.block_out_channels
        n = cfg.num_blocks
        temb_dim = cfg.time_embed_dim

        # input and time embedding (§2.2)
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], kernel_size=cfg.conv_in_kernel,
                                 padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim, act_fn=cfg.act_fn)
        if cfg.addition_embed_type == "text_time":
            # diffusers builds add_embedding with the default activation (silu), whatever act_fn is.
            self.add_embedding: TimestepEmbedding | None = TimestepEmbedding(
                cfg.projection_class_embeddings_input_dim, temb_dim)
        else:
            self.add_embedding = None
        self.time_embed_act = activation(cfg.time_embedding_act_fn) if cfg.time_embedding_act_fn else None

        res = resnet_kwargs(temb_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, cfg.dropout,
                            1.0, cfg.resnet_time_scale_shift)
        heads, cross, layers = cfg.heads(), cfg.cross_dims(), cfg.layers()
        tlayers = cfg.transformer_layers()

        # down
        self.down_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, chans[i]
            last = i == n - 1
            if kind == "DownBlock2D":
                block: nn.Module = DownBlock2D(in_ch, out_ch, layers[i], not last, cfg.downsample_padding, res)
            else:
                block = CrossAttnDownBlock2D(in_ch, out_ch, layers[i], not last, cfg.downsample_padding, res,
                                             heads[i], cross[i], tlayers[i], cfg.use_linear_projection)
            self.down_blocks.append(block)

        # mid
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            mid_res = dict(res, output_scale_factor=cfg.mid_block_scale_factor)
            self.mid_block: UNetMidBlock2DCrossAttn | None = UNetMidBlock2DCrossAttn(
                chans[-1], mid_res, heads[-1], cross[-1], tlayers[-1], cfg.use_linear_projection)
        else:
            self.mid_block = None

        # up: reversed per-block settings; resnets = layers + 1
        rchans = list(reversed(chans))
        rheads, rcross, rlayers = heads[::-1], cross[::-1], layers[::-1]
        rtlayers = cfg.reverse_transformer_layers()
        self.up_blocks = nn.ModuleList()
        self.num_upsamplers = 0
        out_ch = rchans[0]
        for i, kind in enumerate(cfg.up_block_types):
            last = i == n - 1
            prev_ch, out_ch = out_ch, rchans[i]
            in_ch = rchans[min(i + 1, n - 1)]
            if not last:
                self.num_upsamplers += 1
            if kind == "UpBlock2D":
                block = UpBlock2D(in_ch, prev_ch, out_ch, rlayers[i] + 1, not last, res)
            else:
                block = CrossAttnUpBlock2D(in_ch, prev_ch, out_ch, rlayers[i] + 1, not last, res,
                                           rheads[i], rcross[i], rtlayers[i], cfg.use_linear_projection)
            self.up_blocks.append(block)

        # out
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self._conv_act_ = activation_inplace(cfg.act_fn)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, kernel_size=cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (of ``conv_in``)."""
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device (of ``conv_in``)."""
        return self.conv_in.weight.device

    # ------------------------------------------------------------------ conditioning
    def _timesteps(self, timestep: int | float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Timestep(s) as a ``(batch,)`` tensor on ``device`` (int64 for ints, float64 for floats, as diffusers)."""
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device)
            if t.ndim == 0:
                t = t[None]
            elif t.ndim != 1:
                raise ValueError(f"timestep must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        else:
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32
            t = torch.tensor([timestep], dtype=dtype, device=device)
        if t.shape[0] not in (1, batch):
            raise ValueError(f"timestep has {t.shape[0]} entries but the batch has {batch} samples")
        return t.expand(batch)

    def time_embed(
        self,
        timestep: int | float | torch.Tensor,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``(B, time_embed_dim)`` embedding every resnet receives: time MLP (+ SDXL text_time MLP)."""
        cfg = self.config
        t = self._timesteps(timestep, batch, device)
        # sinusoid in float32, cast to the model dtype afterwards (sdxl.md §7)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
        emb = self.time_embedding(t_emb)  # (B, temb)
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet has addition_embed_type='text_time': pass text_embeds (B, pooled_dim) "
                                 "and time_ids (B, 6)")
            if text_embeds.shape[0] != batch or time_ids.shape[0] != batch:
                raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} "
                                 f"must have batch size {batch}")
            # each time id gets its own float32 sinusoid of width addition_time_embed_dim (§2.3)
            tid = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(batch, -1)  # (B, n_ids * add_dim)
            add = torch.cat([text_embeds, tid], dim=-1).to(emb.dtype)  # (B, projection_input_dim)
            emb = emb + self.add_embedding(add)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids were given but this UNet has no addition embedding "
                             "(addition_embed_type is None)")
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output for a noisy latent.

        Args:
            sample: ``(B, in_channels, H, W)`` latent.
            timestep: Python int/float, 0-d tensor or ``(B,)`` tensor of train timesteps.
            encoder_hidden_states: ``(B, L, cross_attention_dim)`` text tokens (SDXL: ``(B, 77, 2048)``).
            text_embeds: ``(B, pooled_dim)`` pooled text embedding (SDXL only; 1280 for base).
            time_ids: ``(B, n_ids)`` micro-conditioning ids (SDXL: 6 = original size, crop, target size).
        Returns:
            ``(B, out_channels, H, W)`` tensor in ``sample``'s dtype.
        """
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W), got shape {tuple(sample.shape)}")
        batch = sample.shape[0]
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch
                or encoder_hidden_states.shape[2] not in cfg.cross_dims()):
            raise ValueError(f"encoder_hidden_states must be (B={batch}, L, {cfg.cross_dims()[0]}), "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        up_factor = 2 ** self.num_upsamplers
        # forward the skip sizes to the upsamplers only when H or W is not a multiple of 2**num_upsamplers
        forward_upsample_size = any(s % up_factor for s in sample.shape[-2:])
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embed(timestep, batch, sample.dtype, sample.device, text_embeds, time_ids)
        context = encoder_hidden_states

        h = self.conv_in(sample)  # (B, C0, H, W)
        skips: list[torch.Tensor] = [h]
        for down in self.down_blocks:
            h = down(h, emb, context, skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        last = len(self.up_blocks) - 1
        for i, up in enumerate(self.up_blocks):
            n_res = len(up.resnets)
            res = skips[-n_res:]
            del skips[-n_res:]
            size = tuple(skips[-1].shape[2:]) if (i != last and forward_upsample_size) else None
            h = up(h, res, emb, context, size)
        act = self.conv_act if torch.is_grad_enabled() else self._conv_act_
        h = self.conv_out(act(self.conv_norm_out(h)))  # (B, out_channels, H, W)
        return h
