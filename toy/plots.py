"""Figures for toy runs (math stays in toy.gmm / toy.metrics; notebooks call these functions).

Every function takes plain data (mixtures, sample tensors, trajectory records) and returns a matplotlib Figure.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .gmm import GaussianMixture

COLORS = {"real": "#222222", "weak": "#d62728", "strong": "#1f77b4", "w2sd": "#2ca02c",
          "autoguidance": "#9467bd", "strong_equal_nfe": "#17becf"}
LABELS = {"real": "real (sampled)", "weak": "weak", "strong": "strong", "w2sd": "W2SD",
          "autoguidance": "autoguidance", "strong_equal_nfe": "strong, equal NFE"}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def plot_densities_1d(real: GaussianMixture, samples: Mapping[str, torch.Tensor], title: str = "",
                      models: Mapping[str, GaussianMixture] | None = None, bins: int = 160):
    """Histograms of 1-D samples per method over the analytic real density (and model densities if given)."""
    all_x = np.concatenate([_np(s).ravel() for s in samples.values()])
    lo, hi = np.quantile(all_x, [0.001, 0.999])
    lo, hi = lo - 1.0, hi + 1.0
    grid = torch.linspace(lo, hi, 600, dtype=torch.float64)[:, None]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(grid[:, 0], real.log_prob(grid).exp(), color="#bbbbbb", alpha=0.6, label="real density")
    for name, m in (models or {}).items():
        ax.plot(grid[:, 0], m.log_prob(grid).exp(), ls="--", lw=1, color=COLORS.get(name, None),
                label=f"{LABELS.get(name, name)} density")
    for name, s in samples.items():
        ax.hist(_np(s).ravel(), bins=bins, range=(lo, hi), density=True, histtype="step", lw=1.6,
                color=COLORS.get(name, None), label=f"{LABELS.get(name, name)} samples")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def _contours(ax, gmm: GaussianMixture, lim: tuple[float, float, float, float]) -> None:
    xs = np.linspace(lim[0], lim[1], 160)
    ys = np.linspace(lim[2], lim[3], 160)
    X, Y = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], 1))
    Z = gmm.log_prob(pts).exp().reshape(X.shape).numpy()
    ax.contour(X, Y, Z, levels=6, colors="#555555", linewidths=0.6)


def plot_scatter_2d(real: GaussianMixture, samples: Mapping[str, torch.Tensor], title: str = "",
                    max_points: int = 4000):
    """One scatter panel per method over the real density's contours."""
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    pts = np.concatenate([_np(s)[:max_points] for s in samples.values()])
    lo, hi = np.quantile(pts, [0.002, 0.998], axis=0)
    lim = (lo[0] - 1, hi[0] + 1, lo[1] - 1, hi[1] + 1)
    for ax, name in zip(axes[0], names):
        s = _np(samples[name])[:max_points]
        _contours(ax, real, lim)
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.35, color=COLORS.get(name, "#333333"))
        ax.set_title(LABELS.get(name, name), fontsize=10)
        ax.set_xlim(lim[:2])
        ax.set_ylim(lim[2:])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_trajectories_1d(trajectories: Mapping[str, Sequence[dict]], title: str = "", max_paths: int = 40):
    """Paper Fig. 4 style: x against the step index for weak / strong / W2SD (one panel each)."""
    names = list(trajectories)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = trajectories[name]
        xs = np.stack([_np(steps[0]["x"])[:max_paths, 0]] + [_np(s["x_next"])[:max_paths, 0] for s in steps])
        ax.plot(np.arange(xs.shape[0]), xs, color=COLORS.get(name, "#333333"), lw=0.7, alpha=0.7)
        ax.set_title(LABELS.get(name, name), fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("x")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_trajectories_2d(trajectories: Mapping[str, Sequence[dict]], real: GaussianMixture | None = None,
                         title: str = "", max_paths: int = 40, show_reflections: bool = True):
    """Paths in the plane: start points (x_T, hollow), end points (filled) and, for W2SD, the reflection
    vectors x -> x~ at each step (arrows)."""
    names = list(trajectories)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = trajectories[name]
        path = np.stack([_np(steps[0]["x"])[:max_paths]] + [_np(s["x_next"])[:max_paths] for s in steps])
        color = COLORS.get(name, "#333333")
        if real is not None:
            lo, hi = path.reshape(-1, 2).min(0) - 1, path.reshape(-1, 2).max(0) + 1
            _contours(ax, real, (lo[0], hi[0], lo[1], hi[1]))
        for k in range(path.shape[1]):
            ax.plot(path[:, k, 0], path[:, k, 1], color=color, lw=0.6, alpha=0.6)
        ax.scatter(path[0, :, 0], path[0, :, 1], s=12, facecolors="none", edgecolors="#777777", label="start")
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=12, color=color, label="end")
        if show_reflections:
            for s in steps:
                if s.get("x_reflected") is None:
                    continue
                a, b = _np(s["x"])[:max_paths], _np(s["x_reflected"])[:max_paths]
                ax.quiver(a[:, 0], a[:, 1], b[:, 0] - a[:, 0], b[:, 1] - a[:, 1], angles="xy", scale_units="xy",
                          scale=1, width=0.003, color="black", alpha=0.5)
        ax.set_title(LABELS.get(name, name), fontsize=10)
        ax.set_aspect("equal")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def figures_for_case(run) -> dict[str, "plt.Figure"]:
    """The standard figures of a :class:`toy.run.CaseRun`, keyed by file name."""
    case = run.case
    main = {k: run.runs[k].samples for k in ("real", "weak", "strong", "w2sd") if k in run.runs}
    traj = {k: run.runs[k].trajectory for k in ("weak", "strong", "w2sd") if run.runs[k].trajectory}
    if case.dim == 1:
        return {
            f"{case.name}_densities.png": plot_densities_1d(case.real, main, title=case.description),
            f"{case.name}_trajectories.png": plot_trajectories_1d(traj, title=f"{case.name}: trajectories"),
        }
    figs = {f"{case.name}_scatter.png": plot_scatter_2d(case.real, main, title=case.description)}
    if case.dim == 2:
        figs[f"{case.name}_trajectories.png"] = plot_trajectories_2d(traj, case.real, title=f"{case.name}: trajectories")
    return figs
