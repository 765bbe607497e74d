"""Builders for the model classes (imported lazily, so the key maps and readers work without them) and the
strict component loaders shared by the folder and single-file paths."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from w2sd.sdxl.loading.safetensors_io import CheckpointReader
from w2sd.sdxl.loading.strict import TensorRecipe, load_strict

__all__ = ["COMPONENT_KINDS", "builder", "load_component"]

# kind -> (what the error messages call it)
COMPONENT_KINDS = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "text_encoder (CLIP ViT-L/14 text)",
    "text_encoder_2": "text_encoder_2 (OpenCLIP ViT-bigG/14 text, with projection)",
}


def builder(kind: str, config: Mapping) -> Callable[[], nn.Module]:
    """A zero-argument constructor of our module for ``kind`` from a diffusers/transformers config dict.

    The config is parsed here (errors surface before any tensor is read).
    """
    if kind == "unet":
        from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig

        cfg = UNetConfig.from_dict(config)
        return lambda: UNet2DConditionModel(cfg)
    if kind == "vae":
        from w2sd.sdxl.vae import AutoencoderKL, VAEConfig

        cfg = VAEConfig.from_dict(config)
        return lambda: AutoencoderKL(cfg)
    if kind in ("text_encoder", "text_encoder_2"):
        from w2sd.sdxl.text_encoder import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfg = CLIPTextConfig.from_dict(config)
        cls = CLIPTextModel if kind == "text_encoder" else CLIPTextModelWithProjection
        return lambda: cls(cfg)
    raise ValueError(f"unknown component kind {kind!r} (expected one of {list(COMPONENT_KINDS)})")


def load_component(
    kind: str,
    config: Mapping,
    reader: CheckpointReader,
    recipes: Mapping[str, TensorRecipe],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    unexpected_sources: Iterable[str] = (),
) -> nn.Module:
    """Strictly load component ``kind`` (see ``strict.load_strict``)."""
    return load_strict(
        builder(kind, config),
        recipes,
        reader,
        dtype=dtype,
        device=device,
        what=COMPONENT_KINDS[kind],
        unexpected_sources=unexpected_sources,
    )
