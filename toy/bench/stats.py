"""Seed-paired statistics: every method starts from the same x_T in a seed, so differences are paired.

For a metric m and seeds s = 1..S, d_s = m(method, s) - m(baseline, s); the 95% interval is the Student t
interval mean(d) +- t_{0.975, S-1} sd(d) / sqrt(S). A method "wins" when the whole interval lies on the better
side of zero, "loses" when it lies on the worse side, and "ties" otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _st

CONFIDENCE = 0.95
HIGHER_IS_BETTER = frozenset({"loglik"})
WIN, TIE, LOSS = "win", "tie", "loss"


@dataclass(frozen=True)
class PairedInterval:
    mean: float
    lo: float
    hi: float
    n: int

    def verdict(self, metric: str) -> str:
        """win / tie / loss of the method against the baseline on ``metric``."""
        if self.n < 2 or not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return TIE
        better_below = metric not in HIGHER_IS_BETTER
        if (self.hi < 0) if better_below else (self.lo > 0):
            return WIN
        if (self.lo > 0) if better_below else (self.hi < 0):
            return LOSS
        return TIE


def paired_interval(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
                    ) -> PairedInterval:
    """Student t interval of the mean paired difference ``values - baseline`` (one value per seed)."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.shape[0] != len(values) or d.ndim != 1:
        raise ValueError("values and baseline must be 1-D sequences of equal length (one entry per seed)")
    n = int(d.shape[0])
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return PairedInterval(mean, math.nan, math.nan, n)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.shape[0] > 1 else 0.0)
