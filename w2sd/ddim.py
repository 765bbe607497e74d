"""The DDIM update between two explicit timesteps: denoising (t_to < t_from) and inversion (t_to > t_from).

One function serves both directions (Song et al. 2021, Eq. 12; with eta = 0 the update is the exact
discretisation of the probability-flow ODE in (x / sqrt(ab), sqrt(1/ab - 1)) coordinates, hence invertible):

    x0_hat = (x_from - sqrt(1 - ab_from) eps) / sqrt(ab_from)                       # predicted clean sample
    x_to   = sqrt(ab_to) x0_hat + sqrt(1 - ab_to - s^2) eps + s z,  z ~ N(0, I)     # s = eta * sigma_DDIM

    sigma_DDIM^2 = (1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)   (denoising only; diffusers' _get_variance)

Arithmetic runs in the dtype of ``x`` with float64 Python scalars for the coefficients, which reproduces
diffusers' ``DDIMScheduler.step`` and ``DDIMInverseScheduler.step`` for the same (t_from, t_to) pair.
"""

from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule


def _step_coefficients(ab_from: float, ab_to: float, eta: float, precision: str) -> tuple[float, float, float, float, float]:
    """(sqrt(ab_from), sqrt(1-ab_from), sqrt(ab_to), sqrt(1-ab_to-std^2), std) in the requested precision.

    In "float32" every operation is rounded to float32 in the order diffusers' DDIMScheduler.step performs it.
    """
    if precision == "float64":
        std = eta * math.sqrt(_variance(ab_from, ab_to)) if eta > 0 else 0.0
        return math.sqrt(ab_from), math.sqrt(1.0 - ab_from), math.sqrt(ab_to), math.sqrt(1.0 - ab_to - std**2), std
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  (diffusers' 0-dim float32 tensors)
    a_t, a_prev = f(ab_from), f(ab_to)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    std = f(0.0)
    if eta > 0:
        variance = (b_prev / b_t) * (1 - a_t / a_prev)
        std = eta * variance ** (0.5)
    coeffs = (a_t ** (0.5), b_t ** (0.5), a_prev ** (0.5), (1 - a_prev - std**2) ** (0.5), std)
    return tuple(float(c) for c in coeffs)  # type: ignore[return-value]


def _variance(ab_from: float, ab_to: float) -> float:
    return (1.0 - ab_to) / (1.0 - ab_from) * (1.0 - ab_from / ab_to)


def split_model_output(
    model_output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: str,
    sqrt_alpha_bar: float | None = None, sqrt_one_minus_alpha_bar: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a model output at level ``alpha_bar`` into ``(x0_hat, eps_hat)``.

    epsilon: x0 = (x - sqrt(1-ab) eps) / sqrt(ab);   v_prediction: x0 = sqrt(ab) x - sqrt(1-ab) v,
    eps = sqrt(ab) v + sqrt(1-ab) x;   sample: x0 = output, eps = (x - sqrt(ab) x0) / sqrt(1-ab).
    """
    a = math.sqrt(alpha_bar) if sqrt_alpha_bar is None else sqrt_alpha_bar
    b = math.sqrt(1.0 - alpha_bar) if sqrt_one_minus_alpha_bar is None else sqrt_one_minus_alpha_bar
    if prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * x - b * model_output, a * model_output + b * x
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def ddim_variance(schedule: NoiseSchedule, t_from: int, t_to: int) -> float:
    """Variance of the DDIM posterior between two levels (diffusers' ``_get_variance(t_from, t_to)``)."""
    return _variance(schedule.alpha_bar(t_from), schedule.alpha_bar(t_to))


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t_from: int,
    t_to: int,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Move ``x`` from level ``t_from`` to level ``t_to`` with the DDIM update.

    Args:
        model_output: the denoiser's output at ``(x, t_from)`` in the schedule's ``prediction_type``, shape of x.
        x: the current latent, shape (B, ...).
        t_from, t_to: train timesteps; ``-1`` is the final level (``final_alpha_cumprod``). ``t_to < t_from``
            denoises, ``t_to > t_from`` inverts (diffusers' ``DDIMInverseScheduler``), ``t_to == t_from`` is
            the identity up to rounding.
        eta: stochasticity (0 = deterministic DDIM, 1 = DDPM-like). Only allowed when denoising.
        generator / noise: the source of the eta noise (``noise`` wins if both are given).
        use_clipped_model_output: recompute eps from the clipped x0 (diffusers' option of the same name).
    Returns:
        the latent at level ``t_to``, same shape and dtype as ``x``.
    """
    if model_output.shape != x.shape:
        raise ValueError(f"model output shape {tuple(model_output.shape)} differs from latent shape {tuple(x.shape)}")
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    inverting = t_to > t_from  # FINAL (-1) sorts below every train timestep, as it should
    if eta > 0 and inverting:
        raise ValueError(
            f"eta > 0 is only allowed when denoising; DDIM inversion ({t_from} -> {t_to}) is deterministic (eta = 0)"
        )
    ab_from, ab_to = schedule.alpha_bar(t_from), schedule.alpha_bar(t_to)
    a_from, b_from, a_to, direction, std = _step_coefficients(ab_from, ab_to, eta, schedule.coefficients)
    if schedule.prediction_type == "epsilon" and not schedule.clip_sample:
        # The update is linear in (x, eps): x_to = (a_to / a_from) x + (direction - a_to b_from / a_from) eps,
        # two passes over memory instead of five (same value up to rounding).
        x_to = (x * (a_to / a_from)).add_(model_output, alpha=direction - a_to * b_from / a_from)
        return _add_noise(x_to, std, generator, noise)
    x0, eps = split_model_output(model_output, x, ab_from, schedule.prediction_type, a_from, b_from)
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        if use_clipped_model_output:
            eps = (x - a_from * x0) / b_from
    x_to = a_to * x0 + direction * eps
    return _add_noise(x_to, std, generator, noise)


def _add_noise(x_to: torch.Tensor, std: float, generator: torch.Generator | None,
               noise: torch.Tensor | None) -> torch.Tensor:
    if std > 0:
        if noise is None:
            # Draw on the generator's device (a CPU generator for CUDA latents, as diffusers' randn_tensor does).
            device = generator.device if generator is not None else x_to.device
            noise = torch.randn(x_to.shape, generator=generator, dtype=x_to.dtype, device=device).to(x_to.device)
        x_to = x_to + std * noise
    return x_to
