"""One DDIM sampling loop for plain sampling, guided sampling and W2SD (Algorithm 1 of the paper).

    for i, t_i in enumerate(timesteps):                      # descending
        if i in reflect_steps:                               # default: the first lambda = T-1 steps
            repeat K times: x = reflect(x, t_i, t_{i+1})     # strong step, weak inversion
        x = DDIM(main(x, t_i), x, t_i -> t_{i+1})            # t_T := final level

Plain DDIM is the loop without reflections, and autoguidance is plain DDIM of an
:class:`~w2sd.denoiser.Autoguidance` denoiser, so every sampler shares this code and its NFE accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .ddim import ddim_step
from .denoiser import Denoiser, ModelPair, autoguidance, nfe_of
from .progress import ProgressBar
from .reflection import INVERSIONS, WEAK_EVALUATION_POINTS, inversion_levels, reflect
from .schedule import FINAL, NoiseSchedule

STEP_TARGETS = ("grid", "diffusers")


@dataclass
class NFE:
    """Model evaluations by role (each multiplied by the denoiser's ``nfe_per_call``, e.g. 2 for CFG)."""

    main: int = 0
    strong: int = 0
    weak: int = 0

    @property
    def total(self) -> int:
        return self.main + self.strong + self.weak

    def as_dict(self) -> dict[str, int]:
        return {"main": self.main, "strong": self.strong, "weak": self.weak, "total": self.total}


@dataclass(frozen=True)
class StepRecord:
    """What happened at step i (given to ``callback`` and collected in ``trajectory``)."""

    i: int
    t: int
    t_next: int
    x: torch.Tensor                        # latent entering step i, at level t
    x_reflected: torch.Tensor | None       # after the reflection(s), None when step i does not reflect
    x_stepped: torch.Tensor | None         # the last reflection's strong step x1 (level t_next), or None
    x_next: torch.Tensor                   # latent after the main step, at level t_next


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: NFE
    trajectory: list[StepRecord] | None = None
    timesteps: list[int] = field(default_factory=list)


def resolve_reflect_steps(num_steps: int, lam: int | None = None, reflect_at: Iterable[int] | None = None) -> set[int]:
    """The step indices that reflect: the first ``lam`` steps (default T-1), or an explicit set.

    The last step (i = T-1) never reflects, as in the paper and the published code: there is no t_{i+1} on the
    grid to reflect through, so ``lam = T`` is accepted and means the same as ``T - 1``.
    """
    if reflect_at is not None:
        if lam is not None:
            raise ValueError("give either lam (the first lam steps reflect) or reflect_at (explicit steps), not both")
        steps = set()
        for i in reflect_at:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= num_steps - 2:
                raise ValueError(f"reflect_at entries must be step indices in [0, T-2] = [0, {num_steps - 2}], got {i!r}")
            steps.add(i)
        return steps
    if lam is None:
        lam = num_steps - 1
    if isinstance(lam, bool) or not isinstance(lam, int) or not 0 <= lam <= num_steps:
        raise ValueError(f"lambda (number of reflection steps) must be an integer in [0, T] = [0, {num_steps}], got {lam!r}")
    return set(range(min(lam, num_steps - 1)))


def next_timestep(timesteps: Sequence[int], i: int, schedule: NoiseSchedule, step_targets: str) -> int:
    """The target of step i: the next grid entry (``grid``) or diffusers' ``t - 1000 // T`` (``diffusers``)."""
    if step_targets == "grid":
        return int(timesteps[i + 1]) if i + 1 < len(timesteps) else FINAL
    if step_targets == "diffusers":
        return schedule.diffusers_prev_timestep(int(timesteps[i]), len(timesteps))
    raise ValueError(f"step_targets must be one of {STEP_TARGETS}, got {step_targets!r}")


def _check_timesteps(timesteps: Sequence[int], schedule: NoiseSchedule) -> list[int]:
    ts = [int(t) for t in timesteps]
    if len(ts) < 1:
        raise ValueError("timesteps must hold at least one timestep (T >= 1)")
    if any(not 0 <= t < schedule.num_train_timesteps for t in ts):
        raise ValueError(f"timesteps must lie in [0, {schedule.num_train_timesteps - 1}], got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    return ts


def sample(
    main: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    *,
    pair: ModelPair | None = None,
    lam: int | None = None,
    reflect_at: Iterable[int] | None = None,
    rounds: int = 1,
    inversion: str = "exact",
    weak_at: str = "stepped",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    step_targets: str = "grid",
    callback: Callable[[StepRecord], None] | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    desc: str = "sampling",
) -> SampleResult:
    """DDIM sampling from ``x`` (at level ``timesteps[0]``), with W2SD reflections when ``pair`` is given.

    Args:
        main: the denoiser of the regular step (usually the strong model).
        x: initial latent, e.g. ``torch.randn`` (DDIM's init sigma is 1), shape (B, ...).
        timesteps: descending train timesteps, e.g. ``schedule.timesteps(T)``.
        pair: strong/weak pair for the reflection; ``None`` samples without reflection.
        lam: reflect on the first ``lam`` steps (default T-1 when ``pair`` is given); ``reflect_at``: explicit set.
        rounds: reflections per reflecting step (K >= 1).
        inversion: ``"exact"`` (paper, t_{i+1} -> t_i) or ``"reference"`` (published code's levels).
        weak_at: ``"stepped"`` (weak model at (x1, t_i), paper and code) or ``"pre_step"`` (at (x_t, t_i)).
        eta: DDIM stochasticity of the main step (the reflection is always deterministic).
        step_targets: ``"grid"`` walks the grid; ``"diffusers"`` uses diffusers' ``t - 1000 // T`` targets,
            which differ for trailing / linspace grids when T does not divide 1000.
        callback / return_trajectory: observe every step (:class:`StepRecord`); trajectory tensors are detached
            clones.
        progress: draw a progress bar on stderr.
    """
    ts = _check_timesteps(timesteps, schedule)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have a batch dimension, shape (B, ...), got shape {tuple(x.shape)}")
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")
    if weak_at not in WEAK_EVALUATION_POINTS:
        raise ValueError(f"weak_at must be one of {WEAK_EVALUATION_POINTS}, got {weak_at!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds (reflections per step, K) must be an integer >= 1, got {rounds!r}")
    if step_targets not in STEP_TARGETS:
        raise ValueError(f"step_targets must be one of {STEP_TARGETS}, got {step_targets!r}")
    if pair is None:
        if lam not in (None, 0) or reflect_at:
            raise ValueError("lam / reflect_at need a strong/weak pair (pair=ModelPair(strong, weak))")
        steps_reflecting: set[int] = set()
    else:
        steps_reflecting = resolve_reflect_steps(len(ts), lam, reflect_at)

    nfe = NFE()
    trajectory: list[StepRecord] | None = [] if return_trajectory else None
    observe = callback is not None or return_trajectory
    with ProgressBar(len(ts), desc, enabled=progress) as bar:
        for i, t in enumerate(ts):
            t_next = next_timestep(ts, i, schedule, step_targets)
            x_in = x
            x_reflected = x_stepped = None
            if i in steps_reflecting:
                assert pair is not None
                t_grid_next = int(ts[i + 1])
                src, dst = inversion_levels(t, t_grid_next, inversion, schedule, len(ts))
                for _ in range(rounds):
                    r = reflect(x, t, t_next, pair, schedule, invert_from=src, invert_to=dst, weak_at=weak_at)
                    x, x_stepped = r.x, r.x_stepped
                    nfe.strong += nfe_of(pair.strong)
                    nfe.weak += r.weak_evaluations * nfe_of(pair.weak)
                x_reflected = x
            eps = main(x, t)
            nfe.main += nfe_of(main)
            x = ddim_step(eps, x, t, t_next, schedule, eta=eta, generator=generator)
            if observe:
                record = StepRecord(
                    i=i, t=t, t_next=t_next, x=_snap(x_in), x_reflected=_snap(x_reflected),
                    x_stepped=_snap(x_stepped), x_next=_snap(x),
                )
                if callback is not None:
                    callback(record)
                if trajectory is not None:
                    trajectory.append(record)
            bar.update()
    return SampleResult(x=x, nfe=nfe, trajectory=trajectory, timesteps=ts)


def _snap(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().clone()


def ddim_sample(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
                **kwargs) -> SampleResult:
    """Plain DDIM sampling (no reflection). Keyword arguments as :func:`sample`."""
    return sample(denoiser, x, timesteps, schedule, **kwargs)


def w2sd_sample(pair: ModelPair, x: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *,
                main: Denoiser | None = None, **kwargs) -> SampleResult:
    """W2SD sampling; the main step uses ``main`` (default: the strong model). Keywords as :func:`sample`."""
    return sample(main if main is not None else pair.strong, x, timesteps, schedule, pair=pair, **kwargs)


def autoguidance_sample(pair: ModelPair, weight: float, x: torch.Tensor, timesteps: Sequence[int],
                        schedule: NoiseSchedule, **kwargs) -> SampleResult:
    """DDIM sampling of ``eps_s + w (eps_s - eps_w)``. Keywords as :func:`sample`."""
    return sample(autoguidance(pair, weight), x, timesteps, schedule, **kwargs)


def w2sd_nfe(num_steps: int, lam: int | None = None, rounds: int = 1) -> int:
    """Model evaluations of W2SD with unit-cost denoisers: T + 2 K lambda (148 for T=50, lambda=49)."""
    return num_steps + 2 * rounds * len(resolve_reflect_steps(num_steps, lam))
