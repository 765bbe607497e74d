"""Samplers compared at equal NFE (research/peers.md 7.1), with the strong/weak split of model evaluations.

Budget B = the NFE of the reference W2SD run (T = 50 steps, lambda = T - 1, K = 1), counted in network
evaluations (a CFG-guided strong model costs 2 per call). Every other method gets the step count that spends
the same budget (up to rounding; the actual NFE is reported):

- plain strong DDIM: B / c_s steps; the real model itself at B steps is the floor (the best a sampler can do);
- autoguidance eps_s + w (eps_s - eps_w): B / (c_s + c_w) steps (w = 1 is the first-order match of one
  reflection, Karras' weight 2);
- W2SD with K rounds reflecting a fraction f of the steps: T c_s + K lambda (c_s + c_w) = B, lambda = f (T - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from w2sd.denoiser import ModelPair, autoguidance, nfe_of
from w2sd.sampler import SampleResult, sample
from w2sd.schedule import NoiseSchedule

REFERENCE_STEPS = 50
MAX_STEPS = 1000


@dataclass(frozen=True)
class Method:
    """One sampler configuration. ``family`` is one of floor, strong, autoguidance, w2sd."""

    key: str
    label: str
    family: str
    weight: float | None = None      # autoguidance w
    rounds: int = 1                  # W2SD K
    fraction: float = 1.0            # W2SD: reflect on the first round(fraction * (T - 1)) steps
    inversion: str = "exact"
    equal_nfe: bool = True           # False: the 50-step strong run shown for reference
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Steps and reflections a method uses in one case, and its NFE split."""

    steps: int
    lam: int
    nfe_strong: int
    nfe_weak: int
    nfe_real: int = 0    # the floor runs the real model itself

    @property
    def nfe(self) -> int:
        return self.nfe_strong + self.nfe_weak + self.nfe_real


def method_set(light: bool = False, quick: bool = False) -> list[Method]:
    """The compared samplers: full sweep, or a reduced set for expensive denoisers / the quick preset."""
    ms = [
        Method("real", "real model (floor)", "floor"),
        Method("strong_50", f"strong, {REFERENCE_STEPS} steps", "strong", equal_nfe=False),
        Method("strong", "strong, equal NFE", "strong"),
    ]
    weights = (1.0,) if (light or quick) else (0.5, 1.0, 2.0)
    ms += [Method(f"ag_w{w:g}", f"autoguidance w={w:g}", "autoguidance", weight=w) for w in weights]
    if light or quick:
        sweep = [(1, 1.0)]
    else:
        sweep = [(1, 1.0), (1, 0.5), (2, 1.0)]
    for inv in ("exact", "reference"):
        for k, f in sweep:
            lam = "T-1" if f == 1.0 else f"{f:g}(T-1)"
            ms.append(Method(f"w2sd_{inv}_K{k}_f{f:g}", f"W2SD {inv} K={k} lambda={lam}", "w2sd", rounds=k,
                             fraction=f, inversion=inv))
    return ms


def budget(c_s: int, c_w: int, steps: int = REFERENCE_STEPS) -> int:
    """NFE of the reference W2SD run: T c_s + (T - 1)(c_s + c_w)."""
    return steps * c_s + (steps - 1) * (c_s + c_w)


def plan(method: Method, c_s: int, c_w: int, nfe_budget: int) -> Plan:
    """Steps (and lambda) that make ``method`` spend ``nfe_budget`` evaluations."""
    clamp = lambda v: int(min(max(round(v), 2), MAX_STEPS))  # noqa: E731
    if method.family == "floor":
        t = clamp(nfe_budget)
        return Plan(t, 0, 0, 0, nfe_real=t)
    if method.family == "strong":
        t = REFERENCE_STEPS if not method.equal_nfe else clamp(nfe_budget / c_s)
        return Plan(t, 0, t * c_s, 0)
    if method.family == "autoguidance":
        t = clamp(nfe_budget / (c_s + c_w))
        return Plan(t, 0, t * c_s, t * c_w)
    if method.family == "w2sd":
        kf = method.rounds * method.fraction * (c_s + c_w)
        t = clamp((nfe_budget + kf) / (c_s + kf))
        lam = int(round(method.fraction * (t - 1)))
        return Plan(t, lam, t * c_s + method.rounds * lam * c_s, method.rounds * lam * c_w)
    raise ValueError(f"unknown method family {method.family!r}")


def run_method(method: Method, p: Plan, pair: ModelPair, real, x_T: torch.Tensor, schedule: NoiseSchedule,
               callback: Callable | None = None) -> SampleResult:
    """Sample from ``x_T`` with ``method`` under plan ``p`` (``real``: the real model's denoiser)."""
    ts = schedule.timesteps(p.steps)
    if method.family == "floor":
        return sample(real, x_T, ts, schedule, callback=callback)
    if method.family == "strong":
        return sample(pair.strong, x_T, ts, schedule, callback=callback)
    if method.family == "autoguidance":
        return sample(autoguidance(pair, method.weight), x_T, ts, schedule, callback=callback)
    return sample(pair.strong, x_T, ts, schedule, pair=pair, lam=p.lam, rounds=method.rounds,
                  inversion=method.inversion, callback=callback)


def unit_costs(pair: ModelPair) -> tuple[int, int]:
    """(c_s, c_w): evaluations per call of the strong and the weak denoiser."""
    return nfe_of(pair.strong), nfe_of(pair.weak)
