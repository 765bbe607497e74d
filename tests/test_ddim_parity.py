"""Schedule, timestep grids and DDIM steps against diffusers' DDIMScheduler / DDIMInverseScheduler.

Oracle: diffusers (version printed in the assertion messages), SDXL base scheduler config (research/sdxl.md 1.1).
Random tensors from torch.manual_seed(0); all comparisons in float64 with tolerance STEP_TOL.
"""

import itertools

import diffusers
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from w2sd import FINAL, ModelPair, NoiseSchedule, ddim_sample, ddim_step, sample

STEP_TOL = 1e-6          # issue 2: per-step max abs difference <= 1e-6 in float64
STEPS = (1, 2, 10, 30, 50)
SPACINGS = ("leading", "trailing", "linspace")
SDXL_SCHEDULER_CONFIG = {  # scheduler/scheduler_config.json of SDXL base 1.0 (EulerDiscreteScheduler)
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
V = diffusers.__version__


def _configs(spacing, prediction_type="epsilon", **over):
    cfg = dict(SDXL_SCHEDULER_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type, **over)
    return cfg, DDIMScheduler.from_config(cfg), NoiseSchedule.from_config(cfg, coefficients="float32")


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    cfg, ref, ours = _configs("leading", beta_schedule=beta_schedule)
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod), f"diffusers {V}"
    assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing,T", itertools.product(SPACINGS, STEPS + (4, 999)))
def test_timestep_grids_match_diffusers(spacing, T):
    _, ref, ours = _configs(spacing)
    ref.set_timesteps(T)
    assert ours.timesteps(T) == ref.timesteps.tolist(), f"diffusers {V}, {spacing}, T={T}"


def test_known_grids():
    # research/sdxl.md 1.3 [verified with diffusers 0.42.1] and STYLE.md's vector.
    s = NoiseSchedule.sdxl()
    assert s.timesteps(5) == [801, 601, 401, 201, 1]
    assert s.timesteps(50)[:2] == [981, 961] and s.timesteps(50)[-1] == 1
    assert s.timesteps(30, "trailing")[:3] == [999, 966, 932]
    assert s.timesteps(50, "linspace")[:3] == [999, 979, 958]


@pytest.mark.parametrize(
    "spacing,T,prediction_type",
    [(sp, T, "epsilon") for sp in SPACINGS for T in STEPS] + [("leading", 10, "v_prediction"), ("leading", 10, "sample")],
)
def test_ddim_step_matches_diffusers(spacing, T, prediction_type):
    """Our step with diffusers' arithmetic target (t - 1000//T) equals DDIMScheduler.step at every grid point."""
    _, ref, ours = _configs(spacing, prediction_type)
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    for t in ref.timesteps.tolist():
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x).prev_sample
        got = ddim_step(out, x, t, ours.diffusers_prev_timestep(t, T), ours)
        assert (got - expected).abs().max() <= STEP_TOL, f"diffusers {V}: t={t}"


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_with_eta_matches_diffusers(eta):
    _, ref, ours = _configs("leading")
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    for t in ref.timesteps.tolist():
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        got = ddim_step(out, x, t, ours.diffusers_prev_timestep(t, 10), ours, eta=eta, noise=z)
        assert (got - expected).abs().max() <= STEP_TOL, f"diffusers {V}: t={t}, eta={eta}"


@pytest.mark.parametrize("clip,alpha_one", [(True, False), (False, True), (True, True)])
def test_ddim_step_clip_and_final_alpha_match_diffusers(clip, alpha_one):
    _, ref, ours = _configs("leading", clip_sample=clip, set_alpha_to_one=alpha_one)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    for t in ref.timesteps.tolist():
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x).prev_sample
        got = ddim_step(out, x, t, ours.diffusers_prev_timestep(t, 10), ours)
        assert (got - expected).abs().max() <= STEP_TOL, f"diffusers {V}: t={t}"


@pytest.mark.parametrize("spacing,T", [(sp, T) for sp in ("leading", "trailing") for T in STEPS])
def test_inverse_step_matches_diffusers(spacing, T):
    """DDIMInverseScheduler.step(eps, s, x) moves level s - 1000//T (final level if < 0) to level s."""
    cfg, _, ours = _configs(spacing)
    inv = DDIMInverseScheduler.from_config(cfg)
    inv.set_timesteps(T)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    for s in inv.timesteps.tolist():
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = inv.step(out, s, x).prev_sample
        src = min(s - 1000 // T, 999)
        got = ddim_step(out, x, src if src >= 0 else FINAL, s, ours)
        assert (got - expected).abs().max() <= STEP_TOL, f"diffusers {V}: s={s}"


def test_inversion_undoes_step_with_same_eps():
    s = NoiseSchedule.sdxl()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ts = s.timesteps(50)
    for t, t_next in zip(ts, ts[1:] + [FINAL]):
        back = ddim_step(eps, ddim_step(eps, x, t, t_next, s), t_next, t, s)
        assert (back - x).abs().max() <= 1e-10


def test_inversion_with_eta_is_an_error():
    s = NoiseSchedule.sdxl()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="eta > 0 is only allowed when denoising"):
        ddim_step(x, x, 21, 41, s, eta=0.5)


class _FixedDenoiser:
    """A deterministic nonlinear eps(x, t), the same function for diffusers' loop and ours."""

    def __call__(self, x, t):
        return torch.tanh(0.3 * x + 0.001 * float(t)) * 0.9


@pytest.mark.parametrize("spacing,T", [("leading", 50), ("trailing", 30), ("linspace", 10), ("trailing", 10)])
def test_whole_loop_matches_diffusers_step_for_step(spacing, T):
    """Plain DDIM with diffusers' arithmetic targets equals diffusers' own loop at every step."""
    _, ref, ours = _configs(spacing)
    ref.set_timesteps(T)
    model = _FixedDenoiser()
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected, x = [], x0
    for t in ref.timesteps:
        x = ref.step(model(x, int(t)), t, x).prev_sample
        expected.append(x)
    got = []
    res = ddim_sample(model, x0, ours.timesteps(T), ours, step_targets="diffusers",
                      callback=lambda r: got.append(r.x_next))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max() <= STEP_TOL, f"diffusers {V}: step {i}"
    assert res.nfe.total == T


def test_grid_targets_differ_from_diffusers_arithmetic_when_T_does_not_divide_1000():
    s = NoiseSchedule.from_config(dict(SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing"))
    ts = s.timesteps(30)
    assert ts[1] == 966 and ts[2] == 932 and s.diffusers_prev_timestep(966, 30) == 933
    model = _FixedDenoiser()
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grid = ddim_sample(model, x0, ts, s).x
    arith = ddim_sample(model, x0, ts, s, step_targets="diffusers").x
    assert not torch.allclose(grid, arith)


def test_reference_reflection_loop_matches_published_call_pattern():
    """W2SD in reference mode equals the published loop on diffusers' schedulers (research/sdxl.md 1.6)."""
    cfg, ref, ours = _configs("leading")
    inv = DDIMInverseScheduler.from_config(cfg)
    T = 50
    ref.set_timesteps(T)
    inv.set_timesteps(T)
    strong = _FixedDenoiser()
    weak = lambda x, t: 0.8 * torch.tanh(0.25 * x + 0.002 * float(t))  # noqa: E731
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ts = ref.timesteps.tolist()
    x = x0
    for i, t in enumerate(ts):
        if i < T - 1:
            x1 = ref.step(strong(x, t), t, x).prev_sample
            x = inv.step(weak(x1, t), ts[i + 1], x1).prev_sample
        x = ref.step(strong(x, t), t, x).prev_sample
    got = sample(strong, x0, ours.timesteps(T), ours, pair=ModelPair(strong, weak), inversion="reference")
    assert (got.x - x).abs().max() <= STEP_TOL
    assert got.nfe.total == 148
    # Exact mode = the same loop with the inverse call at timesteps[i] (t_{i+1} -> t_i).
    x = x0
    for i, t in enumerate(ts):
        if i < T - 1:
            x1 = ref.step(strong(x, t), t, x).prev_sample
            x = inv.step(weak(x1, t), ts[i], x1).prev_sample
        x = ref.step(strong(x, t), t, x).prev_sample
    got = sample(strong, x0, ours.timesteps(T), ours, pair=ModelPair(strong, weak), inversion="exact")
    assert (got.x - x).abs().max() <= STEP_TOL
