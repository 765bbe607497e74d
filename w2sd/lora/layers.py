"""Runtime-scaled LoRA side branches on ``nn.Linear`` / ``nn.Conv2d`` (kohya semantics, research/sdxl.md §6.1).

A branch is a forward hook on the base module, so the model's module tree, parameter names and state dict are
untouched (strict ``load_state_dict`` keeps working) and detaching restores the base exactly. Its output is

    y = base(x) + scale * (alpha / rank) * up(down(x))

- Linear: ``down`` (r, in), ``up`` (out, r).
- Conv2d (LoCon): ``down`` is a conv (r, in, kh, kw) with the base conv's stride / padding / dilation / padding mode,
  ``up`` a 1x1 conv (out, r, 1, 1).

``scale`` is a ``LoRAScale`` shared by every branch of one attached LoRA and read at forward time, so switching
scale (W2SD switches strong / weak / main three times per step) is one float assignment: no weight merge, no module
rebuild. Scale 0 skips the branch compute. The branch runs in the base weight's dtype and device; the LoRA tensors
are cast once per (device, dtype) and cached. ``copy.deepcopy`` of a model does not carry its LoRAs (the copy
computes the base output; attach again to the copy).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from w2sd.errors import LoRAError


def check_scale(scale: float | torch.Tensor) -> float:
    """Return ``scale`` as a finite Python float; ``ValueError`` for NaN / inf / non-numbers."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"LoRA scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"LoRA scale must be a real number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"LoRA scale must be finite, got {value}")
    return value


class LoRAScale:
    """The runtime scale of one attached LoRA, shared by all of its branches (a plain float read at forward)."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = check_scale(value)


class LoRABranch:
    """One LoRA side branch, installed as a forward hook on ``base`` (an ``nn.Linear`` or ``nn.Conv2d``).

    ``where`` names the module in error messages. ``multiplier`` is ``alpha / rank``. The branch is live from
    construction until ``remove()``.
    """

    def __init__(
        self,
        base: nn.Module,
        down: torch.Tensor,
        up: torch.Tensor,
        multiplier: float,
        scale: LoRAScale,
        where: str,
    ) -> None:
        self.down, self.up = _fit_shapes(base, down, up, where)
        self.multiplier = float(multiplier)
        self.scale = scale
        self.where = where
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv and base.groups != 1:
            raise LoRAError(f"LoRA target {where}: grouped convolutions (groups={base.groups}) are not supported")
        self._cache_key: tuple[torch.device, torch.dtype] | None = None
        self._cast: tuple[torch.Tensor, torch.Tensor] = (self.down, self.up)
        self._cast_to(base.weight)
        self._hook = base.register_forward_hook(self, with_kwargs=True)

    def _cast_to(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (weight.device, weight.dtype)
        if key != self._cache_key:
            self._cast = (
                self.down.to(device=weight.device, dtype=weight.dtype),
                self.up.to(device=weight.device, dtype=weight.dtype),
            )
            self._cache_key = key
        return self._cast

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        s = self.scale.value
        if s == 0.0:
            return None  # keep the base output untouched
        weight = module.weight
        down, up = self._cast_to(weight)
        x = args[0] if args else kwargs["input"]
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        c = s * self.multiplier
        if not self.is_conv:
            h = F.linear(x, down)  # (..., r)
            delta = F.linear(h * c, up)  # (..., out)
        else:
            if module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = 0
            else:
                padding = module.padding
            h = F.conv2d(x, down, None, module.stride, padding, module.dilation)  # (B, r, H', W')
            delta = F.conv2d(h * c, up)  # (B, out, H', W')
        return output + delta.to(output.dtype)

    def remove(self) -> None:
        """Uninstall the hook (idempotent)."""
        self._hook.remove()

    def __deepcopy__(self, memo: dict) -> "_InertBranch":
        # copy.deepcopy(model) copies its forward hooks. A copy is not known to any LoRAHandle (its scale could not
        # be switched or detached), so it gets an inert hook: the copied model computes its base output.
        return _InertBranch()


class _InertBranch:
    """What a ``LoRABranch`` becomes in a ``copy.deepcopy`` of its model: a hook that changes nothing."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        return None


def _fit_shapes(base: nn.Module, down: torch.Tensor, up: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the LoRA pair against the base module and reshape 1x1-conv <-> linear pairs; ``LoRAError`` on mismatch."""
    shapes = f"lora down {tuple(down.shape)}, up {tuple(up.shape)}"
    if isinstance(base, nn.Linear):
        if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):  # a 1x1-conv LoRA (SD1.x proj_in) on a Linear
            down, up = down.flatten(1), up.flatten(1)
        i, o = base.in_features, base.out_features
        want = f"Linear({i} -> {o}) wants down (r, {i}), up ({o}, r)"
        if down.ndim != 2 or down.shape[1] != base.in_features or up.shape[0] != base.out_features:
            raise LoRAError(f"LoRA shape mismatch at {where}: {shapes}; {want}")
        return down, up
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        if down.ndim == 2 and (kh, kw) == (1, 1):
            down, up = down[:, :, None, None], up[:, :, None, None]
        want = (
            f"Conv2d({base.in_channels} -> {base.out_channels}, kernel {kh}x{kw}) wants down "
            f"(r, {base.in_channels}, {kh}, {kw}), up ({base.out_channels}, r, 1, 1)"
        )
        if down.ndim != 4 or tuple(down.shape[1:]) != (base.in_channels, kh, kw) or up.shape[0] != base.out_channels:
            raise LoRAError(f"LoRA shape mismatch at {where}: {shapes}; {want}")
        return down, up
    raise LoRAError(f"LoRA target {where} is a {type(base).__name__}, not an nn.Linear or nn.Conv2d")
