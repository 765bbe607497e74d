"""Learned toy pairs: small MLP eps-denoisers trained on CPU on 2-D data from an analytic mixture.

In the spirit of EDM2's autoguidance toy (research/peers.md 1.3-1.5): the strong model is wider and trained
longer, the weak one narrower and trained 8x shorter, so the weak model makes "the same kind of errors, more of
them" (both blur the thin modes). Training regresses the exact noise prediction of the noised mixture,

    loss = E_{t, x0 ~ p_real, z} || eps_theta(x_t, t) - eps*(x_t, t) ||^2,   x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) z,

with t uniform over the schedule's train timesteps (exact-target score matching, lower variance than
denoising score matching, as EDM2's toy does in score units). A trained model implements the denoiser protocol
``(x, t) -> eps`` through :class:`LearnedDenoiser`, so the W2SD sampler runs on it unchanged.

Models are saved as safetensors with their :class:`MLPConfig` (and the training schedule) as JSON metadata, and
reload without retraining; the same seed gives bit-identical weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.outputs import atomic_write
from w2sd.schedule import NoiseSchedule

from .gmm import GaussianMixture

METADATA_KEY = "w2sd_toy_mlp"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MLPConfig:
    """Architecture and training of one toy denoiser."""

    hidden: int = 64          # width of the hidden layers
    layers: int = 3           # hidden layers
    iters: int = 2400         # Adam steps
    batch: int = 1024
    lr: float = 4e-3          # peak learning rate, cosine-decayed to 5% over ``iters``
    seed: int = 0
    data_var: float = 8.0     # per-axis variance of the data, for the input scaling c_in
    num_freqs: int = 4        # Fourier features of the log-SNR

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MLPConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"unknown MLPConfig field(s) {unknown} in {METADATA_KEY} metadata")
        return cls(**data)


STRONG = MLPConfig(hidden=64, layers=3, iters=2400, seed=0)
WEAK = MLPConfig(hidden=32, layers=3, iters=300, seed=1)
# The quick preset of the benchmark: same shapes, far shorter training (a few seconds).
STRONG_QUICK = MLPConfig(hidden=64, layers=3, iters=500, batch=512, seed=0)
WEAK_QUICK = MLPConfig(hidden=32, layers=3, iters=60, batch=512, seed=1)


class ToyMLP(nn.Module):
    """eps_theta(x, ab): an MLP on [c_in x, Fourier(log SNR)] with SiLU activations, output eps (d numbers)."""

    def __init__(self, config: MLPConfig, dim: int = 2) -> None:
        super().__init__()
        self.config, self.dim = config, dim
        width_in = dim + 1 + 2 * config.num_freqs
        sizes = [width_in] + [config.hidden] * config.layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(config.hidden, dim)
        self.register_buffer("freqs", 2.0 ** torch.arange(config.num_freqs, dtype=torch.float32) / 8.0,
                             persistent=False)

    def features(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """Network input for points x (B, d) at noise levels alpha_bar (B,) or scalar."""
        ab = alpha_bar.to(x.dtype).expand(x.shape[0])                       # (B,)
        c_in = torch.rsqrt(ab * self.config.data_var + (1 - ab))           # unit-variance input
        log_snr = torch.log(ab) - torch.log1p(-ab)                          # (B,)
        ang = log_snr[:, None] * self.freqs                                  # (B, F)
        return torch.cat([x * c_in[:, None], (log_snr / 8)[:, None], ang.sin(), ang.cos()], dim=1)

    def forward(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        h = self.features(x, alpha_bar)
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h)                                                   # (B, d)


class LearnedDenoiser:
    """A trained :class:`ToyMLP` as a denoiser ``(x, t) -> eps`` under ``schedule`` (t: train timestep)."""

    def __init__(self, model: ToyMLP, schedule: NoiseSchedule) -> None:
        self.model, self.schedule = model.eval(), schedule

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = torch.tensor(self.schedule.alpha_bar(t), dtype=torch.float32)
        with torch.no_grad():
            return self.model(x.to(torch.float32), ab).to(x.dtype)

    def __repr__(self) -> str:
        c = self.model.config
        return f"LearnedDenoiser(hidden={c.hidden}, layers={c.layers}, iters={c.iters})"


def train(config: MLPConfig, data: GaussianMixture, schedule: NoiseSchedule, log=None) -> ToyMLP:
    """Train one denoiser on ``data`` (deterministic for ``config.seed`` on a given machine and thread count)."""
    if data.dim != 2 and data.dim != 1:
        raise ValueError(f"learned toys are 1-D or 2-D, got d = {data.dim}")
    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ToyMLP(config, data.dim)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
    ab_table = schedule.alphas_cumprod.to(torch.float64)
    n_train = ab_table.shape[0]
    t0 = time.perf_counter()
    for it in range(config.iters):
        lr = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(config.iters, 1))))
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = data.sample(config.batch, g)                                              # (B, d) float64
        t = torch.randint(0, n_train, (config.batch,), generator=g)
        ab = ab_table[t]                                                                # (B,)
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * z
        target = _exact_eps(data, xt, ab)                                               # (B, d)
        pred = model(xt.to(torch.float32), ab.to(torch.float32))
        loss = ((pred - target.to(torch.float32)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (it + 1) % max(config.iters // 4, 1) == 0:
            log(f"  train hidden={config.hidden} iter {it + 1}/{config.iters} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.1f} s)")
    return model.eval()


def _exact_eps(data: GaussianMixture, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """eps*(x_i, ab_i) with one noise level per sample (B, d), for an isotropic mixture: the noised components
    are N(sqrt(ab) mu_k, v_ik I) with v_ik = ab s_k^2 + 1 - ab (the per-level formula of :mod:`toy.gmm`)."""
    if not data.isotropic:
        raise ValueError("learned toys train on isotropic mixtures (stds=...), got full covariances")
    a = ab[:, None]                                                        # (B, 1)
    var = a * data.stds[None] ** 2 + (1 - a)                               # (B, K)
    m = a.sqrt()[:, :, None] * data.means[None]                            # (B, K, d)
    diff = x[:, None, :] - m                                               # (B, K, d)
    logits = data.weights.log()[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * data.dim * var.log()
    r = torch.softmax(logits, dim=-1)                                      # (B, K)
    score = -((r / var)[:, :, None] * diff).sum(1)                         # (B, d)
    return -(1 - a).sqrt() * score


# ---------------------------------------------------------------------------------------------- files
def save(model: ToyMLP, path: str | os.PathLike, schedule: NoiseSchedule | None = None) -> Path:
    """Write ``model`` as safetensors (atomic) with its config as JSON metadata."""
    from safetensors.torch import save

    meta = {METADATA_KEY: model.config.to_json(), "format_version": str(FORMAT_VERSION), "dim": str(model.dim)}
    if schedule is not None:
        meta["schedule"] = json.dumps(dict(schedule.config), sort_keys=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


def load(path: str | os.PathLike) -> ToyMLP:
    """Read a model written by :func:`save` (strict: missing, unexpected or mis-shaped tensors are named)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learned toy model not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: no '{METADATA_KEY}' metadata; not a w2sd learned toy model")
    config = MLPConfig.from_json(meta[METADATA_KEY])
    model = ToyMLP(config, int(meta.get("dim", 2)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: missing {missing}, unexpected {unexpected}, mis-shaped "
                              f"{[(k, got[k], expected[k]) for k in wrong]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass
class LearnedPair:
    strong: ToyMLP
    weak: ToyMLP
    trained: bool        # False when loaded from a cache
    seconds: float


def load_or_train_pair(folder: str | os.PathLike | None, data: GaussianMixture, schedule: NoiseSchedule,
                       strong: MLPConfig = STRONG, weak: MLPConfig = WEAK, retrain: bool = False, log=None
                       ) -> LearnedPair:
    """Load ``strong.safetensors`` / ``weak.safetensors`` from ``folder`` when their configs match, else train
    (and save there when ``folder`` is given)."""
    t0 = time.perf_counter()
    folder = Path(folder) if folder is not None else None
    models, trained = {}, False
    for role, cfg in (("strong", strong), ("weak", weak)):
        path = folder / f"{role}.safetensors" if folder is not None else None
        model = None
        if path is not None and path.is_file() and not retrain:
            model = load(path)
            if model.config != cfg:
                if log is not None:
                    log(f"  {path}: config differs from the requested one, retraining")
                model = None
        if model is None:
            model = train(cfg, data, schedule, log=log)
            trained = True
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save(model, path, schedule)
        models[role] = model
    return LearnedPair(models["strong"], models["weak"], trained, time.perf_counter() - t0)


def ring_data() -> GaussianMixture:
    """The learned pair's data: the 2-D ring of 8 (radius 4, std 0.3, uniform) of the benchmark."""
    from .bench.cases import ring8

    return ring8().real


def learned_case(pair: LearnedPair, data: GaussianMixture | None = None):
    """The learned pair as a benchmark case (W2SD's effect on trained models is an open question)."""
    from w2sd.denoiser import ModelPair

    from .bench.cases import OPEN, BenchCase

    data = data if data is not None else ring_data()
    s, w = pair.strong.config, pair.weak.config

    def make(schedule: NoiseSchedule) -> ModelPair:
        return ModelPair(LearnedDenoiser(pair.strong, schedule), LearnedDenoiser(pair.weak, schedule))

    return BenchCase("learned_ring8", f"learned MLP pair on the 2-D ring of 8: strong {s.hidden} wide x {s.layers} "
                     f"layers, {s.iters} iters; weak {w.hidden} wide, {w.iters} iters (real = the analytic ring)",
                     data, make, OPEN, "sliced_w2",
                     meta={"strong_config": asdict(s), "weak_config": asdict(w),
                           "pair_seconds": round(pair.seconds, 1), "pair_trained": pair.trained})
