"""The W2SD reflection operator (Bai, Sugiyama & Xie 2025, Algorithm 1 and Theorem 1).

    x1      = DDIM_strong(x_t,  t_i -> t_{i+1})           # denoise with the strong model
    x~_t    = DDIM_weak^-1(x1,  t_{i+1} -> t_i)           # invert with the weak model, label t_i

To first order (Theorem 1) x~_t - x_t = sigma_t^2 dt (grad log p_s(x_t) - grad log p_w(x_t)): the latent moves
along the weak-to-strong difference, an estimate of the strong model's own error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ddim import ddim_step
from .denoiser import ModelPair
from .schedule import NoiseSchedule

INVERSIONS = ("exact", "reference")
WEAK_EVALUATION_POINTS = ("stepped", "pre_step")


@dataclass(frozen=True)
class Reflection:
    """One reflection's result: the reflected latent, the strong step's latent and both model outputs."""

    x: torch.Tensor            # x~_t, at level t_i (or at the reference mode's target level)
    x_stepped: torch.Tensor    # x1 = strong DDIM step of x_t, at level t_{i+1}
    eps_strong: torch.Tensor
    eps_weak: torch.Tensor
    weak_evaluations: int      # 0 when the weak output was reused from the strong one


def inversion_levels(
    t: int, t_next: int, inversion: str, schedule: NoiseSchedule, num_steps: int
) -> tuple[int, int]:
    """The (from, to) levels of the weak inversion.

    ``exact`` (the paper): t_{i+1} -> t_i, the exact inverse of the strong step.
    ``reference`` (the published code, diffusers >= 0.22 ``DDIMInverseScheduler.step(eps, timesteps[i+1], x1)``):
    from ``t_{i+1} - num_train_timesteps // T`` (the final level when negative) to ``t_{i+1}``, i.e. level
    t_{i+2} -> t_{i+1} on a leading grid. Harmless for most steps, mis-scaled on the last 2-3 (see METHOD.md).
    """
    if inversion == "exact":
        return t_next, t
    if inversion == "reference":
        src = min(t_next - schedule.num_train_timesteps // num_steps, schedule.num_train_timesteps - 1)
        return (src if src >= 0 else -1), t_next
    raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")


def reflect(
    x: torch.Tensor,
    t: int,
    t_next: int,
    pair: ModelPair,
    schedule: NoiseSchedule,
    *,
    invert_from: int | None = None,
    invert_to: int | None = None,
    weak_at: str = "stepped",
) -> Reflection:
    """Apply one reflection to ``x`` at level ``t``.

    Args:
        x: latent at level ``t``, shape (B, ...).
        t, t_next: the current timestep t_i and the strong step's target t_{i+1}.
        pair: strong and weak denoisers.
        invert_from, invert_to: the weak inversion's levels; default ``(t_next, t)`` (exact). See
            :func:`inversion_levels` for the published code's levels.
        weak_at: where the weak model is evaluated: ``"stepped"`` = (x1, t_i) as in the paper's Eq. 5 and the
            published code; ``"pre_step"`` = (x_t, t_i), which makes the reflection an exact identity when the
            weak model equals the strong one (the strong output is then reused, saving an evaluation).
    """
    if weak_at not in WEAK_EVALUATION_POINTS:
        raise ValueError(f"weak_at must be one of {WEAK_EVALUATION_POINTS}, got {weak_at!r}")
    invert_from = t_next if invert_from is None else invert_from
    invert_to = t if invert_to is None else invert_to
    eps_s = pair.strong(x, t)
    x1 = ddim_step(eps_s, x, t, t_next, schedule)
    if weak_at == "pre_step" and pair.weak is pair.strong:
        eps_w, weak_calls = eps_s, 0
    else:
        eps_w, weak_calls = pair.weak(x1 if weak_at == "stepped" else x, t), 1
    x_back = ddim_step(eps_w, x1, invert_from, invert_to, schedule)
    return Reflection(x=x_back, x_stepped=x1, eps_strong=eps_s, eps_weak=eps_w, weak_evaluations=weak_calls)
