"""The denoiser protocol shared by analytic toys and SDXL, model pairs, NFE counting and guidance wrappers.

A denoiser is any callable ``(x, t) -> eps``: ``x`` is a latent batch ``(B, ...)``, ``t`` an integer train
timestep, and the output has the shape of ``x`` (in the schedule's prediction type, epsilon for SDXL and the
toys). Conditioning (prompt, LoRA scale, CFG scale, mixture parameters) is bound inside the callable, so a
"weak" or "strong" model is simply another denoiser. Wrappers below return new denoisers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """``(x, t) -> eps`` with conditioning bound inside."""

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelPair:
    """A strong and a weak denoiser approximating the same data; ``eps_s - eps_w`` estimates what ``strong``
    still gets wrong (W2SD, Sec. 3)."""

    strong: Denoiser
    weak: Denoiser


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (model evaluations, NFE)."""

    def __init__(self, denoiser: Denoiser, name: str = "") -> None:
        self.denoiser = denoiser
        self.name = name
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.calls += 1
        return self.denoiser(x, t)


def nfe_of(denoiser: Denoiser) -> int:
    """Model evaluations one call of ``denoiser`` costs (1 unless it declares ``nfe_per_call``)."""
    return int(getattr(denoiser, "nfe_per_call", 1))


def _check_scale(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class ClassifierFreeGuidance:
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022).

    Scale 1 runs only the conditional denoiser and scale 0 only the unconditional one, so no evaluation is
    wasted (the published code runs both branches even at scale 1). Use :func:`classifier_free_guidance` to
    get the cheapest equivalent denoiser.
    """

    def __init__(self, cond: Denoiser, uncond: Denoiser, scale: float) -> None:
        self.cond, self.uncond = cond, uncond
        self.scale = _check_scale("guidance scale", scale)
        self.nfe_per_call = nfe_of(cond) + nfe_of(uncond)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        eps_u = self.uncond(x, t)
        eps_c = self.cond(x, t)
        return eps_u + self.scale * (eps_c - eps_u)


def classifier_free_guidance(cond: Denoiser, uncond: Denoiser, scale: float) -> Denoiser:
    """A CFG denoiser; scale 1 returns ``cond`` itself and scale 0 returns ``uncond`` itself."""
    scale = _check_scale("guidance scale", scale)
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond
    return ClassifierFreeGuidance(cond, uncond, scale)


class Autoguidance:
    """Difference guidance eps = eps_s + w (eps_s - eps_w) (Karras et al. 2024), the first-order equivalent of
    one W2SD reflection with w ~ 2 and the honest baseline at equal model evaluations."""

    def __init__(self, strong: Denoiser, weak: Denoiser, weight: float) -> None:
        self.strong, self.weak = strong, weak
        self.weight = _check_scale("autoguidance weight", weight)
        self.nfe_per_call = nfe_of(strong) + (nfe_of(weak) if self.weight != 0 else 0)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        eps_s = self.strong(x, t)
        if self.weight == 0:
            return eps_s
        eps_w = self.weak(x, t)
        return eps_s + self.weight * (eps_s - eps_w)


def autoguidance(pair: ModelPair, weight: float) -> Denoiser:
    """``eps_s + w (eps_s - eps_w)`` for a model pair; ``w = 0`` is the strong model alone."""
    return Autoguidance(pair.strong, pair.weak, weight)


def as_denoiser(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Denoiser:
    """Documentational identity: any ``(x, t) -> eps`` callable already is a denoiser."""
    return fn
