"""Noise schedules (betas -> alphas_cumprod) and inference timestep grids.

Vocabulary follows diffusers (``alphas_cumprod``, ``timestep_spacing``, ``steps_offset``); the design does not:
a :class:`NoiseSchedule` is an immutable table, and the DDIM update (:mod:`w2sd.ddim`) takes both timesteps
explicitly instead of keeping a step cursor.

Timestep convention: a timestep is an integer train index ``0 <= t < num_train_timesteps``. The value
``FINAL = -1`` names the fully denoised level after the last step, whose ``alpha_bar`` is
``final_alpha_cumprod`` (1.0 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``, as in diffusers).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from .errors import ConfigError

FINAL = -1
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# "float64": DDIM coefficients in double precision (the default; exact for float64 toys).
# "float32": coefficients rounded to float32 at every operation exactly as diffusers' 0-dim float32 tensors do,
# which reproduces DDIMScheduler / DDIMInverseScheduler bit for bit even on float64 latents.
COEFFICIENT_PRECISIONS = ("float64", "float32")

# Keys of a diffusers scheduler_config.json that DDIM understands; everything else (Euler-only keys such as
# interpolation_type, use_karras_sigmas, skip_prk_steps, _class_name) is ignored on purpose.
_CONFIG_KEYS = (
    "beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "timestep_spacing", "steps_offset",
    "set_alpha_to_one", "prediction_type", "clip_sample", "clip_sample_range", "trained_betas",
)


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """Betas exactly as diffusers computes them (float32), shape (num_train_timesteps,)."""
    n = num_train_timesteps
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021) cosine alpha_bar, betas capped at 0.999.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ConfigError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """A variance-preserving noise schedule: ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps``.

    ``alphas_cumprod`` is stored in float64 (converted from diffusers' float32 table, so values agree with
    diffusers to the last float32 bit); DDIM coefficients are computed from it in float64.
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    coefficients: str = "float64"
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.timestep_spacing not in SPACINGS:
            raise ConfigError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.coefficients not in COEFFICIENT_PRECISIONS:
            raise ConfigError(f"coefficients must be one of {COEFFICIENT_PRECISIONS}, got {self.coefficients!r}")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be >= 0, got {self.steps_offset}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def create(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        trained_betas: Any = None,
        coefficients: str = "float64",
    ) -> "NoiseSchedule":
        """Build a schedule; the defaults are Stable Diffusion XL's (scheduler_config.json of SDXL base 1.0)."""
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32)
            if betas.shape != (num_train_timesteps,):
                raise ConfigError(
                    f"trained_betas has shape {tuple(betas.shape)}, expected ({num_train_timesteps},)"
                )
        else:
            if not (0 < beta_start < 1 and 0 < beta_end < 1):
                raise ConfigError(f"beta_start and beta_end must lie in (0, 1), got {beta_start}, {beta_end}")
            betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        config = dict(
            beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
            num_train_timesteps=num_train_timesteps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
        )
        return cls(
            alphas_cumprod=alphas_cumprod.to(torch.float64),
            final_alpha_cumprod=final,
            timestep_spacing=timestep_spacing,
            steps_offset=int(steps_offset),
            prediction_type=prediction_type,
            clip_sample=bool(clip_sample),
            clip_sample_range=float(clip_sample_range),
            coefficients=coefficients,
            config=config,
        )

    @classmethod
    def sdxl(cls) -> "NoiseSchedule":
        """The SDXL base schedule: scaled_linear 0.00085..0.012, 1000 steps, leading, offset 1, epsilon."""
        return cls.create()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, coefficients: str = "float64"
                    ) -> "NoiseSchedule":
        """Build from a diffusers ``scheduler_config.json`` (a dict, a file, or a folder holding one).

        SDXL folders ship an EulerDiscreteScheduler config; DDIM reuses its schedule keys and ignores the rest.
        diffusers' DDIM defaults fill in missing keys, except that a config without ``steps_offset`` gets 0.
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"scheduler config not found: {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"scheduler config {path} is not valid JSON: {e}") from None
            if not isinstance(config, Mapping):
                raise ConfigError(f"scheduler config {path} must hold a JSON object")
        kwargs: dict[str, Any] = dict(
            beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
            timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, prediction_type="epsilon",
            clip_sample=True, clip_sample_range=1.0,
        )  # diffusers DDIMScheduler() defaults
        for key in _CONFIG_KEYS:
            if key in config and config[key] is not None:
                kwargs[key] = config[key]
        if "set_alpha_to_zero" in config and "set_alpha_to_one" not in config:  # deprecated inverse-scheduler key
            kwargs["set_alpha_to_one"] = bool(config["set_alpha_to_zero"])
        return cls.create(**kwargs, coefficients=coefficients)

    def with_coefficients(self, coefficients: str) -> "NoiseSchedule":
        """The same schedule with another coefficient precision (see ``COEFFICIENT_PRECISIONS``)."""
        return replace(self, coefficients=coefficients)

    # ------------------------------------------------------------------ queries
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at train timestep ``t``; ``t < 0`` (e.g. :data:`FINAL`) gives ``final_alpha_cumprod``."""
        t = int(t)
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {self.num_train_timesteps - 1}]")
        return self.final_alpha_cumprod if t < 0 else float(self.alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        """Noise std of the VP marginal, sqrt(1 - alpha_bar)."""
        return math.sqrt(1.0 - self.alpha_bar(t))

    def timesteps(self, num_steps: int, spacing: str | None = None) -> list[int]:
        """Descending inference grid of ``num_steps`` train timesteps (diffusers' ``set_timesteps``)."""
        n_train = self.num_train_timesteps
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"number of steps T must be an integer >= 1, got {num_steps!r}")
        if num_steps > n_train:
            raise ValueError(f"number of steps T={num_steps} exceeds num_train_timesteps={n_train}")
        spacing = spacing or self.timestep_spacing
        if spacing == "leading":
            ratio = n_train // num_steps
            ts = [i * ratio + self.steps_offset for i in range(num_steps)][::-1]
        elif spacing == "trailing":
            ratio = n_train / num_steps
            # round(arange(T, 0, -ratio)) - 1, with numpy's round-half-to-even
            ts = [int(_round_half_even(n_train - i * ratio)) - 1 for i in range(num_steps)]
        elif spacing == "linspace":
            ts = [int(_round_half_even(i * (n_train - 1) / (num_steps - 1))) if num_steps > 1 else 0
                  for i in range(num_steps)][::-1]
        else:
            raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
        if ts[0] >= n_train:
            raise ValueError(
                f"steps_offset={self.steps_offset} pushes the first timestep to {ts[0]} >= {n_train}"
            )
        return ts

    def diffusers_prev_timestep(self, t: int, num_steps: int) -> int:
        """diffusers' arithmetic neighbour ``t - num_train_timesteps // T`` (negative -> :data:`FINAL`)."""
        prev = int(t) - self.num_train_timesteps // num_steps
        return prev if prev >= 0 else FINAL


def _round_half_even(x: float) -> float:
    """numpy.round semantics for a scalar (banker's rounding), as diffusers uses np.round."""
    return float(round(x))  # Python's round is half-to-even too
