"""VAE key map: LDM single-file names (``first_stage_model.*``) <-> diffusers ``AutoencoderKL`` (research/sdxl.md §5.3).

- encoder ``down.i.block.j`` <-> ``down_blocks.i.resnets.j``; ``down.i.downsample.conv`` <-> ``downsamplers.0.conv``.
- decoder ``up.{n-1-i}`` <-> ``up_blocks.i`` (the LDM decoder counts its levels from the lowest resolution, so
  the index is reversed); ``up.k.upsample.conv`` <-> ``upsamplers.0.conv``.
- ``mid.block_1 / block_2`` <-> ``mid_block.resnets.0 / 1``; ``mid.attn_1`` <-> ``mid_block.attentions.0`` with
  ``norm -> group_norm``, ``q/k/v -> to_q/to_k/to_v``, ``proj_out -> to_out.0``; the LDM weights are 1x1 convs
  ``(C, C, 1, 1)``, the diffusers ones Linear ``(C, C)``.
- resnet ``nin_shortcut`` <-> ``conv_shortcut``; ``norm_out`` <-> ``conv_norm_out``; ``conv_in``, ``conv_out``,
  ``quant_conv``, ``post_quant_conv`` keep their names.

Old diffusers VAE files name the attention ``query/key/value/proj_attn`` (``DEPRECATED_ATTENTION_RENAMES``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from w2sd.sdxl.loading.keymap_common import BlockRule, PrefixKeyMap, Rename

__all__ = [
    "LDM_VAE_PREFIX",
    "DEPRECATED_ATTENTION_RENAMES",
    "vae_block_rules",
    "vae_key_map",
    "vae_state_dict_to_ldm",
    "rename_deprecated_vae_attention",
]

LDM_VAE_PREFIX = "first_stage_model."

_RESNET = (
    Rename("norm1.", "norm1."),
    Rename("conv1.", "conv1."),
    Rename("norm2.", "norm2."),
    Rename("conv2.", "conv2."),
    Rename("nin_shortcut.", "conv_shortcut."),
)
_ATTENTION = (
    Rename("norm.", "group_norm."),
    Rename("q.", "to_q.", squeeze_1x1=True),
    Rename("k.", "to_k.", squeeze_1x1=True),
    Rename("v.", "to_v.", squeeze_1x1=True),
    Rename("proj_out.", "to_out.0.", squeeze_1x1=True),
)

DEPRECATED_ATTENTION_RENAMES = {
    "query.": "to_q.",
    "key.": "to_k.",
    "value.": "to_v.",
    "proj_attn.": "to_out.0.",
}


def vae_block_rules(config: Mapping) -> list[BlockRule]:
    """Block prefix rules (without ``first_stage_model.``) for a diffusers AutoencoderKL config dict."""
    levels = len(config["block_out_channels"])
    layers = int(config.get("layers_per_block", 2))
    rules = [
        BlockRule("quant_conv.", "quant_conv."),
        BlockRule("post_quant_conv.", "post_quant_conv."),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            BlockRule(f"{part}.conv_in.", f"{part}.conv_in."),
            BlockRule(f"{part}.conv_out.", f"{part}.conv_out."),
            BlockRule(f"{part}.norm_out.", f"{part}.conv_norm_out."),
            BlockRule(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _RESNET),
            BlockRule(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _ATTENTION),
            BlockRule(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _RESNET),
        ]
    for i in range(levels):
        for j in range(layers):
            rules.append(BlockRule(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _RESNET))
        if i < levels - 1:
            rules.append(BlockRule(f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
    for i in range(levels):
        k = levels - 1 - i  # reversed level index
        for j in range(layers + 1):
            rules.append(BlockRule(f"decoder.up.{k}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", _RESNET))
        if i < levels - 1:
            rules.append(BlockRule(f"decoder.up.{k}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return rules


def vae_key_map(config: Mapping) -> PrefixKeyMap:
    """``PrefixKeyMap`` (LDM -> diffusers, keys without ``first_stage_model.``) for a VAE config dict."""
    return PrefixKeyMap(vae_block_rules(config))


def rename_deprecated_vae_attention(key: str) -> str:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (old diffusers VAE files)."""
    marker = ".attentions.0."
    if marker in key:
        head, rest = key.split(marker, 1)
        for old, new in DEPRECATED_ATTENTION_RENAMES.items():
            if rest.startswith(old):
                return head + marker + new + rest[len(old) :]
    return key


def vae_state_dict_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = LDM_VAE_PREFIX
) -> dict[str, torch.Tensor]:
    """Diffusers-named VAE state dict -> LDM single-file names, attention weights as 1x1 convs (the inverse map)."""
    key_map = vae_key_map(config)
    out = {}
    for key, tensor in state_dict.items():
        mapped = key_map.inverse(key)
        if mapped is None:
            raise KeyError(f"VAE key {key!r} has no LDM name under this config")
        name, squeeze = mapped
        out[prefix + name] = tensor[:, :, None, None] if (squeeze and tensor.dim() == 2) else tensor
    return out
