"""Single-file checkpoints: SGM/LDM naming as SDXL base, the refiner and fine-tunes (e.g. Juggernaut-XL) ship.

One ``.safetensors`` holds every model under a prefix (research/sdxl.md §2.5, §3.5, §5.3)::

    model.diffusion_model.*                 UNet (keymap_unet)
    first_stage_model.*                     VAE (keymap_vae; attention weights as 1x1 convs)
    conditioner.embedders.0.transformer.*   CLIP ViT-L/14 text, transformers names (base only)
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14 text (base; the refiner: embedders.0.model.*)

The architecture is detected from the key names and shapes (``detect_architecture``); the file carries no config,
so the defaults of ``configs.SINGLE_FILE_DEFAULTS`` (or configs the caller gives) are used and every shape is then
checked strictly. Keys under no component prefix (``denoiser.sigmas``, EMA copies, ...) are ignored and reported.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.sdxl.loading.keymap_text import TEXT_JUNK_SUFFIXES, hf_clip_recipes, openclip_recipes
from w2sd.sdxl.loading.keymap_unet import SGM_UNET_PREFIX, unet_key_map
from w2sd.sdxl.loading.keymap_vae import LDM_VAE_PREFIX, rename_deprecated_vae_attention, vae_key_map
from w2sd.sdxl.loading.models import load_component
from w2sd.sdxl.loading.safetensors_io import CheckpointReader
from w2sd.sdxl.loading.strict import MAX_LISTED, TensorRecipe

__all__ = [
    "SINGLE_FILE_PREFIXES",
    "detect_architecture",
    "find_component",
    "single_file_recipes",
    "load_single_file_component",
    "unclaimed_keys",
    "describe_unclaimed",
    "unet_architecture",
]

SINGLE_FILE_PREFIXES: dict[str, dict[str, str]] = {
    "sdxl_base": {
        "unet": SGM_UNET_PREFIX,
        "vae": LDM_VAE_PREFIX,
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "sdxl_refiner": {
        "unet": SGM_UNET_PREFIX,
        "vae": LDM_VAE_PREFIX,
        "text_encoder_2": "conditioner.embedders.0.model.",
    },
}

# (label_emb / add_embedding input features) -> architecture: 1280 pooled + 6 (base) or 5 (refiner) ids x 256.
_ADM_IN = {2816: "sdxl_base", 2560: "sdxl_refiner"}


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _top_prefixes(keys: list[str], n: int = 8) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{h}.* ({c})" for h, c in top)


def unet_architecture(reader: CheckpointReader) -> str | None:
    """``sdxl_base`` / ``sdxl_refiner`` from the width of the UNet's text-time embedding input, else ``None``."""
    for key in (SGM_UNET_PREFIX + "label_emb.0.0.weight", "label_emb.0.0.weight", "add_embedding.linear_1.weight"):
        if key in reader:
            return _ADM_IN.get(reader.shape(key)[-1])
    return None


def detect_architecture(reader: CheckpointReader) -> str:
    """``"sdxl_base"`` or ``"sdxl_refiner"`` for a full SGM single file; ``CheckpointError`` saying what the file
    looks like otherwise (SD 1.x / 2.x, a LoRA, a diffusers-named single component, unknown)."""
    keys = reader.keys()
    src = reader.description
    layout = None
    if _has_prefix(keys, "conditioner.embedders.1.model.") and _has_prefix(keys, "conditioner.embedders.0.transformer."):
        layout = "sdxl_base"
    elif _has_prefix(keys, "conditioner.embedders.0.model.") and not _has_prefix(keys, "conditioner.embedders.1."):
        layout = "sdxl_refiner"
    if layout is not None:
        by_shape = unet_architecture(reader)  # None for non-standard widths (then the strict check decides)
        if by_shape is not None and by_shape != layout:
            key = SGM_UNET_PREFIX + "label_emb.0.0.weight"
            raise CheckpointError(
                f"{src}: text encoders are laid out as {layout} but the UNet's {key} {list(reader.shape(key))} "
                f"has the input width of {by_shape}; the file mixes two architectures"
            )
        return layout
    if _has_prefix(keys, "cond_stage_model.transformer."):
        raise CheckpointError(
            f"{src}: checkpoint looks like Stable Diffusion 1.x (has cond_stage_model.transformer.*, one CLIP-L text "
            "encoder, no conditioner.embedders.*) but w2sd loads SDXL (base or refiner) checkpoints only"
        )
    if _has_prefix(keys, "cond_stage_model.model."):
        raise CheckpointError(
            f"{src}: checkpoint looks like Stable Diffusion 2.x (has cond_stage_model.model.*, an OpenCLIP ViT-H "
            "text encoder) but w2sd loads SDXL (base or refiner) checkpoints only"
        )
    if any("lora_" in k or ".lora." in k for k in keys[:200]):
        raise CheckpointError(f"{src}: this is a LoRA file (keys like {keys[0]!r}); load it with w2sd.lora instead")
    if _has_prefix(keys, SGM_UNET_PREFIX):
        arch = unet_architecture(reader)
        if arch is not None:
            raise CheckpointError(
                f"{src}: has an SDXL UNet ({arch}, model.diffusion_model.*) but no SDXL text encoders "
                "(conditioner.embedders.*); load its parts with load_unet / load_vae, or use a full checkpoint"
            )
        raise CheckpointError(
            f"{src}: has a UNet (model.diffusion_model.*) without SDXL's text-time embedding (label_emb.0.0); "
            "not an SDXL checkpoint"
        )
    raise CheckpointError(
        f"{src}: not an SDXL single-file checkpoint (no model.diffusion_model.* / conditioner.embedders.*). "
        f"Top-level keys: {_top_prefixes(keys)}"
    )


def find_component(reader: CheckpointReader, kind: str) -> tuple[str, str]:
    """Where component ``kind`` sits in a file: ``(prefix, naming)`` with naming ``"sgm"`` (original names),
    ``"diffusers"`` (diffusers/transformers names) or ``"openclip"``. Raises ``CheckpointError`` if absent."""
    keys = reader.keys()
    candidates: dict[str, list[tuple[str, str]]] = {
        "unet": [(SGM_UNET_PREFIX, "sgm"), ("", "diffusers"), ("", "sgm")],
        "vae": [(LDM_VAE_PREFIX, "sgm"), ("", "diffusers"), ("", "sgm")],
        "text_encoder": [
            ("conditioner.embedders.0.transformer.", "diffusers"),
            ("cond_stage_model.transformer.", "diffusers"),
            ("", "diffusers"),
        ],
        "text_encoder_2": [
            ("conditioner.embedders.1.model.", "openclip"),
            ("conditioner.embedders.0.model.", "openclip"),
            ("", "openclip"),
            ("", "diffusers"),
        ],
    }
    probes = {
        ("unet", "sgm"): "input_blocks.0.0.weight",
        ("unet", "diffusers"): "conv_in.weight",
        ("vae", "sgm"): "decoder.conv_in.weight",
        ("vae", "diffusers"): "decoder.conv_in.weight",
        ("text_encoder", "diffusers"): "embeddings.token_embedding.weight",
        ("text_encoder_2", "openclip"): "token_embedding.weight",
        ("text_encoder_2", "diffusers"): "embeddings.token_embedding.weight",
    }
    for prefix, naming in candidates[kind]:
        probe = prefix + probes[(kind, naming)]
        hit = probe in reader or (kind.startswith("text") and prefix + "text_model." + probes[(kind, naming)] in reader)
        if not hit:
            continue
        if kind == "vae" and naming == "diffusers" and not _has_prefix(keys, prefix + "decoder.up_blocks."):
            continue
        if kind == "vae" and naming == "sgm" and prefix == "" and not _has_prefix(keys, "decoder.up."):
            continue
        return prefix, naming
    raise CheckpointError(
        f"{reader.description}: no {kind} weights found (top-level keys: {_top_prefixes(keys)})"
    )


def single_file_recipes(
    reader: CheckpointReader, kind: str, prefix: str, naming: str, config: Mapping
) -> tuple[dict[str, TensorRecipe], list[str]]:
    """``(recipes, unplaced checkpoint keys)`` for component ``kind`` under ``prefix``."""
    keys = [k for k in reader.keys() if k.startswith(prefix)]
    recipes: dict[str, TensorRecipe] = {}
    unplaced: list[str] = []
    if kind in ("unet", "vae") and naming == "sgm":
        key_map = unet_key_map(config) if kind == "unet" else vae_key_map(config)
        for key in keys:
            mapped = key_map.forward(key[len(prefix) :])
            if mapped is None:
                unplaced.append(key)
            else:
                recipes[mapped[0]] = TensorRecipe(key, squeeze_1x1=mapped[1])
    elif kind in ("unet", "vae"):
        for key in keys:
            name = key[len(prefix) :]
            recipes[rename_deprecated_vae_attention(name) if kind == "vae" else name] = TensorRecipe(key)
    elif naming == "openclip":
        recipes = openclip_recipes(config, prefix, keys)
        used = {r.source for r in recipes.values()}
        unplaced = [k for k in keys if k not in used and k.split(".")[-1] not in TEXT_JUNK_SUFFIXES]
    else:
        recipes = hf_clip_recipes(keys, prefix)
    return recipes, unplaced


def load_single_file_component(
    reader: CheckpointReader,
    kind: str,
    config: Mapping,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prefix: str | None = None,
    naming: str | None = None,
) -> nn.Module:
    """Strictly load component ``kind`` from a single file (prefix/naming found by ``find_component`` unless
    given)."""
    if prefix is None or naming is None:
        prefix, naming = find_component(reader, kind)
    recipes, unplaced = single_file_recipes(reader, kind, prefix, naming, config)
    return load_component(kind, config, reader, recipes, dtype=dtype, device=device, unexpected_sources=unplaced)


def unclaimed_keys(reader: CheckpointReader, prefixes: Mapping[str, str]) -> list[str]:
    """Keys of a full single file under none of the component prefixes (ignored; reported to the caller)."""
    used = tuple(prefixes.values())
    return [k for k in reader.keys() if not k.startswith(used)]


def describe_unclaimed(keys: list[str]) -> str:
    """Short text listing ignored keys (capped)."""
    shown = ", ".join(keys[:MAX_LISTED])
    more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else ""
    return shown + more
