"""Benchmark metrics on top of :mod:`toy.metrics`: grouped mode-weight TV, per-mode mean / covariance error,
off-target mass, plus the shared W2 (1-D quantiles), sliced W2, mean log-likelihood and off-manifold fraction."""

from __future__ import annotations

import math

import torch

from ..metrics import SlicedW2, mean_log_likelihood, off_manifold_fraction, wasserstein_1d
from .cases import BenchCase

MIN_MODE_SAMPLES = 10  # a mode enters the per-mode errors only with at least this many samples

METRIC_LABELS = {
    "mode_tv": "mode TV", "mean_err": "mode mean err", "cov_err": "mode cov err", "w2": "W2",
    "sliced_w2": "sliced W2", "loglik": "mean loglik", "off_manifold": "off-manifold", "off_target": "off-target mass",
}


def case_metrics(samples: torch.Tensor, case: BenchCase, reference: SlicedW2 | None, threshold: float
                 ) -> dict[str, float]:
    """All metrics of ``case`` for one sample set (N, d); lower is better except ``loglik``."""
    x = samples.to(torch.float64)
    modes = case.mode_model()
    comp = modes.assign(x)                                        # (N,)
    groups = case.group_index()[comp]
    target = case.group_targets()
    hist = torch.bincount(groups, minlength=target.shape[0]).to(torch.float64) / x.shape[0]
    out: dict[str, float] = {"mode_tv": 0.5 * float((hist - target).abs().sum())}
    if bool((target == 0).any()):
        out["off_target"] = float(hist[target == 0].sum())
    if case.per_mode:
        out.update(_per_mode_errors(x, comp, modes, case))
    if case.dim == 1:
        out["w2"] = wasserstein_1d(x, case.real, p=2)
    elif reference is not None:
        out["sliced_w2"] = reference(x)
    out["loglik"] = mean_log_likelihood(x, case.real)
    out["off_manifold"] = off_manifold_fraction(x, case.real, threshold)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _per_mode_errors(x: torch.Tensor, comp: torch.Tensor, modes, case: BenchCase) -> dict[str, float]:
    """Target-weighted mean over modes of |mean^ - mu_k| and ||cov^ - Sigma_k||_F (assigned samples)."""
    weights = case.group_targets()[case.group_index()]
    mean_err = cov_err = total = 0.0
    for k in range(modes.num_components):
        sel = x[comp == k]
        if weights[k] <= 0 or sel.shape[0] < MIN_MODE_SAMPLES:
            continue
        w = float(weights[k])
        mean_err += w * float((sel.mean(0) - modes.means[k]).norm())
        c = torch.atleast_2d(torch.cov(sel.T))
        cov_err += w * float((c - modes.covs[k]).norm())
        total += w
    if total == 0:
        return {}
    return {"mean_err": mean_err / total, "cov_err": cov_err / total}
