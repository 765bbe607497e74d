"""Distances between sampler output and a known real distribution (research/peers.md 6.5).

- mode-weight total variation: samples assigned to the real model's most likely component, TV = 1/2 sum |pi^ - pi|
- 1-D W1 and W2 against the analytic quantile function (W1 is scipy's ``wasserstein_distance``; W2 is the L2
  distance between quantile functions, which scipy does not compute)
- 2-D (any d) sliced W2 against exact samples of the real model, over fixed seeded directions
- mean log-likelihood under the real model, and the off-manifold fraction (log p below the level that holds 99%
  of real mass)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtr

from .gmm import GaussianMixture


def mode_weights(samples: torch.Tensor, real: GaussianMixture) -> torch.Tensor:
    """Fraction of samples assigned to each real component, shape (K,)."""
    labels = real.assign(samples.to(torch.float64))
    return torch.bincount(labels, minlength=real.num_components).to(torch.float64) / samples.shape[0]


def mode_weight_tv(samples: torch.Tensor, real: GaussianMixture) -> float:
    """Total variation between the empirical mode weights and the real mixture weights."""
    return 0.5 * float((mode_weights(samples, real) - real.weights).abs().sum())


def mixture_quantiles(gmm: GaussianMixture, q: np.ndarray, iters: int = 80) -> np.ndarray:
    """Quantile function of a 1-D mixture at levels ``q`` (vectorised bisection on the CDF)."""
    if gmm.dim != 1:
        raise ValueError(f"quantiles need a 1-D mixture, got d = {gmm.dim}")
    w = gmm.weights.numpy()
    mu = gmm.means[:, 0].numpy()
    sd = np.sqrt(gmm.covs[:, 0, 0].numpy())
    lo = np.full_like(q, (mu - 12 * sd).min(), dtype=np.float64)
    hi = np.full_like(q, (mu + 12 * sd).max(), dtype=np.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cdf = (w * ndtr((mid[:, None] - mu) / sd)).sum(-1)
        below = cdf < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def wasserstein_1d(samples: torch.Tensor, real: GaussianMixture, p: int = 2) -> float:
    """W_p (p = 1 or 2) between 1-D samples and the analytic mixture, via quantiles at (i - 1/2) / n."""
    x = np.sort(samples.reshape(-1).to(torch.float64).numpy())
    q = (np.arange(x.shape[0]) + 0.5) / x.shape[0]
    ref = mixture_quantiles(real, q)
    if p == 1:
        return float(np.abs(x - ref).mean())
    if p == 2:
        return float(np.sqrt(((x - ref) ** 2).mean()))
    raise ValueError(f"p must be 1 or 2, got {p}")


def _sorted_projections(x: torch.Tensor, num_projections: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    # (P, N) layout: sorting along the contiguous last dimension is far faster than along dim 0
    return torch.sort((dirs.T @ x.to(torch.float64).T).contiguous(), dim=-1).values


class SlicedW2:
    """Sliced W2 against a fixed reference cloud whose sorted projections are computed once."""

    def __init__(self, reference: torch.Tensor, num_projections: int = 128, seed: int = 0) -> None:
        self.shape, self.num_projections, self.seed = tuple(reference.shape), num_projections, seed
        self.ref = _sorted_projections(reference, num_projections, seed)

    def __call__(self, samples: torch.Tensor) -> float:
        if tuple(samples.shape) != self.shape:
            raise ValueError(f"sliced W2 needs point clouds of equal shape, got {tuple(samples.shape)} and {self.shape}")
        pa = _sorted_projections(samples, self.num_projections, self.seed)
        return float(((pa - self.ref) ** 2).mean().sqrt())


def sliced_w2(a: torch.Tensor, b: torch.Tensor, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced W2 between two equal-size point clouds (N, d) over fixed random unit directions."""
    return SlicedW2(b, num_projections, seed)(a)


def mean_log_likelihood(samples: torch.Tensor, real: GaussianMixture) -> float:
    return float(real.log_prob(samples.to(torch.float64)).mean())


def off_manifold_threshold(real: GaussianMixture, n: int = 100_000, mass: float = 0.99, seed: int = 0) -> float:
    """The log-density level above which ``mass`` of the real distribution lies (Monte Carlo)."""
    ref = real.sample(n, torch.Generator().manual_seed(seed))
    return float(torch.quantile(real.log_prob(ref), 1.0 - mass))


def off_manifold_fraction(samples: torch.Tensor, real: GaussianMixture, threshold: float) -> float:
    return float((real.log_prob(samples.to(torch.float64)) < threshold).to(torch.float64).mean())


def evaluate(samples: torch.Tensor, real: GaussianMixture, reference: "torch.Tensor | SlicedW2 | None" = None,
             off_threshold: float | None = None) -> dict[str, float]:
    """All metrics that apply to the dimension of ``samples``: lower is better except ``loglik``.

    ``reference``: exact samples of the real model (or a prepared :class:`SlicedW2`) for the sliced W2 (d > 1).
    """
    out = {"mode_tv": mode_weight_tv(samples, real), "loglik": mean_log_likelihood(samples, real)}
    if real.dim == 1:
        out["w1"] = wasserstein_1d(samples, real, p=1)
        out["w2"] = wasserstein_1d(samples, real, p=2)
    elif reference is not None:
        out["sliced_w2"] = reference(samples) if isinstance(reference, SlicedW2) else sliced_w2(samples, reference)
    if off_threshold is not None:
        out["off_manifold"] = off_manifold_fraction(samples, real, off_threshold)
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite metric: {out}")
    return out
