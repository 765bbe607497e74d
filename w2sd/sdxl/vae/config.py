"""VAE configuration: the subset of diffusers' ``AutoencoderKL`` config that SD 1.x/2.x and SDXL use.

``VAEConfig.from_dict`` reads a diffusers ``vae/config.json`` dict. Defaults equal diffusers' constructor defaults
(diffusers 0.42 ``AutoencoderKL.__init__``), so a partial dict builds the network diffusers would build. Values this
package does not implement raise :class:`w2sd.errors.CheckpointError` naming the key; unknown keys are refused, not
ignored. See ``docs/research/sdxl.md`` §5.1.

Reference values: SDXL ``scaling_factor=0.13025, force_upcast=True``; SD 1.5 ``scaling_factor=0.18215``. Always
take the value from the checkpoint's config (the SD default 0.18215 is wrong for SDXL, sdxl.md §5.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from w2sd.errors import CheckpointError

__all__ = ["VAEConfig", "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "ACTIVATIONS"]

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACTIVATIONS = ("silu", "swish")  # diffusers' names for the same function; SD/SDXL VAEs use "silu"
CLASS_NAMES = ("AutoencoderKL",)


def _tuple(value: Any) -> Any:
    """JSON lists become tuples (recursively) so the config is hashable and compares by value."""
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


def _to_list(v: Any) -> Any:
    return [_to_list(x) for x in v] if isinstance(v, tuple) else v


@dataclass
class VAEConfig:
    """Hyper-parameters of a diffusers ``AutoencoderKL`` (diffusers field names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _tuple(getattr(self, f.name)))
        self._validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``vae/config.json`` dict.

        Keys starting with ``_`` are metadata and skipped, except ``_class_name``, which must be ``AutoencoderKL``
        when present. Raises ``CheckpointError`` naming the key for an unknown key or an unsupported value.
        """
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name not in CLASS_NAMES:
            raise CheckpointError(f"VAE config _class_name={cls_name!r} is not supported (supported: AutoencoderKL)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise CheckpointError(f"VAE config has unknown keys {unknown!r}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The config as a diffusers-style dict (tuples as lists)."""
        return {f.name: _to_list(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def scale_factor(self) -> int:
        """Spatial down-sampling factor image -> latent: ``2 ** (len(block_out_channels) - 1)`` (SDXL: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _validate(self) -> None:
        def bad(key: str, why: str) -> CheckpointError:
            return CheckpointError(f"VAE config {key}={getattr(self, key)!r}: {why}")

        n = len(self.block_out_channels)
        if n == 0:
            raise bad("block_out_channels", "needs at least one entry")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(key, "must be a positive integer")
        for c in self.block_out_channels:
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise bad("block_out_channels", "entries must be positive integers")
            if c % self.norm_num_groups:
                raise bad("norm_num_groups", f"must divide every block_out_channels entry (got {c})")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, key)
            if not isinstance(types, tuple) or len(types) != n:
                raise bad(key, f"must have one entry per block_out_channels entry ({n})")
            for t in types:
                if t not in allowed:
                    raise CheckpointError(f"VAE config {key} entry {t!r} is not supported "
                                          f"(supported: {', '.join(allowed)})")
        if self.act_fn not in ACTIVATIONS:
            raise bad("act_fn", f"supported: {', '.join(ACTIVATIONS)}")
        if not isinstance(self.scaling_factor, int | float) or isinstance(self.scaling_factor, bool) \
                or self.scaling_factor <= 0:
            raise bad("scaling_factor", "must be a positive number")
        if self.shift_factor is not None and (not isinstance(self.shift_factor, int | float)
                                              or isinstance(self.shift_factor, bool)):
            raise bad("shift_factor", "must be a number or null")
        for key in ("latents_mean", "latents_std"):
            if getattr(self, key) is not None:
                raise bad(key, "per-channel latent statistics are not supported (only null)")
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise bad("sample_size", "must be a positive integer or a list of them")
