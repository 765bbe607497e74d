"""Run the benchmark: every case x every method x every seed, paired on x_T, with the summary statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from w2sd.schedule import NoiseSchedule

from ..metrics import SlicedW2, off_manifold_threshold
from .cases import BenchCase, analytic_cases
from .methods import Method, budget, method_set, plan, run_method, unit_costs
from .metrics import case_metrics
from .stats import mean_sd, paired_interval

BASELINE = "strong"          # paired differences are taken against plain strong sampling at equal NFE
AG_REFERENCE = "ag_w1"       # ... and, for W2SD, against autoguidance w = 1 (first-order equivalent)
FIGURE_POINTS = 3000         # samples of seed 0 kept per method for the figures
THRESHOLD_SAMPLES = 20_000   # real samples that calibrate the off-manifold level

PRESETS = {
    # n: samples per seed (scaled by the case's n_scale); seeds; max_seeds_light: seeds for expensive cases
    "full": dict(n=8000, seeds=5, max_seeds_light=3, quick_methods=False, skip_light=False),
    "quick": dict(n=2000, seeds=3, max_seeds_light=2, quick_methods=True, skip_light=True),
}


def bench_schedule() -> NoiseSchedule:
    """DDPM-linear betas, trailing timesteps (every grid starts at t = 999) and a final alpha_bar of 1."""
    return NoiseSchedule.create(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing",
                                steps_offset=0, set_alpha_to_one=True)


@dataclass
class BenchConfig:
    preset: str = "quick"
    n: int | None = None            # override the preset's samples per seed
    seeds: int | None = None        # override the preset's number of seeds
    seed: int = 0                   # base seed
    cases: list[str] | None = None  # names to run (default: all of the preset)
    learned: bool = True
    learned_dir: Path | None = None
    retrain: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("n", "seeds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} (--{name}) must be an integer >= 2, got {v!r}")

    def setting(self, key: str):
        override = {"n": self.n, "seeds": self.seeds}.get(key)
        return override if override is not None else PRESETS[self.preset][key]


@dataclass
class CaseResult:
    case: BenchCase
    summary: dict                                  # JSON-able: settings, per-method metrics, intervals
    samples: dict[str, torch.Tensor] = field(default_factory=dict)   # seed 0, for figures


def select_cases(config: BenchConfig, learned_case: Callable[[], BenchCase] | None = None) -> list[BenchCase]:
    """The cases of ``config`` in report order (names validated; the learned case last when given)."""
    cases = analytic_cases() + ([learned_case()] if learned_case is not None else [])
    by_name = {c.name: c for c in cases}
    if config.cases:
        known = sorted(by_name) + ([] if learned_case is not None else ["learned_ring8"])
        unknown = [c for c in config.cases if c not in known]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; choose from {known}")
        return [by_name[c] for c in config.cases if c in by_name]
    if PRESETS[config.preset]["skip_light"]:
        cases = [c for c in cases if not c.light]
    return cases


def run_case_bench(case: BenchCase, config: BenchConfig, schedule: NoiseSchedule) -> CaseResult:
    """All methods and seeds of one case."""
    t0 = time.perf_counter()
    pair = case.make_pair(schedule)
    real = case.real.denoiser(schedule)
    c_s, c_w = unit_costs(pair)
    nfe_budget = budget(c_s, c_w)
    methods: list[Method] = method_set(light=case.light, quick=PRESETS[config.preset]["quick_methods"])
    n = max(int(round(config.setting("n") * case.n_scale)), 200)
    seeds = config.setting("seeds")
    if case.light:
        seeds = min(seeds, PRESETS[config.preset]["max_seeds_light"])
    threshold = off_manifold_threshold(case.real, n=THRESHOLD_SAMPLES, seed=config.seed + 12345)
    plans = {m.key: plan(m, c_s, c_w, nfe_budget) for m in methods}
    per_seed: dict[str, dict[str, list[float]]] = {m.key: {} for m in methods}
    samples: dict[str, torch.Tensor] = {}
    for s in range(seeds):
        g = torch.Generator().manual_seed(1_000_003 * (config.seed + 1) + 7919 * s)
        x_T = torch.randn(n, case.dim, generator=g, dtype=torch.float64)          # shared by every method
        reference = SlicedW2(case.real.sample(n, g)) if case.dim > 1 else None
        for m in methods:
            res = run_method(m, plans[m.key], pair, real, x_T, schedule)
            if res.nfe.total != plans[m.key].nfe:
                raise AssertionError(f"{case.name}/{m.key}: sampler counted {res.nfe.as_dict()} NFE, plan "
                                     f"{plans[m.key]}")
            with torch.no_grad():
                x = res.x.detach().to(torch.float64)
            for k, v in case_metrics(x, case, reference, threshold).items():
                per_seed[m.key].setdefault(k, []).append(v)
            if s == 0:
                samples[m.key] = x[:FIGURE_POINTS].clone()
    rows = []
    base = per_seed[BASELINE]
    for m in methods:
        p = plans[m.key]
        row = {"key": m.key, "label": m.label, "family": m.family, "steps": p.steps, "lam": p.lam,
               "rounds": m.rounds if m.family == "w2sd" else None,
               "inversion": m.inversion if m.family == "w2sd" else None, "weight": m.weight,
               "nfe": p.nfe, "nfe_strong": p.nfe_strong, "nfe_weak": p.nfe_weak, "nfe_real": p.nfe_real,
               "equal_nfe": m.equal_nfe,
               "per_seed": per_seed[m.key], "mean": {}, "sd": {}, "vs_strong": {}, "vs_ag": {}}
        for k, vals in per_seed[m.key].items():
            row["mean"][k], row["sd"][k] = mean_sd(vals)
            if m.key != BASELINE and k in base and len(base[k]) == len(vals):
                iv = paired_interval(vals, base[k])
                row["vs_strong"][k] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "verdict": iv.verdict(k)}
            ag = per_seed.get(AG_REFERENCE, {}).get(k)
            if m.family == "w2sd" and ag is not None and len(ag) == len(vals):
                iv = paired_interval(vals, ag)
                row["vs_ag"][k] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "verdict": iv.verdict(k)}
        rows.append(row)
    seconds = time.perf_counter() - t0
    summary = {"name": case.name, "description": case.description, "expect": case.expect, "primary": case.primary,
               "control": case.control, "dim": case.dim, "n": n, "seeds": seeds, "budget": nfe_budget,
               "cost_strong": c_s, "cost_weak": c_w, "methods": rows, "seconds": round(seconds, 2), **case.meta}
    return CaseResult(case, summary, samples)


def run_suite(config: BenchConfig, log: Callable[[str], None] = print,
              learned_case: Callable[[], BenchCase] | None = None) -> list[CaseResult]:
    """Run every selected case; ``log`` receives one progress line per case."""
    schedule = bench_schedule()
    cases = select_cases(config, learned_case)
    results = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        r = run_case_bench(case, config, schedule)
        results.append(r)
        w2 = next(m for m in r.summary["methods"] if m["key"].startswith("w2sd_exact_K1_f1"))
        v = w2["vs_strong"].get(case.primary, {})
        log(f"[{i}/{len(cases)}] {case.name}: {len(r.summary['methods'])} methods x {r.summary['seeds']} seeds, "
            f"n={r.summary['n']}, NFE {r.summary['budget']}: W2SD vs strong on {case.primary}: "
            f"{v.get('mean', float('nan')):+.4f} [{v.get('lo', float('nan')):+.4f}, {v.get('hi', float('nan')):+.4f}] "
            f"{v.get('verdict', '-')}  ({time.perf_counter() - t0:.1f} s)")
    return results
