"""Figures of the benchmark report (plain data in, matplotlib Figure out; the math lives elsewhere)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..plots import plot_densities_1d, plot_scatter_2d
from .cases import BenchCase

# method keys of the suite -> the names toy.plots colours and labels
FIGURE_METHODS = {"real": "real", "strong": "strong", "ag_w1": "autoguidance", "w2sd_exact_K1_f1": "w2sd"}


def case_figure(case: BenchCase, samples: Mapping[str, torch.Tensor], title: str = ""):
    """Samples of the real-model floor, strong (equal NFE), autoguidance w=1 and W2SD (seed 0)."""
    shown = {FIGURE_METHODS[k]: samples[k] for k in FIGURE_METHODS if k in samples}
    title = title or case.name
    if case.dim == 1:
        return plot_densities_1d(case.real, shown, title=title, bins=120)
    return plot_scatter_2d(case.real, shown, title=title, max_points=1500)


def forest_figure(rows: Sequence[dict], title: str = "paired difference vs strong at equal NFE (95% CI)"):
    """One line per case: relative change of the primary metric against plain strong sampling, with CI bars.

    ``rows``: dicts with ``case``, ``primary``, ``baseline`` (strong's mean) and per method ``{label: (mean, lo,
    hi)}`` under ``methods``. Values are divided by the baseline mean so cases share an axis (%).
    """
    labels = sorted({m for r in rows for m in r["methods"]}, key=lambda s: (not s.startswith("W2SD"), s))
    colors = {"W2SD exact": "#2ca02c", "W2SD reference": "#98df8a", "autoguidance w=1": "#9467bd"}
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.2))
    offsets = np.linspace(-0.25, 0.25, max(len(labels), 1))
    for j, label in enumerate(labels):
        ys, xs, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            if label not in r["methods"] or not r["baseline"]:
                continue
            mean, a, b = (100 * v / abs(r["baseline"]) for v in r["methods"][label])
            ys.append(i + offsets[j]); xs.append(mean); lo.append(mean - a); hi.append(b - mean)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, color=colors.get(label), label=label)
    ax.axvline(0, color="#555555", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['case']} ({r['primary']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change of the primary metric vs strong, % (negative = closer to the real distribution)")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    fig.tight_layout()
    return fig
