"""Toy validators: analytic Gaussian mixtures where the truth is known, cases, metrics, plots."""

from .cases import ToyCase, builtin_cases, four_modes_2d, opposed_1d, opposed_2d, two_peaks_1d
from .gmm import GaussianMixture, GMMDenoiser
from .metrics import evaluate, mode_weight_tv, sliced_w2, wasserstein_1d
from .run import CaseRun, run_case
