"""Run one toy case through every sampler from the same initial noise and measure the results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from w2sd.denoiser import ModelPair
from w2sd.sampler import SampleResult, ddim_sample, sample, autoguidance_sample, w2sd_nfe
from w2sd.schedule import NoiseSchedule

from .cases import ToyCase
from .metrics import SlicedW2, evaluate, off_manifold_threshold

TRAJECTORY_SAMPLES = 64  # how many trajectories are kept for plots


@dataclass
class MethodRun:
    name: str
    samples: torch.Tensor                 # (N, d), float64
    nfe: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    trajectory: list[dict] | None = None  # per step: {"t", "x", "x_reflected"} for the first few samples
    seconds: float = 0.0


@dataclass
class CaseRun:
    case: ToyCase
    runs: dict[str, MethodRun]
    settings: dict

    def table_rows(self) -> list[dict]:
        return [{"method": r.name, "nfe": r.nfe, "steps": r.steps, **r.metrics} for r in self.runs.values()]


def _collector(store: list[dict], k: int):
    def callback(rec) -> None:
        store.append({
            "t": rec.t, "t_next": rec.t_next, "x": rec.x[:k].clone(),
            "x_reflected": None if rec.x_reflected is None else rec.x_reflected[:k].clone(),
            "x_stepped": None if rec.x_stepped is None else rec.x_stepped[:k].clone(),
            "x_next": rec.x_next[:k].clone(),
        })
    return callback


def _timed(name: str, fn, steps: int) -> MethodRun:
    traj: list[dict] = []
    t0 = time.perf_counter()
    res: SampleResult = fn(_collector(traj, TRAJECTORY_SAMPLES))
    return MethodRun(name, res.x.to(torch.float64), res.nfe.total, steps, trajectory=traj,
                     seconds=time.perf_counter() - t0)


def run_case(
    case: ToyCase,
    n: int = 20_000,
    steps: int = 50,
    seed: int = 0,
    lam: int | None = None,
    inversion: str = "exact",
    rounds: int = 1,
    autoguidance_weight: float = 1.0,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    equal_nfe_baselines: bool = True,
) -> CaseRun:
    """Sample ``case`` with real / strong / weak / W2SD (and autoguidance and strong DDIM at W2SD's NFE).

    All methods start from the same ``x_T`` (seeded), so differences between rows are paired.
    Autoguidance at equal NFE takes ``round(NFE_w2sd / 2)`` steps (2 evaluations per step); plain strong
    sampling at equal NFE takes ``NFE_w2sd`` steps.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"number of samples n must be an integer >= 2, got {n!r}")
    schedule = schedule or NoiseSchedule.sdxl()
    ts = schedule.timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, case.dim, generator=g, dtype=dtype)
    real, strong, weak = (m.denoiser(schedule) for m in (case.real, case.strong, case.weak))
    pair = ModelPair(strong, weak)
    nfe_w2sd = w2sd_nfe(steps, lam, rounds)
    runs: dict[str, MethodRun] = {}
    for name, den in (("real", real), ("strong", strong), ("weak", weak)):
        runs[name] = _timed(name, lambda cb, den=den: ddim_sample(den, x_T, ts, schedule, callback=cb), steps)
    runs["w2sd"] = _timed("w2sd", lambda cb: sample(strong, x_T, ts, schedule, pair=pair, lam=lam, rounds=rounds,
                                                    inversion=inversion, callback=cb), steps)
    if equal_nfe_baselines:
        ag_steps = max(1, min(round(nfe_w2sd / 2), schedule.num_train_timesteps))
        runs["autoguidance"] = _timed(
            f"autoguidance (w={autoguidance_weight:g})",
            lambda cb: autoguidance_sample(pair, autoguidance_weight, x_T, schedule.timesteps(ag_steps), schedule,
                                           callback=cb), ag_steps)
        s_steps = min(nfe_w2sd, schedule.num_train_timesteps)
        runs["strong_equal_nfe"] = _timed(
            "strong (equal NFE)",
            lambda cb: ddim_sample(strong, x_T, schedule.timesteps(s_steps), schedule, callback=cb), s_steps)
    reference = SlicedW2(case.real.sample(n, torch.Generator().manual_seed(seed + 1))) if case.dim > 1 else None
    threshold = off_manifold_threshold(case.real, seed=seed + 2)
    for r in runs.values():
        r.metrics = evaluate(r.samples, case.real, reference=reference, off_threshold=threshold)
    settings = dict(n=n, steps=steps, seed=seed, lam=lam if lam is not None else steps - 1, rounds=rounds,
                    inversion=inversion, autoguidance_weight=autoguidance_weight, nfe_w2sd=nfe_w2sd,
                    schedule=dict(schedule.config))
    return CaseRun(case, runs, settings)
