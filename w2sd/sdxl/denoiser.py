"""An SDXL UNet with its conditioning bound in, as a denoiser ``(x, t) -> eps`` (w2sd.denoiser protocol).

    eps = unet(x, t | uncond) + s * (unet(x, t | cond) - unet(x, t | uncond))      (CFG, Ho & Salimans 2022)

- Both CFG branches run as ONE UNet call on the batch ``[x; x]`` with ``[negative; positive]`` conditioning, in
  the order diffusers' ``StableDiffusionXLPipeline`` uses (sdxl.md §3.4), so the numbers match it.
- Scale 1 runs only the conditional branch and scale 0 only the unconditional one (the published W2SD code runs
  both branches at scale 1.0: uncond + 1 * (cond - uncond) = cond, a wasted half batch).
- A LoRA handle's scale is set right before every UNet call, so several denoisers (strong / weak / main) can
  share one UNet and one attached LoRA; switching costs one float write (w2sd.lora).

``nfe_per_call`` is the number of UNet batch items one call costs per sample (2 with CFG, 1 without), which the
shared sampler multiplies into its NFE count; ``unet_calls`` / ``unet_items`` count what really ran.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from w2sd.sdxl.prompt import PromptEmbeds

__all__ = ["SDXLConditioning", "SDXLDenoiser", "cfg_branches"]


def cfg_branches(guidance_scale: float) -> str:
    """Which UNet branches a CFG scale needs: ``"cond"`` (scale 1), ``"uncond"`` (scale 0) or ``"both"``."""
    g = float(guidance_scale)
    if not math.isfinite(g):
        raise ValueError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    if g == 1.0:
        return "cond"
    if g == 0.0:
        return "uncond"
    return "both"


class SDXLConditioning:
    """Prompt embeddings and micro-conditioning ids of one denoiser, each ``(B, ...)`` or ``(1, ...)``.

    prompt_embeds (B, 77, 2048), pooled (B, 1280), time_ids (B, 6) for SDXL base; the negatives are needed only
    when the guidance scale is not 1 (``negative_time_ids`` defaults to ``time_ids``, as in diffusers).
    """

    def __init__(self, embeds: PromptEmbeds, time_ids: torch.Tensor,
                 negative_time_ids: torch.Tensor | None = None) -> None:
        self.embeds = embeds
        self.time_ids = time_ids
        self.negative_time_ids = time_ids if negative_time_ids is None else negative_time_ids

    def branch(self, which: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, text_embeds, time_ids)`` of the ``"cond"`` or ``"uncond"`` branch, batch rows."""
        e = self.embeds
        if which == "cond":
            parts = (e.prompt_embeds, e.pooled, self.time_ids)
        else:
            if e.negative_prompt_embeds is None or e.negative_pooled is None:
                raise ValueError("this denoiser's guidance scale needs the unconditional branch, but the prompt "
                                 "embeddings were encoded without negatives (do_cfg=False)")
            parts = (e.negative_prompt_embeds, e.negative_pooled, self.negative_time_ids)
        return tuple(_rows(p, batch, which) for p in parts)  # type: ignore[return-value]


def _rows(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} conditioning has {t.shape[0]} rows but the latent batch has {batch} samples")


class SDXLDenoiser:
    """``(x, t) -> eps`` for an SDXL UNet with bound prompts, CFG scale and (optionally) a LoRA scale.

    Args:
        unet: ``w2sd.sdxl.unet.UNet2DConditionModel`` (anything with its forward signature).
        cond: the prompt embeddings and time ids (:class:`SDXLConditioning`).
        guidance_scale: CFG scale s; 1 = conditional only, 0 = unconditional only.
        lora: a ``w2sd.lora.LoRAHandle`` attached to ``unet`` (or None).
        lora_scale: the scale to set on ``lora`` before every call (None: leave it untouched).
        name: shown in errors and reports.
    """

    def __init__(self, unet: nn.Module, cond: SDXLConditioning, guidance_scale: float, *, lora=None,
                 lora_scale: float | None = None, name: str = "") -> None:
        self.unet, self.cond = unet, cond
        self.guidance_scale = float(guidance_scale)
        self.branches = cfg_branches(guidance_scale)
        if lora_scale is not None and lora is None:
            raise ValueError(f"denoiser {name!r}: lora_scale={lora_scale} given but no LoRA is attached")
        self.lora, self.lora_scale = lora, (None if lora_scale is None else float(lora_scale))
        self.name = name
        self.nfe_per_call = 2 if self.branches == "both" else 1
        self.unet_calls = 0   # UNet forward calls made
        self.unet_items = 0   # UNet batch items evaluated (samples x branches)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.lora is not None and self.lora_scale is not None:
            self.lora.scale = self.lora_scale
        b = x.shape[0]
        if self.branches != "both":
            h, pooled, ids = self.cond.branch(self.branches, b)
            return self._unet(x, t, h, pooled, ids)
        hu, pu, iu = self.cond.branch("uncond", b)
        hc, pc, ic = self.cond.branch("cond", b)
        out = self._unet(torch.cat([x, x]), t, torch.cat([hu, hc]), torch.cat([pu, pc]), torch.cat([iu, ic]))
        eps_u, eps_c = out.chunk(2)  # (B, C, h, w) each
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def _unet(self, x: torch.Tensor, t: int, h: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor
              ) -> torch.Tensor:
        self.unet_calls += 1
        self.unet_items += x.shape[0]
        return self.unet(x, t, h, text_embeds=pooled, time_ids=ids)

    def __repr__(self) -> str:
        lora = "" if self.lora_scale is None else f", lora_scale={self.lora_scale}"
        return f"SDXLDenoiser({self.name!r}, guidance_scale={self.guidance_scale}{lora})"
