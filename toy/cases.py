"""Built-in toy cases: a real mixture and a strong/weak pair made by biasing its mixture weights.

The construction follows research/peers.md 6.4: with shared components and weights
pi_w = 2 pi_s - pi_real, the weak model's error is twice the strong one's and points the same way, so the
weak-to-strong difference equals the strong-to-real gap to first order (Delta1 ~ Delta2), at every noise level.
Negative controls break that alignment (opposed biases) and W2SD must not help there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gmm import GaussianMixture


@dataclass(frozen=True)
class ToyCase:
    name: str
    real: GaussianMixture
    strong: GaussianMixture
    weak: GaussianMixture
    description: str
    control: bool = False  # a negative control: W2SD is expected not to help

    @property
    def dim(self) -> int:
        return self.real.dim


def _with_weights(gmm: GaussianMixture, weights) -> GaussianMixture:
    if gmm.isotropic:
        return GaussianMixture(weights, gmm.means, stds=gmm.stds)
    return GaussianMixture(weights, gmm.means, covs=gmm.covs)


def two_peaks_1d(strong_left: float = 0.40, weak_left: float = 0.30, std: float = 0.8) -> ToyCase:
    """Paper Fig. 1/4: peaks at -4 and +4 with equal weight; both models under-weight the left peak."""
    real = GaussianMixture([0.5, 0.5], [[-4.0], [4.0]], stds=[std, std])
    return ToyCase(
        name="1d_two_peaks",
        real=real,
        strong=_with_weights(real, [strong_left, 1 - strong_left]),
        weak=_with_weights(real, [weak_left, 1 - weak_left]),
        description=f"1-D peaks at -4/+4 (real 0.5/0.5); strong left {strong_left}, weak left {weak_left}",
    )


def four_modes_2d(strong_bl: float = 0.15, weak_bl: float = 0.05, std: float = 1.0) -> ToyCase:
    """Paper Fig. 5: four modes at (+-4, +-4); both models under-weight the bottom-left mode."""
    means = [[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]]
    real = GaussianMixture([0.25] * 4, means, stds=[std] * 4)

    def biased(bl: float) -> list[float]:
        rest = (1 - bl) / 3
        return [bl, rest, rest, rest]

    return ToyCase(
        name="2d_four_modes",
        real=real,
        strong=_with_weights(real, biased(strong_bl)),
        weak=_with_weights(real, biased(weak_bl)),
        description=f"2-D modes at (+-4, +-4) (real 0.25 each); bottom-left weight strong {strong_bl}, weak {weak_bl}",
    )


def opposed_1d() -> ToyCase:
    """Negative control: the weak model errs the other way (left peak over-weighted)."""
    case = two_peaks_1d(strong_left=0.40, weak_left=0.60)
    return ToyCase("1d_opposed_control", case.real, case.strong, case.weak,
                   "1-D control: strong left 0.40, weak left 0.60 (biases opposed)", control=True)


def opposed_2d() -> ToyCase:
    """Negative control in 2-D: the weak model over-weights the mode the strong one under-weights."""
    case = four_modes_2d(strong_bl=0.15, weak_bl=0.35)
    return ToyCase("2d_opposed_control", case.real, case.strong, case.weak,
                   "2-D control: bottom-left strong 0.15, weak 0.35 (biases opposed)", control=True)


def builtin_cases() -> list[ToyCase]:
    """The cases ``w2sd toy`` runs with no arguments."""
    return [two_peaks_1d(), four_modes_2d(), opposed_1d(), opposed_2d()]
