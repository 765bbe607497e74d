"""Analytic Gaussian mixtures under the variance-preserving forward process.

For p_0 = sum_k w_k N(mu_k, S_k) and x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps,

    p_t = sum_k w_k N(sqrt(ab) mu_k, ab S_k + (1 - ab) I)                                  (closed form)
    grad log p_t(x) = -sum_k r_k(x) C_k^{-1} (x - m_k),   r_k = softmax_k(log w_k + log N(x; m_k, C_k))
    eps(x, t)       = -sqrt(1 - ab) grad log p_t(x)                                        (Tweedie)

Responsibilities use log-sum-exp, so float64 is exact far in the tails. Isotropic mixtures (S_k = s_k^2 I) take a
fast path (one (N, d) x (d, K) matmul); full covariances use per-component Cholesky factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from w2sd.schedule import NoiseSchedule

# Full-covariance mixtures with more components than this use the matrix-product path in float64 (same values
# to ~1e-13 relative, faster than the per-component einsum, several times so with hundreds of components).
FULL_COV_EXPANSION_MIN_K = 0


@dataclass(frozen=True)
class _Noised:
    """Parameters of p_t in a given dtype/device."""

    log_w: torch.Tensor            # (K,)
    means: torch.Tensor            # (K, d)
    var: torch.Tensor | None       # (K,) isotropic variances, or None
    prec: torch.Tensor | None      # (K, d, d) precision matrices (full covariance), or None
    logdet: torch.Tensor           # (K,) log det of the covariance


class GaussianMixture:
    """A Gaussian mixture in d dimensions, isotropic (``stds``) or with full covariances (``covs``).

    Args:
        weights: (K,) positive, summing to 1.
        means: (K, d).
        stds: (K,) positive component standard deviations (isotropic), or
        covs: (K, d, d) symmetric positive definite covariances.
    Parameters are stored in float64; computations run in the dtype of the query points.
    """

    def __init__(self, weights, means, stds=None, covs=None) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu[:, None]
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must have shape (K, d) with K = {w.shape[0]} weights, got {tuple(mu.shape)}")
        if not torch.all(w > 0) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds (isotropic) or covs (full covariance)")
        K, d = mu.shape
        self.weights, self.means = w / w.sum(), mu
        if stds is not None:
            s = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
            if s.shape[0] != K:
                raise ValueError(f"stds must have K = {K} entries, got {s.shape[0]}")
            if not torch.all(s > 0):
                raise ValueError(f"stds must be positive, got {s.tolist()}")
            self.stds: torch.Tensor | None = s
            self.covs = (s**2)[:, None, None] * torch.eye(d, dtype=torch.float64)
        else:
            c = torch.as_tensor(covs, dtype=torch.float64)
            if c.shape != (K, d, d):
                raise ValueError(f"covs must have shape (K, d, d) = ({K}, {d}, {d}), got {tuple(c.shape)}")
            if not torch.allclose(c, c.transpose(-1, -2), atol=1e-10):
                raise ValueError("covs must be symmetric")
            if not torch.all(torch.linalg.eigvalsh(c) > 0):
                raise ValueError("covs must be positive definite")
            self.stds = None
            self.covs = c
        self._cache: dict[tuple, _Noised] = {}

    # ------------------------------------------------------------------ basic properties
    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def isotropic(self) -> bool:
        return self.stds is not None

    def __repr__(self) -> str:
        kind = "isotropic" if self.isotropic else "full-covariance"
        return f"GaussianMixture(K={self.num_components}, d={self.dim}, {kind})"

    # ------------------------------------------------------------------ p_t
    def _noised(self, alpha_bar: float, dtype: torch.dtype, device: torch.device) -> _Noised:
        key = (float(alpha_bar), dtype, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        a = float(alpha_bar)
        means = math.sqrt(a) * self.means
        d = self.dim
        if self.isotropic:
            var = a * self.stds**2 + (1.0 - a)  # (K,)
            noised = _Noised(self.weights.log(), means, var, None, d * var.log())
        else:
            cov = a * self.covs + (1.0 - a) * torch.eye(d, dtype=torch.float64)
            chol = torch.linalg.cholesky(cov)
            prec = torch.cholesky_inverse(chol)
            logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
            noised = _Noised(self.weights.log(), means, None, prec, logdet)
        conv = lambda v: None if v is None else v.to(dtype=dtype, device=device)  # noqa: E731
        noised = _Noised(conv(noised.log_w), conv(noised.means), conv(noised.var), conv(noised.prec),
                         conv(noised.logdet))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = noised
        return noised

    def _logits_and_grads(self, x: torch.Tensor, alpha_bar: float, need_score: bool):
        """Per-component log w_k + log N_k(x), shape (N, K) (None when only the score was needed on the shared
        variance fast path), and optionally the mixture score (N, d)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}), got {tuple(x.shape)}")
        p = self._noised(alpha_bar, x.dtype, x.device)
        d = self.dim
        if p.var is not None:
            return self._isotropic(x, p, need_score)
        if x.dtype == torch.float64 and p.means.shape[0] > FULL_COV_EXPANSION_MIN_K:
            return self._full_expanded(x, p, need_score)
        diff = x[:, None, :] - p.means[None]                          # (N, K, d)
        pd = torch.einsum("kij,nkj->nki", p.prec, diff)                # (N, K, d) = C^-1 (x - m)
        maha = (diff * pd).sum(-1)                                     # (N, K)
        logits = p.log_w - 0.5 * maha - 0.5 * (p.logdet + d * math.log(2 * math.pi))
        if not need_score:
            return logits, None
        r = torch.softmax(logits, dim=-1)
        score = -(r[..., None] * pd).sum(1)
        return logits, score

    @staticmethod
    def _full_expanded(x: torch.Tensor, p: _Noised, need_score: bool):
        """Full-covariance path for many components as matrix products (float64 only: the expansion
        (x-m)^T P (x-m) = x^T P x - 2 (P m)^T x + m^T P m cancels in float32 far from the means).

        Score: -sum_k r_k P_k (x - m_k) = -(sum_k r_k P_k) x + sum_k r_k P_k m_k.
        """
        n, d = x.shape
        k = p.means.shape[0]
        prec = p.prec.reshape(k, d * d)                                # (K, d*d)
        pm = torch.einsum("kij,kj->ki", p.prec, p.means)               # (K, d) = P_k m_k
        c = p.log_w - 0.5 * (p.means * pm).sum(-1) - 0.5 * (p.logdet + d * math.log(2 * math.pi))  # (K,)
        xx = (x[:, :, None] * x[:, None, :]).reshape(n, d * d)         # (N, d*d)
        logits = torch.addmm(c, x, pm.T) - 0.5 * (xx @ prec.T)         # (N, K)
        if not need_score:
            return logits, None
        r = torch.softmax(logits, dim=-1)                              # (N, K)
        score = r @ pm - torch.bmm((r @ prec).reshape(n, d, d), x[:, :, None])[..., 0]
        return logits, score

    @staticmethod
    def _isotropic(x: torch.Tensor, p: _Noised, need_score: bool):
        """Isotropic fast path in a (K, N) layout (reductions over K are then contiguous row operations).

        log N(x; m_k, v_k I) + log w_k = x.m_k / v_k - |x|^2 / (2 v_k) + c_k,   c_k = log w_k - |m_k|^2/(2 v_k) - d/2 log(2 pi v_k)
        score(x) = sum_k r_k (m_k - x) / v_k.  When all v_k are equal the |x|^2 term is common to every k and
        cancels in the responsibilities r_k, and score = (sum_k r_k m_k - x) / v.
        """
        d = x.shape[1]
        var = p.var
        c = p.log_w - 0.5 * (p.means * p.means).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)  # (K,)
        xT = x.T                                                           # (d, N) view
        logits = torch.addmm(c[:, None], p.means / var[:, None], xT)       # (K, N)
        shared_var = bool((var == var[0]).all())
        if not (shared_var and need_score):
            logits -= (0.5 / var)[:, None] * (x * x).sum(-1)[None]
        if not need_score:
            return logits.T, None
        logits -= logits.amax(0)
        logits.exp_()                                                      # unnormalised r_k, (K, N)
        denom = logits.sum(0)                                              # (N,)
        if shared_var:
            score = p.means.T @ logits                                     # (d, N) = sum_k r_k m_k * denom
            score /= denom
            score -= xT
            score /= var[0]
        else:
            r_over_v = logits / var[:, None]
            score = p.means.T @ r_over_v - xT * r_over_v.sum(0)
            score /= denom
        return None, score.T                                               # (N, d)

    def log_prob(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """log p_t(x), shape (N,); ``alpha_bar = 1`` is the clean mixture p_0."""
        logits, _ = self._logits_and_grads(x, alpha_bar, need_score=False)
        return torch.logsumexp(logits, dim=-1)

    def score(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """grad_x log p_t(x), shape (N, d)."""
        return self._logits_and_grads(x, alpha_bar, need_score=True)[1]

    def eps(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The exact noise prediction E[eps | x_t = x] = -sqrt(1 - ab) grad log p_t(x), shape (N, d)."""
        return -math.sqrt(1.0 - float(alpha_bar)) * self.score(x, alpha_bar)

    def responsibilities(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """Posterior component probabilities r_k(x), shape (N, K)."""
        logits, _ = self._logits_and_grads(x, alpha_bar, need_score=False)
        return torch.softmax(logits, dim=-1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely component of each clean point, shape (N,) int64."""
        return self.responsibilities(x).argmax(-1)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               return_labels: bool = False):
        """Exact samples of p_0, shape (n, d) (and component labels (n,) with ``return_labels``)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        if self.isotropic:
            x = self.means[labels] + self.stds[labels, None] * z
        else:
            chol = torch.linalg.cholesky(self.covs)
            x = self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], z)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    def denoiser(self, schedule: NoiseSchedule) -> "GMMDenoiser":
        """This mixture as a denoiser ``(x, t) -> eps`` under ``schedule``."""
        return GMMDenoiser(self, schedule)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        out = {"weights": self.weights.tolist(), "means": self.means.tolist()}
        if self.isotropic:
            out["stds"] = self.stds.tolist()
        else:
            out["covs"] = self.covs.tolist()
        return out


class GMMDenoiser:
    """The exact denoiser of a :class:`GaussianMixture`: ``(x, t) -> eps`` for x of shape (N, d)."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.gmm, self.schedule = gmm, schedule

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.gmm.eps(x, self.schedule.alpha_bar(t))

    def __repr__(self) -> str:
        return f"GMMDenoiser({self.gmm!r})"
