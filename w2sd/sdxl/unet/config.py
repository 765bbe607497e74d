"""UNet configuration: the subset of diffusers' ``UNet2DConditionModel`` config that SD 1.x/2.x and SDXL use.

``UNetConfig.from_dict`` reads a diffusers ``unet/config.json`` dict. Defaults equal diffusers' constructor
defaults, so a partial dict builds the same network diffusers would. Options that would change the network in a
way this package does not implement raise :class:`w2sd.errors.CheckpointError` naming the key and its value; they
are never ignored. See ``docs/research/sdxl.md`` §2.1 (config) and §2.2 (derived structure).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from w2sd.errors import CheckpointError

__all__ = ["UNetConfig", "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "MID_BLOCK_TYPES", "ACTIVATIONS"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers' get_activation names
TIME_SCALE_SHIFTS = ("default", "scale_shift")

# Keys diffusers accepts that would change the network; only the listed value (the default) is supported.
_MUST_EQUAL: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Keys that diffusers only passes to block types we do not build (Simple*/ResnetDownsample*), or that only matter
# for other addition_embed_types: they have no effect on any network this package can build, whatever the value.
_NO_EFFECT_KEYS = frozenset({"resnet_skip_time_act", "resnet_out_scale_factor", "addition_embed_type_num_heads"})


def _tuple(value: Any) -> Any:
    """JSON lists become tuples (recursively) so the config is hashable and compares by value."""
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


def _per_block(name: str, value: Any, n: int) -> tuple[Any, ...]:
    """Broadcast an int (or None) to one value per down block; check the length of a sequence."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise CheckpointError(f"UNet config {name}={list(value)!r} must have one entry per down block ({n})")
        return value
    return (value,) * n


@dataclass
class UNetConfig:
    """Hyper-parameters of a ``UNet2DConditionModel`` (diffusers field names and defaults).

    Naming trap (diffusers ``unet_2d_condition.py``): ``attention_head_dim`` is the **number of heads** per block,
    because diffusers sets ``num_attention_heads = num_attention_heads or attention_head_dim`` and refuses an
    explicit ``num_attention_heads``. The per-head size is ``block_channels // heads`` (SDXL: 640/10 = 64;
    SD1.5: ``attention_head_dim=8`` gives 8 heads of 320/8 = 40).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[Any, ...] = 1
    reverse_transformer_layers_per_block: tuple[Any, ...] | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Not part of diffusers' config: keys read from the dict that have no effect here (kept for round trips).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "extra":
                setattr(self, f.name, _tuple(getattr(self, f.name)))
        self._validate()

    # ------------------------------------------------------------------ construction from diffusers' config.json
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Build from a diffusers ``unet/config.json`` dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are metadata and skipped.
        Raises ``CheckpointError`` for an unsupported value of a known key, or for an unknown key.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            if key.startswith("_"):
                continue
            value = _tuple(value)
            if key in names:
                kwargs[key] = value
            elif key in _MUST_EQUAL:
                allowed = _MUST_EQUAL[key]
                if value not in allowed:
                    raise CheckpointError(
                        f"UNet config {key}={_to_list(value)!r} is not supported (supported: "
                        f"{' or '.join(repr(a) for a in allowed)})")
                extra[key] = value
            elif key in _NO_EFFECT_KEYS:
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"UNet config has unknown keys {sorted(unknown)!r}")
        return cls(**kwargs, extra=extra)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(key: str, why: str) -> CheckpointError:
            return CheckpointError(f"UNet config {key}={_to_list(getattr(self, key))!r}: {why}")

        n = len(self.down_block_types)
        if n == 0:
            raise bad("down_block_types", "needs at least one block")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise CheckpointError(f"UNet config down_block_types entry {t!r} is not supported "
                                      f"(supported: {', '.join(DOWN_BLOCK_TYPES)})")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise CheckpointError(f"UNet config up_block_types entry {t!r} is not supported "
                                      f"(supported: {', '.join(UP_BLOCK_TYPES)})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise bad("mid_block_type", "supported: 'UNetMidBlock2DCrossAttn' or None")
        if len(self.up_block_types) != n:
            raise bad("up_block_types", f"must have as many entries as down_block_types ({n})")
        if len(self.block_out_channels) != n:
            raise bad("block_out_channels", f"must have as many entries as down_block_types ({n})")
        if self.num_attention_heads is not None:
            # diffusers' UNet2DConditionModel raises here as well (config naming issue #2011).
            raise bad("num_attention_heads", "must be null; diffusers reads the head count from attention_head_dim")
        if any(self.only_cross_attention if isinstance(self.only_cross_attention, tuple)
               else (self.only_cross_attention,)):
            raise bad("only_cross_attention", "only False is supported")
        _per_block("only_cross_attention", self.only_cross_attention, n)
        for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim"):
            for v in _per_block(key, getattr(self, key), n):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise bad(key, "entries must be positive integers")
        tl = _per_block("transformer_layers_per_block", self.transformer_layers_per_block, n)
        if isinstance(self.transformer_layers_per_block, tuple) and self.reverse_transformer_layers_per_block is None:
            if any(isinstance(v, tuple) for v in tl):
                raise bad("transformer_layers_per_block",
                          "nested lists need reverse_transformer_layers_per_block (as in diffusers)")
        if self.act_fn not in ACTIVATIONS:
            raise bad("act_fn", f"supported: {', '.join(ACTIVATIONS)}")
        if self.time_embedding_act_fn is not None and self.time_embedding_act_fn not in ACTIVATIONS:
            raise bad("time_embedding_act_fn", f"supported: None, {', '.join(ACTIVATIONS)}")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise bad("resnet_time_scale_shift", f"supported: {', '.join(TIME_SCALE_SHIFTS)}")
        if self.norm_num_groups is None:
            raise bad("norm_num_groups", "None (no GroupNorm) is not supported")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise bad("norm_num_groups", f"must divide every block_out_channels entry (got {c})")
        if self.addition_embed_type not in (None, "text_time"):
            raise bad("addition_embed_type", "supported: 'text_time' or None")
        if self.addition_embed_type == "text_time":
            if self.addition_time_embed_dim is None:
                raise bad("addition_time_embed_dim", "required when addition_embed_type='text_time'")
            if self.projection_class_embeddings_input_dim is None:
                raise bad("projection_class_embeddings_input_dim", "required when addition_embed_type='text_time'")
        if self.conv_in_kernel % 2 == 0:
            raise bad("conv_in_kernel", "must be odd")
        if self.conv_out_kernel % 2 == 0:
            raise bad("conv_out_kernel", "must be odd")

    # ------------------------------------------------------------------ derived per-block values (§2.2)
    @property
    def num_blocks(self) -> int:
        """Number of down blocks (= number of up blocks)."""
        return len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to every resnet (4 * block_out_channels[0] unless set)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block: ``num_attention_heads or attention_head_dim`` (the diffusers rule)."""
        return _per_block("attention_head_dim", self.attention_head_dim, self.num_blocks)

    def cross_dims(self) -> tuple[int, ...]:
        """Cross-attention (text) width per down block."""
        return _per_block("cross_attention_dim", self.cross_attention_dim, self.num_blocks)

    def layers(self) -> tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return _per_block("layers_per_block", self.layers_per_block, self.num_blocks)

    def transformer_layers(self) -> tuple[Any, ...]:
        """Transformer depth per down block (an int, or one int per resnet)."""
        return _per_block("transformer_layers_per_block", self.transformer_layers_per_block, self.num_blocks)

    def reverse_transformer_layers(self) -> tuple[Any, ...]:
        """Transformer depth per up block: the reversed down depths unless given explicitly."""
        if self.reverse_transformer_layers_per_block is not None:
            return self.reverse_transformer_layers_per_block
        return tuple(reversed(self.transformer_layers()))

    def to_dict(self) -> dict[str, Any]:
        """The config as a diffusers-style dict (tuples as lists), including the no-effect extra keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = _to_list(v)
        out.update({k: _to_list(v) for k, v in self.extra.items()})
        return out


def _to_list(v: Any) -> Any:
    return [_to_list(x) for x in v] if isinstance(v, tuple) else v
