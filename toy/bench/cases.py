"""Benchmark cases: a real distribution, a strong/weak model pair and what W2SD is expected to do on it.

Analytic cases follow research/peers.md 6.4 and 7.2: shared components with weak weights 2 pi_s - pi_real (the
weak model's error is twice the strong one's, so Delta1 ~ Delta2 at every noise level), a covariance /
mean-contraction bias (the "blurry under-fit model"), a hierarchical tree with hundreds of components, a
guidance-gap pair (conditional CFG-guided vs unconditional: W2SD is Z-Sampling there), and negative controls.
The learned pair (small trained MLPs, :mod:`toy.learned`) is added by the suite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from w2sd.denoiser import ModelPair, classifier_free_guidance
from w2sd.schedule import NoiseSchedule

from ..cases import four_modes_2d, opposed_1d, opposed_2d, two_peaks_1d
from ..gmm import GaussianMixture

# What the benchmark expects of W2SD against plain strong sampling at equal NFE.
IMPROVE, NO_GAIN, OVERSHOOT, OPEN = "improve", "no gain (control)", "overshoot", "open question"
EXPECTATIONS = (IMPROVE, NO_GAIN, OVERSHOOT, OPEN)


@dataclass
class BenchCase:
    """One benchmark case.

    ``make_pair(schedule)`` returns the strong/weak :class:`ModelPair` (denoisers ``(x, t) -> eps``);
    ``real`` is the target distribution the metrics compare against. Mode metrics assign samples to the
    components of ``modes`` (default ``real``), optionally merged into ``groups`` (e.g. tree depth), and compare
    with ``target_weights`` (default: the real weights, summed per group).
    """

    name: str
    description: str
    real: GaussianMixture
    make_pair: Callable[[NoiseSchedule], ModelPair]
    expect: str
    primary: str                                    # the metric the verdicts are stated on (lower is better)
    strong_gmm: GaussianMixture | None = None       # analytic strong/weak models, when they are mixtures
    weak_gmm: GaussianMixture | None = None
    modes: GaussianMixture | None = None
    groups: torch.Tensor | None = None              # (K,) group index of each component of ``modes``
    target_weights: torch.Tensor | None = None      # (G,) target mass per group
    per_mode: bool = True                           # report per-mode mean / covariance errors
    n_scale: float = 1.0                            # samples per seed relative to the preset's n
    light: bool = False                             # run the reduced method set (expensive denoisers)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.expect not in EXPECTATIONS:
            raise ValueError(f"expect must be one of {EXPECTATIONS}, got {self.expect!r}")

    @property
    def dim(self) -> int:
        return self.real.dim

    @property
    def control(self) -> bool:
        return self.expect == NO_GAIN

    def mode_model(self) -> GaussianMixture:
        return self.modes if self.modes is not None else self.real

    def group_index(self) -> torch.Tensor:
        k = self.mode_model().num_components
        return self.groups if self.groups is not None else torch.arange(k)

    def group_targets(self) -> torch.Tensor:
        if self.target_weights is not None:
            return self.target_weights.to(torch.float64)
        g = self.group_index()
        return torch.zeros(int(g.max()) + 1, dtype=torch.float64).index_add_(0, g, self.mode_model().weights)


def _gmm_pair(strong: GaussianMixture, weak: GaussianMixture) -> Callable[[NoiseSchedule], ModelPair]:
    def make(schedule: NoiseSchedule) -> ModelPair:
        s = strong.denoiser(schedule)
        return ModelPair(s, s if weak is strong else weak.denoiser(schedule))
    return make


def _analytic(name: str, description: str, real, strong, weak, expect: str, primary: str, **kw) -> BenchCase:
    return BenchCase(name, description, real, _gmm_pair(strong, weak), expect, primary, strong_gmm=strong,
                     weak_gmm=weak, **kw)


# ---------------------------------------------------------------------------------------------- 1-D
def aligned_1d() -> BenchCase:
    c = two_peaks_1d(strong_left=0.40, weak_left=0.30)
    return _analytic("1d_aligned", "1-D peaks at -4/+4 (real 0.5/0.5); strong left 0.40, weak left 0.30 = 2s - real",
                     c.real, c.strong, c.weak, IMPROVE, "w2")


def too_weak_1d() -> BenchCase:
    c = two_peaks_1d(strong_left=0.45, weak_left=0.25)
    return _analytic("1d_weak_too_weak", "1-D peaks at -4/+4; strong left 0.45, weak left 0.25: Delta1 = 4 x Delta2 "
                     "(weak far too weak)", c.real, c.strong, c.weak, OVERSHOOT, "w2")


# ---------------------------------------------------------------------------------------------- 2-D
def four_modes() -> BenchCase:
    c = four_modes_2d(strong_bl=0.15, weak_bl=0.05)
    return _analytic("2d_four_modes", "2-D modes at (+-4, +-4), std 1 (real 0.25 each); bottom-left strong 0.15, "
                     "weak 0.05 = 2s - real", c.real, c.strong, c.weak, IMPROVE, "sliced_w2")


def ring8(radius: float = 4.0, std: float = 0.3, bias: float = 0.05) -> BenchCase:
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    sign = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    real = GaussianMixture(torch.full((8,), 1 / 8), means, stds=[std] * 8)
    strong = GaussianMixture(1 / 8 + bias * sign, means, stds=[std] * 8)
    weak = GaussianMixture(1 / 8 + 2 * bias * sign, means, stds=[std] * 8)
    return _analytic("2d_ring8", f"2-D ring of 8 (radius {radius:g}, std {std:g}, real uniform); strong 1/8 +- {bias:g} "
                     f"alternating, weak 1/8 +- {2 * bias:g} = 2s - real", real, strong, weak, IMPROVE, "sliced_w2")


def blurry(a: float = 0.15, contraction: float = 0.10) -> BenchCase:
    """The under-fit model: Sigma_s = Sigma + aI, mu_s = (1-c) mu; weak doubles both perturbations."""
    means = torch.tensor([[-3.0, -3.0], [-3.0, 3.0], [3.0, -3.0], [3.0, 3.0]], dtype=torch.float64)
    angles = torch.tensor([0.3, 1.2, 2.0, 2.8], dtype=torch.float64)
    rot = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)], -2)
    lam = torch.diag(torch.tensor([0.8**2, 0.2**2], dtype=torch.float64))
    covs = rot @ lam @ rot.transpose(-1, -2)
    eye = torch.eye(2, dtype=torch.float64)
    w = torch.full((4,), 0.25)
    real = GaussianMixture(w, means, covs=covs)
    strong = GaussianMixture(w, (1 - contraction) * means, covs=covs + a * eye)
    weak = GaussianMixture(w, (1 - 2 * contraction) * means, covs=covs + 2 * a * eye)
    return _analytic("2d_blurry", f"2-D four elongated modes; strong Sigma + {a:g} I with means contracted "
                     f"{contraction:.0%}, weak Sigma + {2 * a:g} I contracted {2 * contraction:.0%}",
                     real, strong, weak, IMPROVE, "sliced_w2")


def tree_components(max_depth: int = 4, per_branch: int = 4, seed: int = 7):
    """A deterministic 2-D branching tree of thin elongated Gaussians (in the spirit of EDM2's toy, own
    construction): each branch splits in two with random angle jitter, branch length and thickness shrink with
    depth, ``per_branch`` components sit along each segment. Returns (weights, means, covs, depth) with the
    data centred and scaled to unit per-axis standard deviation."""
    rnd = np.random.RandomState(seed)
    mus, covs, ws, depths = [], [], [], []

    def grow(depth: int, pos: np.ndarray, angle: float) -> None:
        if depth > max_depth:
            return
        direction = np.array([math.cos(angle), math.sin(angle)])
        length = 0.3 * 0.8**depth * (1 + 0.2 * rnd.randn())
        thick = 0.012 * 0.8**depth
        along = 0.35 * length / per_branch * 2
        outer = np.outer(direction, direction)
        cov = outer * along**2 + (np.eye(2) - outer) * thick**2
        for u in np.linspace(0.5 / per_branch, 1 - 0.5 / per_branch, per_branch):
            mus.append(pos + direction * length * u)
            covs.append(cov)
            ws.append(length * 0.5**depth)
            depths.append(depth)
        for sign in (1.0, -1.0):
            grow(depth + 1, pos + direction * length, angle + sign * 0.6 * 0.8**depth * (1 + 0.2 * rnd.randn()))

    grow(0, np.zeros(2), math.pi / 2)
    grow(0, np.zeros(2), -math.pi / 2 + 0.3)
    w = np.asarray(ws) / np.sum(ws)
    mu, cov = np.asarray(mus), np.asarray(covs)
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu - mean, mu - mean))
    scale = 1.0 / np.sqrt(np.diag(second))
    mu = (mu - mean) * scale
    cov = cov * np.outer(scale, scale)
    return (torch.tensor(w), torch.tensor(mu), torch.tensor(cov), torch.tensor(depths, dtype=torch.int64))


def tree(factor: float = 0.85, max_depth: int = 4, per_branch: int = 4) -> BenchCase:
    """Hierarchical mixture; the strong model under-weights deep branches (weights x factor^depth)."""
    w, mu, cov, depth = tree_components(max_depth, per_branch)
    real = GaussianMixture(w, mu, covs=cov)
    ws = w * factor ** depth.to(torch.float64)
    ws = ws / ws.sum()
    ww = 2 * ws - w
    if not bool((ww > 0).all()):
        raise ValueError(f"tree factor {factor} makes weak weights 2 pi_s - pi_real negative")
    strong = GaussianMixture(ws, mu, covs=cov)
    weak = GaussianMixture(ww / ww.sum(), mu, covs=cov)
    k = real.num_components
    return _analytic("2d_tree", f"2-D hierarchical tree, {k} thin components, depth 0..{max_depth}; strong weights "
                     f"x {factor:g}^depth, weak = 2s - real; mode metric = mass per depth level",
                     real, strong, weak, IMPROVE, "mode_tv", groups=depth, per_mode=False, n_scale=0.3, light=True,
                     meta={"components": k})


def guidance_gap(scale: float = 1.5, leak: float = 0.2, std: float = 1.0) -> BenchCase:
    """Z-Sampling as a W2SD special case: strong = CFG(scale) of a leaky conditional model vs the unconditional
    one, weak = unconditional. The real distribution is the class (the two left modes)."""
    means = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]], dtype=torch.float64)
    uncond = GaussianMixture([0.25] * 4, means, stds=[std] * 4)
    cond_model = GaussianMixture([(1 - leak) / 2] * 2 + [leak / 2] * 2, means, stds=[std] * 4)
    real = GaussianMixture([0.5, 0.5], means[:2], stds=[std] * 2)

    def make(schedule: NoiseSchedule) -> ModelPair:
        u = uncond.denoiser(schedule)
        return ModelPair(classifier_free_guidance(cond_model.denoiser(schedule), u, scale), u)

    return BenchCase("2d_guidance_gap", f"2-D class = left two modes; conditional model leaks {leak:.0%} to the right "
                     f"modes; strong = CFG {scale:g} vs unconditional, weak = unconditional (W2SD = Z-Sampling); "
                     "mode metric over all four modes (target 0 on the right)", real, make, IMPROVE, "mode_tv",
                     modes=uncond, target_weights=torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64),
                     meta={"cfg_scale": scale})


# ---------------------------------------------------------------------------------------------- controls
def equal_control() -> BenchCase:
    c = two_peaks_1d(strong_left=0.40, weak_left=0.40)
    return _analytic("ctrl_1d_weak_eq_strong", "control: 1-D peaks, weak == strong (left 0.40)", c.real, c.strong,
                     c.strong, NO_GAIN, "w2")


def swapped_control() -> BenchCase:
    c = four_modes_2d(strong_bl=0.05, weak_bl=0.15)
    return _analytic("ctrl_2d_swapped", "control: 2-D four modes with roles swapped (strong BL 0.05, weak BL 0.15)",
                     c.real, c.strong, c.weak, NO_GAIN, "sliced_w2")


def opposed_control_1d() -> BenchCase:
    c = opposed_1d()
    return _analytic("ctrl_1d_opposed", c.description, c.real, c.strong, c.weak, NO_GAIN, "w2")


def opposed_control_2d() -> BenchCase:
    c = opposed_2d()
    return _analytic("ctrl_2d_opposed", c.description, c.real, c.strong, c.weak, NO_GAIN, "sliced_w2")


def analytic_cases() -> list[BenchCase]:
    """Every analytic case, in report order."""
    return [aligned_1d(), too_weak_1d(), four_modes(), ring8(), blurry(), tree(), guidance_gap(),
            equal_control(), swapped_control(), opposed_control_1d(), opposed_control_2d()]
