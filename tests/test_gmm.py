"""Analytic Gaussian mixtures: exact score/eps against autograd, p_t against Monte Carlo noising of p_0.

No oracle library: the references are torch.autograd (float64) and scipy.stats.kstest on seeded samples.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import ndtr

from toy.gmm import GaussianMixture
from w2sd import NoiseSchedule

AUTOGRAD_TOL = 1e-10    # float64 closed form vs autograd of the log-sum-exp density
KS_MIN_PVALUE = 1e-3    # seeded samples (fixed seeds below), so this cannot flake


def _mixtures():
    iso = GaussianMixture([0.2, 0.3, 0.5], [[4.0, 4.0], [-4.0, 4.0], [0.0, -1.0]], stds=[0.5, 1.0, 2.0])
    covs = torch.tensor([[[1.0, 0.6], [0.6, 0.8]], [[0.3, -0.1], [-0.1, 2.0]], [[1.5, 0.0], [0.0, 0.2]]],
                        dtype=torch.float64)
    full = GaussianMixture([0.2, 0.3, 0.5], [[4.0, 4.0], [-4.0, 4.0], [0.0, -1.0]], covs=covs)
    shared = GaussianMixture([0.25] * 4, [[4, 4], [-4, 4], [4, -4], [-4, -4]], stds=[1.0] * 4)
    return {"isotropic": iso, "full": full, "shared_var": shared}


@pytest.mark.parametrize("kind", ["isotropic", "full", "shared_var"])
@pytest.mark.parametrize("alpha_bar", [1.0, 0.9, 0.3, 0.0047])
def test_score_and_eps_equal_autograd(kind, alpha_bar):
    gmm = _mixtures()[kind]
    x = (3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_()
    grad, = torch.autograd.grad(gmm.log_prob(x, alpha_bar).sum(), x)
    assert (gmm.score(x, alpha_bar) - grad).abs().max() <= AUTOGRAD_TOL
    if alpha_bar < 1:
        assert (gmm.eps(x, alpha_bar) + math.sqrt(1 - alpha_bar) * grad).abs().max() <= AUTOGRAD_TOL


def test_log_prob_far_in_the_tails_is_finite():
    gmm = _mixtures()["isotropic"]
    x = torch.tensor([[1e3, -1e3], [50.0, 50.0]], dtype=torch.float64)
    assert torch.isfinite(gmm.log_prob(x)).all() and torch.isfinite(gmm.score(x)).all()


def test_one_dimensional_marginal_matches_monte_carlo_noising():
    """Noise exact p_0 samples to level ab; the analytic p_t CDF must pass a KS test."""
    gmm = GaussianMixture([0.3, 0.7], [[-4.0], [4.0]], stds=[0.8, 0.5])
    s = NoiseSchedule.sdxl()
    g = torch.Generator().manual_seed(1)
    for t in (100, 500, 900):
        ab = s.alpha_bar(t)
        x0 = gmm.sample(20_000, g)
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        mu = math.sqrt(ab) * gmm.means[:, 0].numpy()
        sd = np.sqrt(ab * gmm.covs[:, 0, 0].numpy() + 1 - ab)
        w = gmm.weights.numpy()
        cdf = lambda v: (w * ndtr((np.asarray(v)[:, None] - mu) / sd)).sum(-1)  # noqa: E731
        assert stats.kstest(xt[:, 0].numpy(), cdf).pvalue > KS_MIN_PVALUE, f"t={t}"


def test_two_dimensional_marginal_moments_match_monte_carlo():
    gmm = _mixtures()["full"]
    ab = 0.4
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(200_000, g)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # E[log p_t(x_t)] under exact p_t samples vs under the noised samples: the same number up to MC error.
    exact = gmm.log_prob(torch.cat([math.sqrt(ab) * gmm.sample(200_000, g) +
                                    math.sqrt(1 - ab) * torch.randn(200_000, 2, generator=g, dtype=torch.float64)]), ab)
    assert abs(float(gmm.log_prob(xt, ab).mean() - exact.mean())) < 0.02
    mean_t = math.sqrt(ab) * (gmm.weights[:, None] * gmm.means).sum(0)
    assert (xt.mean(0) - mean_t).abs().max() < 0.03


def test_sample_weights_and_assignment():
    gmm = _mixtures()["shared_var"]
    x, labels = gmm.sample(40_000, torch.Generator().manual_seed(3), return_labels=True)
    freq = torch.bincount(labels, minlength=4) / 40_000.0
    assert (freq - 0.25).abs().max() < 0.01
    assert (gmm.assign(x) == labels).double().mean() > 0.99


@pytest.mark.parametrize("bad,match", [
    (dict(weights=[0.5, 0.6], means=[[0.0], [1.0]], stds=[1, 1]), "sum to 1"),
    (dict(weights=[1.0, 0.0], means=[[0.0], [1.0]], stds=[1, 1]), "positive"),
    (dict(weights=[0.5, 0.5], means=[[0.0], [1.0]], stds=[1, -1]), "stds must be positive"),
    (dict(weights=[0.5, 0.5], means=[[0.0, 1.0]], stds=[1, 1]), "means must have shape"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
])
def test_invalid_mixtures_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**bad)


def test_gmm_is_a_denoiser():
    gmm = _mixtures()["isotropic"]
    s = NoiseSchedule.sdxl()
    den = gmm.denoiser(s)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(den(x, 500), gmm.eps(x, s.alpha_bar(500)))
