"""kohya-ss LoRA module names -> module paths of our (diffusers/transformers-named) models.

kohya names a LoRA module ``<prefix>_<module path with "." replaced by "_">`` (research/sdxl.md §6.1). For the SDXL
UNet the path is the **SGM/LDM** module path (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), for the text
encoders the transformers path (``text_model.encoder.layers.3.mlp.fc1``). Underscores inside names (``to_q``,
``proj_in``, ``transformer_blocks``) make the underscore form ambiguous to parse, so we never parse it: we build the
table ``{kohya name: module path}`` from the model's own module tree and look names up exactly (§6.3,
"Recommendation for the port").

The SGM <-> diffusers UNet map is derived from the module tree's structure (how many resnets / attentions /
down- and upsamplers each block has), not from hard-coded lists, so it holds for any UNet config with the
diffusers topology (research/sdxl.md §2.5). It is the module-level twin of the state-dict key map in
``w2sd/sdxl/loading/keymap_unet.py`` (to be deduplicated once both exist).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from w2sd.errors import LoRAError

# kohya file prefix -> the component name used in the ``models`` dict given to ``attach_lora``.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet": "unet",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te": "text_encoder",  # SD1.x single text encoder
}

# diffusers ResnetBlock2D child -> SGM ResBlock child (research/sdxl.md §2.5).
_RESNET_CHILD_TO_SGM: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Top-level diffusers UNet modules -> SGM (research/sdxl.md §2.5).
_TOP_LEVEL_TO_SGM: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_BLOCK_CHILD_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.|$)"
)
_MID_CHILD_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.|$)")


@dataclass
class _BlockLayout:
    """Children counts of one diffusers down/up block, read off the module paths."""

    resnets: int = 0
    attentions: int = 0
    samplers: int = 0


@dataclass
class UNetLayout:
    """The block structure of a diffusers-named UNet, enough to number SGM input/output blocks."""

    down: list[_BlockLayout] = field(default_factory=list)
    up: list[_BlockLayout] = field(default_factory=list)
    mid_resnets: int = 0
    mid_attentions: int = 0


def unet_layout(module_paths: list[str]) -> UNetLayout:
    """Count resnets / attentions / samplers per block from diffusers module paths (e.g. ``named_modules`` names)."""
    down: dict[int, _BlockLayout] = {}
    up: dict[int, _BlockLayout] = {}
    layout = UNetLayout()
    for path in module_paths:
        m = _BLOCK_CHILD_RE.match(path)
        if m:
            blocks = down if m.group(1) == "down_blocks" else up
            blk = blocks.setdefault(int(m.group(2)), _BlockLayout())
            kind = "samplers" if m.group(3) in ("downsamplers", "upsamplers") else m.group(3)
            setattr(blk, kind, max(getattr(blk, kind), int(m.group(4)) + 1))
            continue
        m = _MID_CHILD_RE.match(path)
        if m:
            if m.group(1) == "resnets":
                layout.mid_resnets = max(layout.mid_resnets, int(m.group(2)) + 1)
            else:
                layout.mid_attentions = max(layout.mid_attentions, int(m.group(2)) + 1)
    for blocks, out in ((down, layout.down), (up, layout.up)):
        for i in range(max(blocks, default=-1) + 1):
            out.append(blocks.get(i, _BlockLayout()))
    return layout


def _sgm_block_prefixes(layout: UNetLayout) -> dict[str, str]:
    """Map diffusers block-child prefixes (``down_blocks.1.resnets.0``) to SGM prefixes (``input_blocks.4.0``).

    SGM numbers ``input_blocks`` sequentially: ``input_blocks.0`` is conv_in, then one block per resnet (the resnet at
    ``.0``, its attention at ``.1``) and one per downsampler (``.0.op``). ``output_blocks`` count one block per resnet;
    a block's upsampler sits in its last output block at ``.2`` if the block has attention, else at ``.1``
    (research/sdxl.md §2.5). ``middle_block`` alternates resnet, attention, resnet, ...
    """
    prefixes: dict[str, str] = {}
    n = 0
    for b, blk in enumerate(layout.down):
        for j in range(blk.resnets):
            n += 1
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{n}.0"
            if j < blk.attentions:
                prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{n}.1"
        if blk.samplers:
            n += 1
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    n = -1
    for b, blk in enumerate(layout.up):
        for j in range(blk.resnets):
            n += 1
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{n}.0"
            if j < blk.attentions:
                prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{n}.1"
        if blk.samplers:
            slot = 2 if blk.attentions else 1
            prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{n}.{slot}.conv"
    for j in range(layout.mid_resnets):
        prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    for j in range(layout.mid_attentions):
        prefixes[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    return prefixes


def diffusers_to_sgm_module_paths(module_paths: list[str]) -> dict[str, str]:
    """Map each diffusers UNet module path that has an SGM counterpart to its SGM module path.

    ``module_paths`` is the list of ``named_modules()`` names of a diffusers-named UNet. Paths without an SGM
    counterpart (containers, activations, ``time_proj``) are left out. Example:
    ``down_blocks.1.resnets.0.conv1 -> input_blocks.4.0.in_layers.2``.
    """
    prefixes = _sgm_block_prefixes(unet_layout(module_paths))
    out: dict[str, str] = {}
    for path in module_paths:
        if path in _TOP_LEVEL_TO_SGM:
            out[path] = _TOP_LEVEL_TO_SGM[path]
            continue
        m = _BLOCK_CHILD_RE.match(path) or _MID_CHILD_RE.match(path)
        if not m:
            continue
        head = m.group(0).rstrip(".")
        if head.endswith(("downsamplers.0", "upsamplers.0")):
            head += ".conv"
            if not (path == head or path.startswith(head + ".")):
                continue
        if head not in prefixes:
            continue
        rest = path[len(head) :].lstrip(".")
        if ".resnets." in head:
            if not rest:
                out[path] = prefixes[head]
                continue
            child, _, tail = rest.partition(".")
            if child not in _RESNET_CHILD_TO_SGM:
                continue  # activations / dropout: no weights, no SGM name
            rest = _RESNET_CHILD_TO_SGM[child] + ("." + tail if tail else "")
        out[path] = prefixes[head] + ("." + rest if rest else "")
    return out


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def kohya_name_table(component: str, module_paths: list[str]) -> dict[str, str]:
    """Build ``{kohya module name: module path}`` for every path in ``module_paths`` of one model component.

    ``component`` is ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``.
    - UNet: both the SGM spelling (``lora_unet_input_blocks_4_1_...``, what kohya's SDXL trainer writes) and the
      diffusers spelling (``lora_unet_down_blocks_1_attentions_0_...``, written by some converters) are listed.
    - Text encoders: ``lora_te1_`` / ``lora_te2_`` (and SD1.x ``lora_te_`` for ``text_encoder``) + the transformers
      path, with and without a leading ``text_model.`` (transformers 5 ``CLIPTextModel`` has no ``text_model``
      wrapper while kohya names always start with ``text_model_``).
    Raises ``LoRAError`` if two different modules would get the same kohya name.
    """
    table: dict[str, str] = {}
    module_paths = [p for p in module_paths if p]

    def add(name: str, path: str) -> None:
        prev = table.setdefault(name, path)
        if prev != path:
            raise LoRAError(f"kohya name {name!r} is ambiguous in {component!r}: modules {prev!r} and {path!r}")

    if component == "unet":
        sgm = diffusers_to_sgm_module_paths(module_paths)
        for path in module_paths:
            add("lora_unet_" + _underscored(path), path)
        for path, sgm_path in sgm.items():
            add("lora_unet_" + _underscored(sgm_path), path)
        return table
    prefixes = [p for p, comp in KOHYA_PREFIXES.items() if comp == component]
    if not prefixes:
        raise LoRAError(f"no kohya prefix is defined for model component {component!r}")
    for prefix in prefixes:
        for path in module_paths:
            add(prefix + "_" + _underscored(path), path)
            if not path.startswith("text_model."):
                add(prefix + "_text_model_" + _underscored(path), path)
    return table


def lora_target_paths(model: nn.Module) -> list[str]:
    """Module paths of every ``nn.Linear`` / ``nn.Conv2d`` in ``model`` (the modules a LoRA can attach to)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
