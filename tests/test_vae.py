"""Parity tests of ``w2sd.sdxl.vae`` against diffusers' ``AutoencoderKL`` (test-only oracle).

Oracle: diffusers ``AutoencoderKL`` / ``VaeImageProcessor`` (version in ``ORACLE``), tiny random models built from
sdxl.md §8.2 with ``torch.manual_seed(SEED)``, saved with ``save_pretrained`` (safetensors) and loaded with
``safetensors.torch.load_file`` into our model with a strict ``load_state_dict``. CPU, fp32 unless stated.
"""

from __future__ import annotations

import dataclasses
import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import load_file

from w2sd.errors import CheckpointError
from w2sd.sdxl.vae import AutoencoderKL, VAEConfig, tile_spans, tiled_decode
from w2sd.sdxl.vae.blocks import VAE_NORM_EPS

ORACLE = f"diffusers {diffusers.__version__}, torch {torch.__version__}"
SEED = 0

# fp32 parity: same operations, possibly different summation order (GroupNorm over (B,C,H,W) vs (B,C,HW)).
PARITY_ATOL = 1e-5
# Sliced vs batched decode: identical maths per sample, but on CPU the conv (oneDNN / MKL), GroupNorm and SiLU
# kernels pick batch-size-dependent blocking, threading and SIMD tail handling, so results differ by float32
# rounding (measured <= 3e-6 on torch 2.13 CPU, also with 1 thread and oneDNN disabled). Per sample, the sliced
# result is bit-identical to decoding that sample alone (asserted with torch.equal).
SLICED_ATOL = 1e-5
# fp16 model with force_upcast vs diffusers' own upcast route (whole VAE .to(float32), same fp16-rounded weights):
# the only difference is rounding our fp32 result to the caller's fp16, half an fp16 ulp = 4.9e-4 for |x| in [1, 2).
FP16_ROUNDING_ATOL = 1e-3
# fp16 model (weights rounded to fp16, rel. 4.9e-4) with force_upcast vs the fp32 model: sdxl.md §7 suggests
# rtol 1e-2 for fp16 checks; outputs here are O(1).
FP16_VS_FP32_ATOL = 1e-2
# Tiled vs untiled decode. Tiling is approximate by design: every tile has its own GroupNorm statistics and
# mid-block attention context and sees zero padding at its borders. On this random 2-channels-per-group model the
# differences are large (RMS ~0.2 x the output's std, measured for seeds 0-2); a trained VAE is far smoother. We
# require (a) RMS error <= TILED_REL_RMS_TOL x std of the untiled image and (b) no worse than diffusers'
# ``tiled_decode`` with the same tile geometry (16-latent tiles, 4-latent overlap) on the same latents.
TILED_REL_RMS_TOL = 0.3
# Blending machinery with a pointwise "decoder": the only error is float32 rounding of the weighted sum of <= 4
# tiles and the division by the summed weights (a few ulps, eps32 = 1.2e-7, relative to values of magnitude ~3).
BLEND_ATOL, BLEND_RTOL = 1e-6, 2e-6

TINY_KW = dict(  # sdxl.md §8.2 (same topology as SDXL's VAE, 2 levels)
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=4,
    scaling_factor=0.13025,
    force_upcast=True,
)
THREE_LEVEL_KW = dict(TINY_KW, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.18215, layers_per_block=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a shared 2-core machine OpenMP synchronisation costs ~20x more than the maths, so
    run this module single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(tmp_path_factory, name: str, **kw):
    """Seeded diffusers VAE saved with save_pretrained; returns (diffusers model, our strictly loaded model, dir)."""
    torch.manual_seed(SEED)
    ref = DiffusersAutoencoderKL(**kw).eval()
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path, safe_serialization=True)
    cfg = VAEConfig.from_dict(json.loads((path / "config.json").read_text()))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours, path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build(tmp_path_factory, "vae_tiny", **TINY_KW)


@pytest.fixture(scope="module")
def three_level(tmp_path_factory):
    return _build(tmp_path_factory, "vae_three", **THREE_LEVEL_KW)


def _latents(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _images(shape, seed=2):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------- config


def test_config_from_saved_json(tiny):
    """Fields read from the config.json diffusers wrote (oracle: save_pretrained, ORACLE)."""
    _, ours, path = tiny
    cfg = ours.config
    saved = json.loads((path / "config.json").read_text())
    assert cfg.block_out_channels == (8, 16) and cfg.latent_channels == 4 and cfg.norm_num_groups == 4
    assert cfg.scaling_factor == 0.13025 and cfg.shift_factor is None and cfg.force_upcast is True
    assert cfg.sample_size == saved["sample_size"] and cfg.use_quant_conv and cfg.use_post_quant_conv
    assert ours.scale_factor == 2 and cfg.scale_factor == 2
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VAEConfig.from_dict({"sample_size": [64, 96]}).sample_size == (64, 96)
    # SD 1.5's default scaling factor (diffusers' constructor default).
    assert VAEConfig.from_dict({}).scaling_factor == 0.18215


@pytest.mark.parametrize("key,value", [
    ("act_fn", "gelu"),
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("latents_mean", [0.0] * 4),
    ("norm_num_groups", 3),
    ("some_future_option", 1),
    ("_class_name", "AutoencoderTiny"),
    ("scaling_factor", 0),
])
def test_config_rejects_unsupported(key, value):
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_KW.items()}
    d[key] = value
    with pytest.raises(CheckpointError, match=key):
        VAEConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------- loading


def test_state_dict_names_and_eps_mirror_diffusers(tiny):
    ref, ours, path = tiny
    sd = load_file(path / "diffusion_pytorch_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in sd and "decoder.up_blocks.0.upsamplers.0.conv.bias" in sd
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == VAE_NORM_EPS == 1e-6 for m in norms)


def test_strict_load_rejects_mismatch(tiny, three_level):
    _, ours, path = tiny
    sd = load_file(path / "diffusion_pytorch_model.safetensors")
    bad = dict(sd)
    del bad["decoder.conv_in.weight"]
    bad["decoder.extra.weight"] = torch.zeros(1)
    bad["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(RuntimeError):
        AutoencoderKL(ours.config).load_state_dict(bad)
    with pytest.raises(CheckpointError) as e:
        AutoencoderKL.from_state_dict(ours.config, bad)
    msg = str(e.value)
    assert "decoder.conv_in.weight" in msg and "decoder.extra.weight" in msg and "quant_conv.weight" in msg
    with pytest.raises(CheckpointError, match="missing keys"):  # 2-level weights into a 3-level config
        AutoencoderKL.from_state_dict(three_level[1].config, sd)


def test_from_state_dict_keeps_file_dtype(tiny):
    _, ours, path = tiny
    sd = {k: v.half() for k, v in load_file(path / "diffusion_pytorch_model.safetensors").items()}
    m = AutoencoderKL.from_state_dict(ours.config, sd)
    assert m.dtype == torch.float16 and all(p.dtype == torch.float16 for p in m.parameters())
    assert torch.equal(m.decoder.conv_out.weight, sd["decoder.conv_out.weight"])
    m32 = AutoencoderKL.from_state_dict(ours.config, sd, dtype=torch.float32)
    assert m32.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- parity


@torch.no_grad()
def test_encode_matches_diffusers(tiny):
    """Posterior mean / clamped logvar / sample for batch 2, non-square 24x40 (oracle: ORACLE, seed SEED)."""
    ref, ours, _ = tiny
    x = _images((2, 3, 24, 40))
    dist_ref = ref.encode(x).latent_dist
    dist = ours.encode(x)
    assert dist.mean.shape == (2, 4, 12, 20)
    assert (dist.mean - dist_ref.mean).abs().max() <= PARITY_ATOL
    assert (dist.logvar - dist_ref.logvar).abs().max() <= PARITY_ATOL
    assert torch.equal(ours.encode_mean(x), dist.mean)
    s_ref = dist_ref.sample(generator=torch.Generator().manual_seed(7))
    s = ours.encode_sample(x, torch.Generator().manual_seed(7))
    assert (s - s_ref).abs().max() <= PARITY_ATOL


@torch.no_grad()
def test_decode_matches_diffusers(tiny):
    ref, ours, _ = tiny
    z = _latents((2, 4, 12, 20))
    out = ours.decode(z)
    assert out.shape == (2, 3, 24, 40) and out.dtype == torch.float32
    assert (out - ref.decode(z).sample).abs().max() <= PARITY_ATOL
    big = ours.decode(z * 50)
    assert torch.equal(big, ours.decode(z * 50)) and big.abs().max() > 1  # not clamped to [-1, 1]


@torch.no_grad()
def test_latents_to_image_matches_postprocess(tiny):
    """Our [0, 1] helper equals ``VaeImageProcessor.postprocess(decode(z / sf), output_type="pt")`` (ORACLE)."""
    ref, ours, _ = tiny
    z = _latents((2, 4, 12, 20)) * 3
    proc = VaeImageProcessor(vae_scale_factor=ours.scale_factor)
    want = proc.postprocess(ref.decode(z / ref.config.scaling_factor).sample, output_type="pt")
    got = ours.latents_to_image(z)
    assert got.min() >= 0 and got.max() <= 1
    assert (got - want).abs().max() <= PARITY_ATOL


@torch.no_grad()
def test_image_to_latents_matches_diffusers(tiny):
    """``(encode(preprocess(img)).mode() - shift) * sf`` with diffusers' preprocess of a [0, 1] tensor (ORACLE)."""
    ref, ours, _ = tiny
    img = (_images((2, 3, 24, 40), seed=3) + 1) / 2
    proc = VaeImageProcessor(vae_scale_factor=ours.scale_factor)
    want = ref.encode(proc.preprocess(img)).latent_dist.mode() * ref.config.scaling_factor
    assert (ours.image_to_latents(img) - want).abs().max() <= PARITY_ATOL
    want_s = ref.encode(proc.preprocess(img)).latent_dist.sample(torch.Generator().manual_seed(5))
    got_s = ours.image_to_latents(img, torch.Generator().manual_seed(5), sample=True)
    assert (got_s - want_s * ref.config.scaling_factor).abs().max() <= PARITY_ATOL


@torch.no_grad()
def test_shift_factor_is_applied(tiny):
    """SD3/Flux-style configs: model latents are ``(z - shift) * sf``; no diffusers SDXL oracle, formula check."""
    _, ours, _ = tiny
    cfg = dataclasses.replace(ours.config, shift_factor=0.1159, scaling_factor=1.5305)
    m = AutoencoderKL(cfg).eval()
    m.load_state_dict(ours.state_dict())
    z = _latents((1, 4, 8, 10))
    want = (ours.decode(z / 1.5305 + 0.1159) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(m.latents_to_image(z), want)
    img = (_images((1, 3, 16, 20)) + 1) / 2
    assert torch.allclose(m.image_to_latents(img), (ours.encode_mean(img * 2 - 1) - 0.1159) * 1.5305)


@torch.no_grad()
def test_three_level_config_parity_and_scale_factor(three_level):
    """SD-style 3-level VAE (8,16,16), layers_per_block 2: factor 4 (SDXL's 4 levels give 8) (ORACLE, SEED)."""
    ref, ours, _ = three_level
    assert ours.scale_factor == 4
    x = _images((2, 3, 24, 40))
    assert ours.encode(x).mean.shape == (2, 4, 6, 10)
    assert (ours.encode(x).mean - ref.encode(x).latent_dist.mean).abs().max() <= PARITY_ATOL
    z = _latents((2, 4, 6, 10))
    out = ours.decode(z)
    assert out.shape == (2, 3, 24, 40)
    assert (out - ref.decode(z).sample).abs().max() <= PARITY_ATOL


@torch.no_grad()
def test_options_without_attention_and_quant_convs(tmp_path_factory):
    """mid_block_add_attention / use_quant_conv / use_post_quant_conv false (ORACLE, SEED)."""
    ref, ours, _ = _build(tmp_path_factory, "vae_opts", **TINY_KW, mid_block_add_attention=False,
                          use_quant_conv=False, use_post_quant_conv=False)
    assert ours.quant_conv is None and not any("attentions" in k for k in ours.state_dict())
    x = _images((1, 3, 16, 12))
    assert (ours(x) - ref(x).sample).abs().max() <= PARITY_ATOL


def test_bad_inputs_name_the_argument(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        ours.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        ours.decode(torch.zeros(1, 4, 8, 8), tile=True, tile_size=4, overlap=4)


# ---------------------------------------------------------------------------------------------------- fp16


@torch.no_grad()
def test_fp16_force_upcast_matches_diffusers_upcast_route(tiny):
    """fp16 weights + force_upcast: computes in fp32, returns fp16, weights untouched. Oracle: diffusers' pipeline
    route for ``force_upcast`` (fp16 VAE converted to fp32, then decode), ORACLE."""
    ref, ours, path = tiny
    sd16 = {k: v.half() for k, v in load_file(path / "diffusion_pytorch_model.safetensors").items()}
    m16 = AutoencoderKL.from_state_dict(ours.config, sd16)
    assert m16.compute_dtype == torch.float32
    z16 = _latents((2, 4, 12, 20)).half()
    out = m16.decode(z16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float16 for p in m16.parameters())  # no persistent upcast
    up = DiffusersAutoencoderKL.from_pretrained(path).half().to(torch.float32).eval()
    want = up.decode(z16.float()).sample
    assert (out.float() - want).abs().max() <= FP16_ROUNDING_ATOL
    assert (out.float() - ours.decode(z16.float())).abs().max() <= FP16_VS_FP32_ATOL
    x16 = _images((2, 3, 24, 40)).half()
    mean16 = m16.encode_mean(x16)
    assert mean16.dtype == torch.float16
    assert (mean16.float() - up.encode(x16.float()).latent_dist.mean).abs().max() <= FP16_ROUNDING_ATOL


@torch.no_grad()
def test_fp16_overflow_needs_the_upcast(tiny):
    """Weights scaled so activations exceed fp16's range (65504), as in the SDXL VAE (sdxl.md §5.4): fp16 compute
    gives NaN/inf, force_upcast gives a finite result equal to the fp32 model within FP16_VS_FP32_ATOL."""
    _, ours, _ = tiny
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["decoder.conv_in.weight"] *= 1e5
    sd["decoder.conv_in.bias"] *= 1e5
    m32 = AutoencoderKL.from_state_dict(ours.config, sd)
    z = _latents((2, 4, 12, 20))
    want = m32.decode(z)
    sd16 = {k: v.half() for k, v in sd.items()}
    assert torch.isfinite(sd16["decoder.conv_in.weight"]).all()
    no_up = AutoencoderKL.from_state_dict(dataclasses.replace(ours.config, force_upcast=False), sd16)
    assert no_up.compute_dtype == torch.float16
    assert not torch.isfinite(no_up.decode(z.half())).all()
    m16 = AutoencoderKL.from_state_dict(ours.config, sd16)
    out = m16.decode(z.half())
    assert torch.isfinite(out).all()
    assert (out.float() - want).abs().max() <= FP16_VS_FP32_ATOL


# ---------------------------------------------------------------------------------------------------- slicing / tiling


@torch.no_grad()
def test_sliced_decode(tiny):
    _, ours, _ = tiny
    z = _latents((3, 4, 12, 20))
    batch_sizes = []
    hook = ours.decoder.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0].shape[0]))
    try:
        sliced = ours.decode(z, sliced=True)
    finally:
        hook.remove()
    assert batch_sizes == [1, 1, 1]
    for i in range(3):
        assert torch.equal(sliced[i:i + 1], ours.decode(z[i:i + 1]))
    assert (sliced - ours.decode(z)).abs().max() <= SLICED_ATOL
    enc_sliced = ours.encode(_images((3, 3, 24, 40)), sliced=True).mean
    assert (enc_sliced - ours.encode(_images((3, 3, 24, 40))).mean).abs().max() <= SLICED_ATOL


def test_tile_spans():
    assert tile_spans(10, 16, 4) == [(0, 10)]
    assert tile_spans(40, 16, 4) == [(0, 16), (12, 28), (24, 40)]
    assert tile_spans(30, 16, 4) == [(0, 16), (12, 28), (14, 30)]
    for n, t, o in [(100, 17, 5), (33, 8, 0), (64, 64, 8), (65, 64, 8)]:
        spans = tile_spans(n, t, o)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(b - a == min(t, n) for a, b in spans)
        assert all(s1[0] <= s0[1] - o for s0, s1 in zip(spans, spans[1:]))


def test_tiled_blending_is_exact_for_a_pointwise_decoder():
    """With a decoder that treats every latent pixel independently, tiling must reproduce the full decode: this
    checks tile placement and that the blend weights form a partition of unity."""
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))

    def pointwise(z):  # (B, 4, h, w) -> (B, 3, 2h, 2w)
        return F.interpolate(torch.einsum("oc,bchw->bohw", w, z), scale_factor=2.0, mode="nearest")

    z = _latents((2, 4, 23, 41))
    full = pointwise(z)
    for ts, ov in [(8, 2), (10, 7), (16, 0), (23, 5)]:
        tiled = tiled_decode(pointwise, z, tile_size=ts, overlap=ov, scale_factor=2)
        torch.testing.assert_close(tiled, full, atol=BLEND_ATOL, rtol=BLEND_RTOL)


@torch.no_grad()
def test_tiled_decode_close_to_untiled(tiny):
    """Oracle for 'how close is close': diffusers' ``tiled_decode`` (ORACLE, SEED) with the same geometry."""
    ref, ours, _ = tiny
    z = _latents((2, 4, 24, 40))
    full = ours.decode(z)
    assert torch.equal(ours.decode(z, tile=True, tile_size=40, overlap=4), full)  # one tile = plain decode
    tiled = ours.decode(z, tile=True, tile_size=16, overlap=4)
    assert tiled.shape == full.shape
    rms = (tiled - full).pow(2).mean().sqrt()
    assert rms <= TILED_REL_RMS_TOL * full.std()
    # diffusers: tile_latent_min_size = sample_size / scale_factor = 16, overlap factor 0.25 -> 4 latents.
    assert ref.tile_latent_min_size == 16 and ref.tile_overlap_factor == 0.25
    ref.enable_tiling()
    try:
        ref_tiled = ref.decode(z).sample
    finally:
        ref.disable_tiling()
    assert rms <= (ref_tiled - full).pow(2).mean().sqrt()
    assert torch.equal(ours.decode(z, tile=True, tile_size=16, overlap=4, sliced=True)[1:],
                       ours.decode(z[1:], tile=True, tile_size=16, overlap=4))
