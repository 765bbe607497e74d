"""UNet key map: SGM/LDM single-file names (``model.diffusion_model.*``) <-> diffusers ``UNet2DConditionModel``.

Built from the diffusers UNet config (block types, ``layers_per_block``), see research/sdxl.md §2.5:

- ``input_blocks.0.0`` is ``conv_in``; input block ``n >= 1`` belongs to down block ``b``: each down block has
  ``layers_per_block`` slots ``input_blocks.n.0`` (resnet) / ``.1`` (attention, cross-attn blocks only), then one
  ``input_blocks.n.0.op`` (downsampler) unless it is the last block.
- ``middle_block.0 / .1 / .2`` are ``mid_block.resnets.0 / attentions.0 / resnets.1``.
- Up block ``b`` has ``layers_per_block + 1`` output blocks: ``.0`` resnet, ``.1`` attention (cross-attn blocks);
  the last one of every up block but the final one carries the upsampler ``conv`` at ``.2`` (after an attention)
  or ``.1`` (no attention).
- ResBlock inner names: ``in_layers.0/2 -> norm1/conv1``, ``emb_layers.1 -> time_emb_proj``,
  ``out_layers.0/3 -> norm2/conv2``, ``skip_connection -> conv_shortcut``. Transformer inner names are identical.
"""

from __future__ import annotations

from typing import Mapping

import torch

from w2sd.sdxl.loading.keymap_common import BlockRule, PrefixKeyMap, Rename

__all__ = ["SGM_UNET_PREFIX", "RESNET_RENAMES", "unet_block_rules", "unet_key_map", "unet_state_dict_to_sgm"]

SGM_UNET_PREFIX = "model.diffusion_model."

RESNET_RENAMES = (
    Rename("in_layers.0.", "norm1."),
    Rename("in_layers.2.", "conv1."),
    Rename("emb_layers.1.", "time_emb_proj."),
    Rename("out_layers.0.", "norm2."),
    Rename("out_layers.3.", "conv2."),
    Rename("skip_connection.", "conv_shortcut."),
)

_TOP_LEVEL = (
    BlockRule("time_embed.0.", "time_embedding.linear_1."),
    BlockRule("time_embed.2.", "time_embedding.linear_2."),
    BlockRule("label_emb.0.0.", "add_embedding.linear_1."),
    BlockRule("label_emb.0.2.", "add_embedding.linear_2."),
    BlockRule("input_blocks.0.0.", "conv_in."),
    BlockRule("out.0.", "conv_norm_out."),
    BlockRule("out.2.", "conv_out."),
)


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def unet_block_rules(config: Mapping) -> list[BlockRule]:
    """Block prefix rules (without ``model.diffusion_model.``) for a diffusers UNet config dict."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = int(config.get("layers_per_block", 2))
    rules = list(_TOP_LEVEL)
    n = 0
    for b, block_type in enumerate(down_types):
        for j in range(layers):
            n += 1
            rules.append(BlockRule(f"input_blocks.{n}.0.", f"down_blocks.{b}.resnets.{j}.", RESNET_RENAMES))
            if _has_attention(block_type):
                rules.append(BlockRule(f"input_blocks.{n}.1.", f"down_blocks.{b}.attentions.{j}."))
        if b < len(down_types) - 1:
            n += 1
            rules.append(BlockRule(f"input_blocks.{n}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        rules.append(BlockRule("middle_block.0.", "mid_block.resnets.0.", RESNET_RENAMES))
        if _has_attention(mid_type):
            rules.append(BlockRule("middle_block.1.", "mid_block.attentions.0."))
            rules.append(BlockRule("middle_block.2.", "mid_block.resnets.1.", RESNET_RENAMES))
        else:
            rules.append(BlockRule("middle_block.1.", "mid_block.resnets.1.", RESNET_RENAMES))
    n = 0
    for b, block_type in enumerate(up_types):
        attn = _has_attention(block_type)
        for j in range(layers + 1):
            rules.append(BlockRule(f"output_blocks.{n}.0.", f"up_blocks.{b}.resnets.{j}.", RESNET_RENAMES))
            if attn:
                rules.append(BlockRule(f"output_blocks.{n}.1.", f"up_blocks.{b}.attentions.{j}."))
            if j == layers and b < len(up_types) - 1:
                slot = 2 if attn else 1
                rules.append(BlockRule(f"output_blocks.{n}.{slot}.conv.", f"up_blocks.{b}.upsamplers.0.conv."))
            n += 1
    return rules


def unet_key_map(config: Mapping) -> PrefixKeyMap:
    """``PrefixKeyMap`` (SGM -> diffusers, keys without ``model.diffusion_model.``) for a UNet config dict."""
    return PrefixKeyMap(unet_block_rules(config))


def unet_state_dict_to_sgm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = SGM_UNET_PREFIX
) -> dict[str, torch.Tensor]:
    """Diffusers-named UNet state dict -> SGM single-file names (the inverse map; used to write test files)."""
    key_map = unet_key_map(config)
    out = {}
    for key, tensor in state_dict.items():
        mapped = key_map.inverse(key)
        if mapped is None:
            raise KeyError(f"UNet key {key!r} has no SGM name under this config")
        out[prefix + mapped[0]] = tensor
    return out
