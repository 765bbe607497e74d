"""Theory diagnostics for analytic pairs and their figures (notebook 03).

- Theorem 1 of the paper: the reflection x~_t = M_w^-1(M_s(x_t)) moves x_t by sigma_t^2 dt (grad log p_s -
  grad log p_w) to first order. In VP units with the weak model evaluated at the pre-step point the DDIM
  round trip is exactly  x~ - x = ab_t s_t (s_t - s_t') Delta1(x_t),  s = sqrt((1 - ab) / ab)
  (research/peers.md 6.3); with the weak model at the stepped point (paper and code) it holds to first order.
- The premise Delta1 ~ Delta2: cos_t = E<Delta1, Delta2> / sqrt(E|Delta1|^2 E|Delta2|^2) and
  gain_t = E|Delta1| / E|Delta2| over x ~ p_{s,t}, with Delta1 = grad log p_s - grad log p_w (weak-to-strong) and
  Delta2 = grad log p_real - grad log p_s (strong-to-ideal). cos > 0 points the correction the right way;
  gain ~ 1 avoids over- or undershoot (peers.md 6.4).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from w2sd.denoiser import ModelPair
from w2sd.reflection import reflect
from w2sd.schedule import NoiseSchedule

from .gmm import GaussianMixture


def _vp_sigma(ab: float) -> float:
    return math.sqrt((1.0 - ab) / ab)


def reflection_displacements(strong: GaussianMixture, weak: GaussianMixture, schedule: NoiseSchedule,
                             steps: int = 50, n: int = 200, seed: int = 0, weak_at: str = "stepped") -> dict:
    """Measured reflection displacement and Theorem 1's prediction at every step of a ``steps`` grid.

    Points x_t are exact samples of the strong model's p_t. Returns arrays ``measured``, ``predicted`` of shape
    (steps - 1, n, d) and ``t`` (steps - 1,).
    """
    ts = schedule.timesteps(steps)
    pair = ModelPair(strong.denoiser(schedule), weak.denoiser(schedule))
    g = torch.Generator().manual_seed(seed)
    measured, predicted = [], []
    for t, t_next in zip(ts[:-1], ts[1:]):
        ab, ab_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        x0 = strong.sample(n, g)
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        r = reflect(x, t, t_next, pair, schedule, weak_at=weak_at)
        delta1 = strong.score(x, ab) - weak.score(x, ab)
        measured.append(r.x - x)
        predicted.append(ab * _vp_sigma(ab) * (_vp_sigma(ab) - _vp_sigma(ab_next)) * delta1)
    return {"t": np.asarray(ts[:-1]), "measured": torch.stack(measured).numpy(),
            "predicted": torch.stack(predicted).numpy()}


def delta_alignment(real: GaussianMixture, strong: GaussianMixture, weak: GaussianMixture,
                    schedule: NoiseSchedule, timesteps: Sequence[int], n: int = 2000, seed: int = 0) -> dict:
    """cos_t and gain_t of Delta1 vs Delta2 over x ~ p_{s,t} at each timestep."""
    g = torch.Generator().manual_seed(seed)
    cos, gain = [], []
    for t in timesteps:
        ab = schedule.alpha_bar(t)
        x0 = strong.sample(n, g)
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        s_s = strong.score(x, ab)
        d1, d2 = s_s - weak.score(x, ab), real.score(x, ab) - s_s
        num = float((d1 * d2).sum(-1).mean())
        den = math.sqrt(float((d1**2).sum(-1).mean()) * float((d2**2).sum(-1).mean()))
        cos.append(num / den if den > 0 else float("nan"))
        n2 = float(d2.norm(dim=-1).mean())
        gain.append(float(d1.norm(dim=-1).mean()) / n2 if n2 > 0 else float("nan"))
    return {"t": np.asarray(list(timesteps)), "cos": np.asarray(cos), "gain": np.asarray(gain)}


# ---------------------------------------------------------------------------------------------- figures
def plot_theorem1(results: Mapping[str, dict], title: str = "Theorem 1: reflection displacement vs prediction"):
    """Left: measured vs predicted displacement (all steps and points); right: relative error per timestep."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    for label, r in results.items():
        m, p = r["measured"].reshape(-1), r["predicted"].reshape(-1)
        a.scatter(p, m, s=3, alpha=0.4, label=label)
        err = np.linalg.norm(r["measured"] - r["predicted"], axis=(1, 2)) / \
            np.maximum(np.linalg.norm(r["predicted"], axis=(1, 2)), 1e-300)
        b.semilogy(r["t"], err, label=label)
    lim = max(abs(v) for r in results.values() for v in (r["predicted"].min(), r["predicted"].max()))
    a.plot([-lim, lim], [-lim, lim], color="#555555", lw=0.8, ls="--")
    a.set_xlabel(r"predicted $\bar\alpha_t\sigma_t(\sigma_t-\sigma_{t'})\,\Delta_1(x_t)$")
    a.set_ylabel(r"measured $\tilde x_t - x_t$")
    a.legend(fontsize=8, markerscale=4)
    b.set_xlabel("timestep t")
    b.set_ylabel("relative error |measured - predicted| / |predicted|")
    b.invert_xaxis()
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_alignment(results: Mapping[str, dict], title: str = r"$\Delta_1$ (weak-to-strong) vs $\Delta_2$ (strong-to-real)"):
    """cos_t (left) and gain_t (right, log scale) against the timestep, one line per pair."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, r in results.items():
        a.plot(r["t"], r["cos"], label=label)
        b.semilogy(r["t"], r["gain"], label=label)
    a.axhline(0, color="#555555", lw=0.8)
    a.set_ylim(-1.05, 1.05)
    a.set_ylabel(r"cos($\Delta_1$, $\Delta_2$)")
    b.axhline(1, color="#555555", lw=0.8, ls="--")
    b.set_ylabel(r"E|$\Delta_1$| / E|$\Delta_2$|")
    for ax in (a, b):
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_reflection_vectors(trajectory: Sequence[dict], steps: Sequence[int] = (5, 15, 30), magnify: float = 20.0,
                            max_points: int = 64, title: str = "reflection vectors"):
    """Start points x_t (dots) and magnified reflection vectors x~_t - x_t (arrows) at a few reflected steps of
    a 2-D W2SD trajectory (records as collected by :func:`toy.run.run_case`)."""
    steps = [i for i in steps if i < len(trajectory) and trajectory[i].get("x_reflected") is not None]
    fig, axes = plt.subplots(1, len(steps), figsize=(3.4 * len(steps), 3.5), squeeze=False)
    for ax, i in zip(axes[0], steps):
        rec = trajectory[i]
        x = rec["x"][:max_points].to(torch.float64).numpy()
        v = (rec["x_reflected"][:max_points] - rec["x"][:max_points]).to(torch.float64).numpy()
        ax.scatter(x[:, 0], x[:, 1], s=6, color="#777777")
        ax.quiver(x[:, 0], x[:, 1], magnify * v[:, 0], magnify * v[:, 1], angles="xy", scale_units="xy", scale=1,
                  width=0.006, color="#2ca02c")
        ax.set_title(f"step {i} (t = {rec['t']}), arrows x{magnify:g}", fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
