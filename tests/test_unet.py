"""Parity of ``w2sd.sdxl.unet`` with diffusers' ``UNet2DConditionModel`` (the test-only oracle).

Oracle: diffusers (version printed in failures via ``diffusers.__version__``; written against 0.42.1), tiny random
models built here with ``torch.manual_seed``. Our model loads the oracle's state dict strictly and must give the
same output on random inputs. Full-size SDXL/SD1.5 structures are compared on the meta device (no memory).
"""

from __future__ import annotations

import json

import pytest
import torch

import diffusers  # noqa: E402  (test extra; the library itself never imports it; a missing oracle must fail)
from diffusers import UNet2DConditionModel as DiffusersUNet  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from w2sd.errors import CheckpointError  # noqa: E402
from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig, timestep_embedding  # noqa: E402

ORACLE = f"diffusers {diffusers.__version__}"
REL_TOL_FP32 = 1e-5  # max|ours - oracle| / max|oracle|, fp32 on CPU (task requirement; observed 0 here)
EMB_ATOL = 1e-6  # sinusoidal embedding, fp32 (same formula; observed bit-exact)
REL_TOL_GRAD = 1e-4  # parameter gradients, fp32 (in-place residual adds must keep autograd exact)
REL_TOL_BF16 = 3e-2  # bf16 forward, ours vs oracle, both bf16 on CPU (8 mantissa bits, ~40 layers)
SEED = 0

# sdxl.md §8.2: the tiny config with the SDXL block topology (verified with diffusers 0.42.1).
TINY_SDXL = dict(
    block_out_channels=[32, 64, 64], layers_per_block=2, transformer_layers_per_block=[1, 2, 2],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4, 4], cross_attention_dim=64, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    sample_size=16, norm_num_groups=8,
)
# SD1.5 topology, tiny: cross-attention first, no added embedding, 1x1-conv proj_in/out, int attention_head_dim.
TINY_SD15 = dict(
    block_out_channels=[32, 64, 64], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=32, use_linear_projection=False, sample_size=16, norm_num_groups=8,
)
# Non-default options we claim to support, all at once.
TINY_VARIANTS = dict(
    block_out_channels=[16, 32], layers_per_block=[1, 2], transformer_layers_per_block=[[1], [2, 1]],
    reverse_transformer_layers_per_block=[[1, 2, 1], [2, 1]],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4], cross_attention_dim=[24, 24], use_linear_projection=True, norm_num_groups=4,
    resnet_time_scale_shift="scale_shift", mid_block_scale_factor=1.414, center_input_sample=True,
    time_embedding_act_fn="silu", time_embedding_dim=48, downsample_padding=0, conv_in_kernel=1,
    conv_out_kernel=5, freq_shift=1, flip_sin_to_cos=False, act_fn="mish", norm_eps=1e-4, in_channels=3,
    out_channels=5,
)
# sdxl.md §2.1: SDXL base 1.0 unet/config.json.
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_BASE_TENSORS = 1680  # sdxl.md §2.1 [verified, meta device]
SDXL_BASE_PARAMS = 2_567_463_684
# Public SD1.5 unet/config.json (runwayml/stable-diffusion-v1-5), the keys that differ from diffusers' defaults.
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids OpenMP contention (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Public SDXL refiner 1.0 unet/config.json (5 time ids incl. aesthetic score: 5*256 + 1280 = 2560), main keys.
SDXL_REFINER_CONFIG = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4, "use_linear_projection": True,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 128,
}
# Public SD2.1 (768-v) unet/config.json, main keys: linear projection, upcast_attention true.
SD21_CONFIG = {
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "sample_size": 96, "layers_per_block": 2,
}


def _oracle(config: dict) -> DiffusersUNet:
    torch.manual_seed(SEED)
    return DiffusersUNet(**config).eval()


def _ours_from(oracle: DiffusersUNet) -> UNet2DConditionModel:
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(oracle.config))).eval()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    return ours.to(oracle.dtype)


@pytest.fixture(scope="module")
def sdxl_pair() -> tuple[DiffusersUNet, UNet2DConditionModel]:
    oracle = _oracle(TINY_SDXL)
    return oracle, _ours_from(oracle)


@pytest.fixture(scope="module")
def sd15_pair() -> tuple[DiffusersUNet, UNet2DConditionModel]:
    oracle = _oracle(TINY_SD15)
    return oracle, _ours_from(oracle)


def _inputs(config: dict, batch: int = 2, hw: tuple[int, int] = (16, 24), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list) else cross
    out = dict(sample=torch.randn(batch, config.get("in_channels", 4), *hw, generator=g),
               encoder_hidden_states=torch.randn(batch, 7, cross, generator=g))
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        out["text_embeds"] = torch.randn(batch, pooled, generator=g)
        # SDXL-like micro-conditioning ids: sizes and crops in pixels
        out["time_ids"] = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]]).repeat(batch, 1)
    return out


def _run_oracle(oracle: DiffusersUNet, inp: dict, timestep) -> torch.Tensor:
    added = {k: inp[k] for k in ("text_embeds", "time_ids") if k in inp} or None
    return oracle(inp["sample"], timestep, inp["encoder_hidden_states"], added_cond_kwargs=added).sample


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (256, True, 0), (33, False, 1), (8, True, 0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0, 1024.0, 4096.25])
    ours = timestep_embedding(t, dim, flip, shift)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=EMB_ATOL, rtol=0, msg=ORACLE)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("timestep", [999, torch.tensor(321), torch.tensor([17, 640])], ids=["int", "0d", "batch"])
def test_sdxl_tiny_parity(timestep, sdxl_pair):
    oracle, ours = sdxl_pair
    inp = _inputs(TINY_SDXL)
    with torch.no_grad():
        ref = _run_oracle(oracle, inp, timestep)
        out = ours(**inp, timestep=timestep)
    assert out.shape == ref.shape == (2, 4, 16, 24)
    assert _rel_err(out, ref) <= REL_TOL_FP32, ORACLE


def test_sdxl_tiny_from_saved_folder(tmp_path, sdxl_pair):
    """The real file format: diffusers save_pretrained -> config.json + safetensors, read back without diffusers."""
    oracle = sdxl_pair[0]
    oracle.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(config))
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    ours.eval()
    inp = _inputs(TINY_SDXL, seed=3)
    with torch.no_grad():
        assert _rel_err(ours(**inp, timestep=250.5), _run_oracle(oracle, inp, 250.5)) <= REL_TOL_FP32, ORACLE


@pytest.mark.parametrize("hw", [(16, 24), (14, 18)], ids=["16x24", "14x18-upsample-size"])
def test_sd15_tiny_parity(hw, sd15_pair):
    oracle, ours = sd15_pair
    # SD1.5 rule: attention_head_dim=4 means 4 heads; head size = channels / 4.
    attn = ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (4, 16)
    inp = _inputs(TINY_SD15, hw=hw)
    with torch.no_grad():
        ref = _run_oracle(oracle, inp, 42)
        out = ours(**inp, timestep=torch.tensor([42, 42]))
    assert out.shape == (2, 4, *hw)
    assert _rel_err(out, ref) <= REL_TOL_FP32, ORACLE


def test_variant_options_parity():
    """scale_shift resnets, mid scale factor, centred input, time act, odd kernels, padding 0, nested depths."""
    oracle = _oracle(TINY_VARIANTS)
    ours = _ours_from(oracle)
    inp = _inputs(TINY_VARIANTS, hw=(10, 12))
    with torch.no_grad():
        ref = _run_oracle(oracle, inp, 77)
        out = ours(**inp, timestep=77)
    assert out.shape == (2, 5, 10, 12)
    assert _rel_err(out, ref) <= REL_TOL_FP32, ORACLE


def test_backward_matches_oracle():
    """Gradients flow through our in-place residual adds exactly as through diffusers' out-of-place ones."""
    oracle = _oracle(TINY_SDXL).train()  # dropout p=0: train mode is deterministic
    ours = _ours_from(oracle).train()
    inp = _inputs(TINY_SDXL, hw=(8, 12))
    _run_oracle(oracle, inp, 500).square().mean().backward()
    ours(**inp, timestep=500).square().mean().backward()
    theirs = dict(oracle.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        assert p.grad is not None, name
        assert _rel_err(p.grad, ref) <= REL_TOL_GRAD, (name, ORACLE)


def test_bf16_forward_close_to_oracle_bf16():
    oracle = _oracle(TINY_SDXL).to(torch.bfloat16)  # (diffusers logs a harmless note about .to())
    ours = _ours_from(oracle)
    assert next(ours.parameters()).dtype == torch.bfloat16
    inp = {k: v.to(torch.bfloat16) for k, v in _inputs(TINY_SDXL, hw=(8, 12)).items()}
    with torch.no_grad():
        ref = _run_oracle(oracle, inp, 500)
        out = ours(**inp, timestep=500)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= REL_TOL_BF16, ORACLE


# ---------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("config", [SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG, SD15_CONFIG, SD21_CONFIG],
                         ids=["sdxl-base", "sdxl-refiner", "sd15", "sd21"])
def test_full_size_state_dict_names_and_shapes_on_meta(config):
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(config))
        ref = DiffusersUNet(**{k: v for k, v in config.items() if not k.startswith("_")})
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(set(ours_shapes) ^ set(ref_shapes)) == []
    assert ours_shapes == ref_shapes
    if config is SDXL_BASE_CONFIG:
        assert len(ours_shapes) == SDXL_BASE_TENSORS
        assert sum(p.numel() for p in ours.parameters()) == SDXL_BASE_PARAMS
    assert all(p.is_meta for p in ours.parameters())


def test_strict_load_of_mismatched_state_dict_fails(sdxl_pair):
    sd = sdxl_pair[0].state_dict()
    deeper = UNet2DConditionModel(UNetConfig.from_dict(dict(TINY_SDXL, transformer_layers_per_block=[1, 2, 3])))
    with pytest.raises(RuntimeError, match="Missing key"):
        deeper.load_state_dict(sd, strict=True)
    wider_text = UNet2DConditionModel(UNetConfig.from_dict(dict(TINY_SDXL, cross_attention_dim=48)))
    with pytest.raises(RuntimeError, match="size mismatch"):
        wider_text.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("dual_cross_attention", True),
    ("time_embedding_type", "fourier"),
    ("num_attention_heads", [2, 4, 4]),
    ("resnet_time_scale_shift", "spatial"),
    ("addition_embed_type", "text_image"),
    ("only_cross_attention", True),
    ("encoder_hid_dim", 32),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("time_cond_proj_dim", 16),
    ("definitely_not_a_key", 1),
])
def test_unsupported_config_raises_naming_key_and_value(key, value):
    with pytest.raises(CheckpointError) as info:
        UNetConfig.from_dict(dict(TINY_SDXL, **{key: value}))
    assert key in str(info.value)
    if key != "definitely_not_a_key":
        assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_bad_block_type_and_lengths_raise():
    with pytest.raises(CheckpointError, match="AttnDownBlock2D"):
        UNetConfig.from_dict(dict(TINY_SDXL, down_block_types=["AttnDownBlock2D"] * 3))
    with pytest.raises(CheckpointError, match="attention_head_dim"):
        UNetConfig.from_dict(dict(TINY_SDXL, attention_head_dim=[2, 4]))
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        UNetConfig.from_dict(dict(TINY_SDXL, norm_num_groups=7))


def test_forward_conditioning_errors():
    sdxl = UNet2DConditionModel(UNetConfig.from_dict(TINY_SDXL)).eval()
    inp = _inputs(TINY_SDXL)
    with torch.no_grad(), pytest.raises(ValueError, match="text_embeds"):
        sdxl(inp["sample"], 1, inp["encoder_hidden_states"])
    sd15 = UNet2DConditionModel(UNetConfig.from_dict(TINY_SD15)).eval()
    inp15 = _inputs(TINY_SD15)
    with torch.no_grad(), pytest.raises(ValueError, match="no addition embedding"):
        sd15(**inp15, timestep=1, text_embeds=torch.zeros(2, 32), time_ids=torch.zeros(2, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="timestep has 3 entries"):
        sd15(**inp15, timestep=torch.tensor([1, 2, 3]))
    with torch.no_grad(), pytest.raises(ValueError, match="encoder_hidden_states"):
        sd15(inp15["sample"], 1, torch.zeros(2, 7, 64))
    with torch.no_grad(), pytest.raises(ValueError, match="sample must be"):
        sd15(torch.zeros(2, 3, 8, 8), 1, inp15["encoder_hidden_states"])


def test_config_round_trip():
    cfg = UNetConfig.from_dict(SDXL_BASE_CONFIG)
    assert cfg.heads() == (5, 10, 20)
    assert cfg.reverse_transformer_layers() == (10, 2, 1)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
