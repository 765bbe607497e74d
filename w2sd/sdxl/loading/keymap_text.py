"""Text-encoder key maps (research/sdxl.md §3.5). Targets are transformers names WITH the ``text_model.`` prefix.

- Hugging Face CLIP (SDXL's CLIP-L; diffusers folders; SGM ``conditioner.embedders.0.transformer.*``; SD1
  ``cond_stage_model.transformer.*``): the names are the transformers ones; files written by transformers 5.x lack
  the ``text_model.`` prefix (``hf_clip_key`` adds it); ``embeddings.position_ids`` is an old buffer and ignored.
- OpenCLIP (SDXL's bigG, SGM ``conditioner.embedders.1.model.*``; the refiner's ``conditioner.embedders.0.model.*``),
  built per layer from the config (``openclip_recipes``):

  ======================================================  ============================================================
  OpenCLIP                                                transformers
  ======================================================  ============================================================
  ``token_embedding.weight``                              ``text_model.embeddings.token_embedding.weight``
  ``positional_embedding`` (77, D)                        ``text_model.embeddings.position_embedding.weight``
  ``transformer.resblocks.N.ln_1 / ln_2``                 ``text_model.encoder.layers.N.layer_norm1 / layer_norm2``
  ``transformer.resblocks.N.attn.in_proj_weight`` (3D,D)  ``...self_attn.q_proj/k_proj/v_proj.weight`` = rows
                                                          ``[0:D] / [D:2D] / [2D:3D]`` (same for ``in_proj_bias``)
  ``transformer.resblocks.N.attn.out_proj``               ``...self_attn.out_proj``
  ``transformer.resblocks.N.mlp.c_fc / c_proj``           ``...mlp.fc1 / fc2``
  ``ln_final``                                            ``text_model.final_layer_norm``
  ``text_projection`` (D, P), used as ``x @ P``           ``text_projection.weight`` = ``P.T`` (Linear, no bias)
  ``logit_scale``                                         (ignored)
  ======================================================  ============================================================

  A ``text_projection.weight`` (already in Linear layout, seen in some community files) is taken as is.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from w2sd.sdxl.loading.strict import TensorRecipe

__all__ = [
    "TEXT_JUNK_SUFFIXES",
    "hf_clip_key",
    "hf_clip_recipes",
    "openclip_recipes",
    "openclip_layer_names",
    "text_state_dict_to_openclip",
]

# Keys that carry no weights of ours; ignored by name wherever they appear in a text-encoder prefix.
TEXT_JUNK_SUFFIXES = ("position_ids", "logit_scale")


def _is_junk(name: str) -> bool:
    return name.split(".")[-1] in TEXT_JUNK_SUFFIXES


def hf_clip_key(name: str) -> str | None:
    """A transformers CLIP text key (with or without ``text_model.``) -> our name; ``None`` for junk keys."""
    if _is_junk(name):
        return None
    if name.startswith("text_model.") or name.startswith("text_projection."):
        return name
    return "text_model." + name


def hf_clip_recipes(keys: Iterable[str], prefix: str = "") -> dict[str, TensorRecipe]:
    """Recipes for a transformers-named text encoder stored under ``prefix`` (junk keys dropped)."""
    recipes = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        target = hf_clip_key(key[len(prefix) :])
        if target is not None:
            recipes[target] = TensorRecipe(key)
    return recipes


def openclip_layer_names(layer: int) -> dict[str, str]:
    """OpenCLIP -> transformers names for the one-to-one tensors of resblock ``layer``."""
    src, dst = f"transformer.resblocks.{layer}.", f"text_model.encoder.layers.{layer}."
    pairs = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    return {f"{src}{a}.{p}": f"{dst}{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def openclip_recipes(config: Mapping, prefix: str, keys: Iterable[str] = ()) -> dict[str, TensorRecipe]:
    """Recipes for an OpenCLIP text tower under ``prefix``, for a transformers CLIPTextConfig dict.

    ``keys`` (the checkpoint's names) only decides between ``text_projection`` (OpenCLIP, transposed) and an
    already-Linear ``text_projection.weight``.
    """
    width = int(config["hidden_size"])
    recipes = {
        "text_model.embeddings.token_embedding.weight": TensorRecipe(prefix + "token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": TensorRecipe(prefix + "positional_embedding"),
        "text_model.final_layer_norm.weight": TensorRecipe(prefix + "ln_final.weight"),
        "text_model.final_layer_norm.bias": TensorRecipe(prefix + "ln_final.bias"),
    }
    if prefix + "text_projection.weight" in set(keys):
        recipes["text_projection.weight"] = TensorRecipe(prefix + "text_projection.weight")
    else:
        recipes["text_projection.weight"] = TensorRecipe(prefix + "text_projection", transpose=True)
    for layer in range(int(config["num_hidden_layers"])):
        for src, dst in openclip_layer_names(layer).items():
            recipes[dst] = TensorRecipe(prefix + src)
        attn_src = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_"
        attn_dst = f"text_model.encoder.layers.{layer}.self_attn."
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = (i * width, (i + 1) * width)
            recipes[f"{attn_dst}{proj}.weight"] = TensorRecipe(attn_src + "weight", rows=rows)
            recipes[f"{attn_dst}{proj}.bias"] = TensorRecipe(attn_src + "bias", rows=rows)
    return recipes


def text_state_dict_to_openclip(
    state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str
) -> dict[str, torch.Tensor]:
    """transformers-named CLIPTextModelWithProjection state dict -> OpenCLIP names (packs q/k/v, transposes
    the projection; the inverse of ``openclip_recipes``, used to write test files)."""
    sd = {hf_clip_key(k): v for k, v in state_dict.items() if hf_clip_key(k) is not None}
    out: dict[str, torch.Tensor] = {}
    for target, recipe in openclip_recipes(config, prefix).items():
        if recipe.rows is not None:
            continue
        tensor = sd[target]
        out[recipe.source] = tensor.t().contiguous() if recipe.transpose else tensor
    for layer in range(int(config["num_hidden_layers"])):
        attn = f"text_model.encoder.layers.{layer}.self_attn."
        for p in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{p}"] = torch.cat(
                [sd[f"{attn}{proj}.{p}"] for proj in ("q_proj", "k_proj", "v_proj")], dim=0
            )
    return out
