"""w2sd: Weak-to-Strong Diffusion with Reflection in pure PyTorch."""

from .ddim import ddim_step, ddim_variance, split_model_output
from .denoiser import (
    Autoguidance, ClassifierFreeGuidance, CountingDenoiser, Denoiser, ModelPair, autoguidance,
    classifier_free_guidance,
)
from .errors import CheckpointError, ConfigError, LoRAError, OutputExistsError, W2SDError
from .reflection import Reflection, inversion_levels, reflect
from .sampler import (
    NFE, SampleResult, StepRecord, autoguidance_sample, ddim_sample, resolve_reflect_steps, sample, w2sd_nfe,
    w2sd_sample,
)
from .schedule import FINAL, NoiseSchedule

__version__ = "0.1.0"
