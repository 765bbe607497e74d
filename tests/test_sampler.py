"""The shared sampling loop: NFE accounting, lambda / reflect_at / rounds, trajectories, guidance wrappers,
and the ValueErrors that say what is allowed. Deterministic toy denoisers; no oracle library needed."""

import pytest
import torch

from w2sd import (
    FINAL, Autoguidance, CountingDenoiser, ModelPair, NoiseSchedule, autoguidance, autoguidance_sample,
    classifier_free_guidance, ddim_sample, resolve_reflect_steps, sample, w2sd_nfe, w2sd_sample,
)
from w2sd.denoiser import ClassifierFreeGuidance


def _den(scale):
    return lambda x, t: torch.tanh(scale * x) * (0.5 + t / 2000)


S = NoiseSchedule.sdxl()
X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_nfe_counts_match_the_paper_cost():
    strong, weak = CountingDenoiser(_den(0.3)), CountingDenoiser(_den(0.2))
    res = w2sd_sample(ModelPair(strong, weak), X, S.timesteps(50), S)
    assert res.nfe.as_dict() == {"main": 50, "strong": 49, "weak": 49, "total": 148}
    assert strong.calls == 99 and weak.calls == 49
    assert w2sd_nfe(50) == 148 and w2sd_nfe(50, lam=10, rounds=2) == 90


def test_lambda_selects_the_first_steps_and_rounds_repeat():
    steps = []
    res = sample(_den(0.3), X, S.timesteps(10), S, pair=ModelPair(_den(0.3), _den(0.2)), lam=3, rounds=2,
                 callback=lambda r: steps.append(r.x_reflected is not None))
    assert steps == [True] * 3 + [False] * 7
    assert res.nfe.strong == 6 and res.nfe.weak == 6 and res.nfe.main == 10
    assert resolve_reflect_steps(10, 10) == set(range(9))  # lambda = T behaves as T-1
    assert resolve_reflect_steps(10, reflect_at=[0, 4]) == {0, 4}


def test_lambda_zero_equals_plain_ddim():
    ts = S.timesteps(20)
    a = sample(_den(0.3), X, ts, S, pair=ModelPair(_den(0.3), _den(0.2)), lam=0).x
    b = ddim_sample(_den(0.3), X, ts, S).x
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lam=11), r"lambda .* \[0, T\] = \[0, 10\]"),
    (dict(lam=-1), r"lambda"),
    (dict(reflect_at=[9]), r"reflect_at entries must be step indices in \[0, T-2\]"),
    (dict(rounds=0), r"rounds .* >= 1"),
    (dict(inversion="bogus"), r"inversion must be one of"),
    (dict(weak_at="x"), r"weak_at must be one of"),
    (dict(eta=-1.0), r"eta must be"),
    (dict(lam=2, reflect_at=[1]), r"either lam"),
])
def test_invalid_sampler_arguments_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(_den(0.3), X, S.timesteps(10), S, pair=ModelPair(_den(0.3), _den(0.2)), **kwargs)


def test_invalid_step_counts():
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        S.timesteps(0)
    with pytest.raises(ValueError, match="at least one timestep"):
        sample(_den(0.3), X, [], S)
    with pytest.raises(ValueError, match="strictly descending"):
        sample(_den(0.3), X, [1, 21], S)
    with pytest.raises(ValueError, match="need a strong/weak pair"):
        sample(_den(0.3), X, S.timesteps(5), S, lam=2)


def test_eta_with_inversion_is_an_error_even_through_reflection_settings():
    # The reflection is always deterministic; eta only applies to the main step and is fine there.
    g = torch.Generator().manual_seed(1)
    res = sample(_den(0.3), X, S.timesteps(5), S, pair=ModelPair(_den(0.3), _den(0.2)), eta=0.5, generator=g)
    assert torch.isfinite(res.x).all()


def test_trajectory_records_every_step():
    res = sample(_den(0.3), X, S.timesteps(6), S, pair=ModelPair(_den(0.3), _den(0.2)), return_trajectory=True)
    traj = res.trajectory
    assert [r.t for r in traj] == S.timesteps(6)
    assert traj[-1].t_next == FINAL and traj[-1].x_reflected is None
    for a, b in zip(traj, traj[1:]):
        assert torch.equal(a.x_next, b.x)
    assert torch.equal(traj[-1].x_next, res.x)
    assert traj[0].x_stepped is not None


def test_cfg_shortcuts_run_only_the_needed_pass():
    cond, uncond = CountingDenoiser(_den(0.3)), CountingDenoiser(_den(0.1))
    assert classifier_free_guidance(cond, uncond, 1.0) is cond
    assert classifier_free_guidance(cond, uncond, 0.0) is uncond
    g = classifier_free_guidance(cond, uncond, 5.5)
    assert isinstance(g, ClassifierFreeGuidance) and g.nfe_per_call == 2
    x = X.clone()
    assert torch.allclose(g(x, 500), uncond(x, 500) + 5.5 * (cond(x, 500) - uncond(x, 500)))
    res = ddim_sample(g, X, S.timesteps(4), S)
    assert res.nfe.total == 8
    with pytest.raises(ValueError, match="finite"):
        classifier_free_guidance(cond, uncond, float("nan"))


def test_autoguidance_formula_and_cost():
    pair = ModelPair(_den(0.3), _den(0.1))
    ag = autoguidance(pair, 2.0)
    assert isinstance(ag, Autoguidance)
    e_s, e_w = pair.strong(X, 300), pair.weak(X, 300)
    assert torch.allclose(ag(X, 300), e_s + 2.0 * (e_s - e_w))
    assert autoguidance_sample(pair, 2.0, X, S.timesteps(10), S).nfe.total == 20
    assert autoguidance_sample(pair, 0.0, X, S.timesteps(10), S).nfe.total == 10


def test_x_must_have_a_batch_dimension():
    with pytest.raises(ValueError, match="batch dimension"):
        ddim_sample(_den(0.3), torch.zeros(3), S.timesteps(3), S)


def test_schedule_from_config_file_and_errors(tmp_path):
    import json

    from w2sd.errors import ConfigError

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                                "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": False}))
    s = NoiseSchedule.from_config(tmp_path)
    assert s.timesteps(5) == [801, 601, 401, 201, 1] and torch.equal(s.alphas_cumprod, S.alphas_cumprod)
    with pytest.raises(ConfigError, match="beta_schedule must be one of"):
        NoiseSchedule.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ConfigError, match="timestep_spacing"):
        NoiseSchedule.from_config({"timestep_spacing": "middle"})
    with pytest.raises(FileNotFoundError, match="scheduler config not found"):
        NoiseSchedule.from_config(tmp_path / "nope.json")


def test_float64_and_float32_coefficients_agree_to_float32_precision():
    s32 = S.with_coefficients("float32")
    ts = S.timesteps(50)
    a = ddim_sample(_den(0.3), X, ts, S).x
    b = ddim_sample(_den(0.3), X, ts, s32).x
    assert (a - b).abs().max() < 1e-5
