"""Learned toy pairs: deterministic training, safetensors round trip, strict loading, W2SD on MLP denoisers.

Oracles: the exact eps of toy.gmm.GaussianMixture (float64) for the batched training target; safetensors
(version in the messages) for the file format; seeds fixed per test.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from toy import learned as L
from toy.bench.suite import bench_schedule
from w2sd.denoiser import ModelPair
from w2sd.errors import CheckpointError
from w2sd.sampler import ddim_sample, w2sd_nfe, w2sd_sample

TINY = L.MLPConfig(hidden=16, layers=2, iters=25, batch=128, seed=3)   # a few hundred ms to train
EPS_TOL = 1e-12  # batched per-sample-level eps vs GaussianMixture.eps at each level (float64; measured ~1e-14)


@pytest.fixture(scope="module")
def schedule():
    return bench_schedule()


@pytest.fixture(scope="module")
def tiny(schedule):
    return L.train(TINY, L.ring_data(), schedule)


def test_training_is_deterministic_for_a_seed(tiny, schedule):
    again = L.train(TINY, L.ring_data(), schedule)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    other = L.train(dataclasses.replace(TINY, seed=4), L.ring_data(), schedule)
    assert not torch.equal(other.out.weight, tiny.out.weight)


def test_training_lowers_the_loss(schedule):
    """A longer-trained model predicts the exact eps better than its initialisation (it learns something)."""
    data = L.ring_data()
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(2000, g)
    ab = schedule.alphas_cumprod[torch.randint(0, 1000, (2000,), generator=g)]
    xt = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    target = L._exact_eps(data, xt, ab).float()
    err = lambda m: float(((m(xt.float(), ab.float()).detach() - target) ** 2).mean())  # noqa: E731
    untrained = L.train(dataclasses.replace(TINY, iters=0), data, schedule)
    trained = L.train(dataclasses.replace(TINY, iters=150), data, schedule)
    assert err(trained) < 0.5 * err(untrained)


def test_batched_exact_eps_matches_mixture(schedule):
    data = L.ring_data()
    x = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    ab = torch.linspace(0.01, 0.99, 40, dtype=torch.float64)
    ref = torch.stack([data.eps(x[i:i + 1], float(ab[i]))[0] for i in range(40)])
    assert torch.allclose(L._exact_eps(data, x, ab), ref, atol=EPS_TOL, rtol=0)


def test_save_load_round_trip(tiny, schedule, tmp_path):
    path = L.save(tiny, tmp_path / "m.safetensors", schedule)
    back = L.load(path)
    assert back.config == TINY
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(8, 2, dtype=torch.float64)
    a, b = L.LearnedDenoiser(tiny, schedule), L.LearnedDenoiser(back, schedule)
    assert torch.equal(a(x, 500), b(x, 500)) and a(x, 500).dtype == torch.float64
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta[L.METADATA_KEY])["hidden"] == TINY.hidden, safetensors.__version__
    assert json.loads(meta["schedule"])["beta_schedule"] == "linear"


def test_load_is_strict(tiny, tmp_path):
    path = L.save(tiny, tmp_path / "m.safetensors")
    state = load_file(str(path))
    meta = {L.METADATA_KEY: TINY.to_json(), "dim": "2"}
    bad = dict(state)
    bad["out.weight"] = torch.zeros(3, TINY.hidden)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="out.weight"):
        L.load(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.items() if k != "out.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="out.bias"):
        L.load(tmp_path / "missing.safetensors")
    save_file(state, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match=L.METADATA_KEY):
        L.load(tmp_path / "nometa.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        L.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        L.load(tmp_path / "absent.safetensors")


def test_runs_through_the_w2sd_sampler(tiny, schedule):
    weak = L.train(dataclasses.replace(TINY, hidden=8, seed=5), L.ring_data(), schedule)
    pair = ModelPair(L.LearnedDenoiser(tiny, schedule), L.LearnedDenoiser(weak, schedule))
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = schedule.timesteps(10)
    res = w2sd_sample(pair, x, ts, schedule)
    assert res.x.shape == x.shape and bool(torch.isfinite(res.x).all())
    assert res.nfe.total == w2sd_nfe(10) == 28 and res.nfe.weak == 9
    plain = ddim_sample(pair.strong, x, ts, schedule)
    assert not torch.allclose(plain.x, res.x)  # the reflection does something on a real model pair


def test_load_or_train_pair_caches(schedule, tmp_path):
    s, w = TINY, dataclasses.replace(TINY, hidden=8, seed=5)
    first = L.load_or_train_pair(tmp_path, L.ring_data(), schedule, strong=s, weak=w)
    second = L.load_or_train_pair(tmp_path, L.ring_data(), schedule, strong=s, weak=w)
    assert first.trained and not second.trained
    assert torch.equal(first.strong.out.weight, second.strong.out.weight)
    third = L.load_or_train_pair(tmp_path, L.ring_data(), schedule, strong=dataclasses.replace(s, iters=26), weak=w)
    assert third.trained  # a different config is not silently reused
