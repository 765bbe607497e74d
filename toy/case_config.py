"""Read and validate a user's CASE.json: ``{"real": M, "strong": M, "weak": M}`` with
``M = {"weights": [K], "means": [[d] x K], "stds": [K]}`` or ``"covs": [[[d x d]] x K]`` instead of ``stds``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from w2sd.errors import ConfigError

from .cases import ToyCase
from .gmm import GaussianMixture

MODEL_KEYS = ("real", "strong", "weak")
MIXTURE_KEYS = {"weights", "means", "stds", "covs"}
WEIGHT_SUM_TOL = 1e-6


def load_case(path: str | os.PathLike) -> ToyCase:
    """Parse ``path``; every error names the offending field (e.g. ``strong.weights``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"case file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return case_from_dict(data, name=path.stem)


def case_from_dict(data: object, name: str = "custom") -> ToyCase:
    if not isinstance(data, dict):
        raise ConfigError("case must be a JSON object with keys 'real', 'strong', 'weak'")
    unknown = sorted(set(data) - set(MODEL_KEYS) - {"description"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in case; allowed: {list(MODEL_KEYS)} (+ 'description')")
    missing = [k for k in MODEL_KEYS if k not in data]
    if missing:
        raise ConfigError(f"case is missing {missing}; it needs 'real', 'strong' and 'weak' mixtures")
    models = {k: mixture_from_dict(data[k], k) for k in MODEL_KEYS}
    dims = {k: m.dim for k, m in models.items()}
    if len(set(dims.values())) != 1:
        raise ConfigError(f"mixtures have different dimensions: {dims}")
    return ToyCase(name, models["real"], models["strong"], models["weak"],
                   str(data.get("description", f"user case {name}")))


def _array(value, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{field} must be a (nested) list of numbers") from None
    if arr.dtype == object or not np.all(np.isfinite(arr)):
        raise ConfigError(f"{field} must hold finite numbers")
    return arr


def mixture_from_dict(m: object, prefix: str) -> GaussianMixture:
    if not isinstance(m, dict):
        raise ConfigError(f"{prefix} must be an object with 'weights', 'means' and 'stds' or 'covs'")
    unknown = sorted(set(m) - MIXTURE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {prefix}; allowed: {sorted(MIXTURE_KEYS)}")
    for key in ("weights", "means"):
        if key not in m:
            raise ConfigError(f"{prefix}.{key} is missing")
    if ("stds" in m) == ("covs" in m):
        raise ConfigError(f"{prefix} needs exactly one of 'stds' (isotropic) or 'covs' (full covariance)")
    w = _array(m["weights"], f"{prefix}.weights")
    if w.ndim != 1 or w.size < 1:
        raise ConfigError(f"{prefix}.weights must be a non-empty list of K numbers")
    if np.any(w <= 0):
        raise ConfigError(f"{prefix}.weights must all be positive, got {w.tolist()}")
    if not math.isclose(float(w.sum()), 1.0, abs_tol=WEIGHT_SUM_TOL):
        raise ConfigError(f"{prefix}.weights must sum to 1 (within {WEIGHT_SUM_TOL}), they sum to {w.sum():.8g}")
    K = w.size
    mu = _array(m["means"], f"{prefix}.means")
    if mu.ndim != 2 or mu.shape[0] != K or mu.shape[1] < 1:
        raise ConfigError(f"{prefix}.means must be K={K} lists of d numbers, got shape {list(mu.shape)}")
    d = mu.shape[1]
    if "stds" in m:
        s = _array(m["stds"], f"{prefix}.stds")
        if s.shape != (K,):
            raise ConfigError(f"{prefix}.stds must hold K={K} numbers, got shape {list(s.shape)}")
        if np.any(s <= 0):
            raise ConfigError(f"{prefix}.stds must all be positive, got {s.tolist()}")
        return GaussianMixture(w, mu, stds=s)
    c = _array(m["covs"], f"{prefix}.covs")
    if c.shape != (K, d, d):
        raise ConfigError(f"{prefix}.covs must have shape [K, d, d] = [{K}, {d}, {d}], got {list(c.shape)}")
    if not np.allclose(c, np.swapaxes(c, 1, 2), atol=1e-10):
        raise ConfigError(f"{prefix}.covs must be symmetric")
    for k in range(K):
        if np.linalg.eigvalsh(c[k]).min() <= 0:
            raise ConfigError(f"{prefix}.covs[{k}] is not positive definite (PSD with positive eigenvalues)")
    return GaussianMixture(w, mu, covs=c)
