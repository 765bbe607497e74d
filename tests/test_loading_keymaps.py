"""Key maps SGM/LDM/OpenCLIP -> diffusers/transformers, proven against diffusers' own single-file converters.

Oracle: diffusers ``loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), version in ``diffusers.__version__`` (0.42.1
when written). Scheme: write a diffusers state dict in original names with our inverse map G, convert it back with
diffusers D, and require D(G(x)) == x for every key; our forward map F must then agree with D on every key
(F(G(k)) == k), i.e. F equals diffusers' conversion on the whole SDXL key list. Full-size models are built on the
meta device (no memory). Seeds: torch.manual_seed(0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders import single_file_utils as dsf

from w2sd.sdxl.loading.configs import (
    SDXL_BASE_UNET_CONFIG,
    SDXL_OPENCLIP_BIGG_CONFIG,
    SDXL_REFINER_UNET_CONFIG,
    SDXL_VAE_CONFIG,
)
from w2sd.sdxl.loading.keymap_text import hf_clip_recipes, openclip_recipes, text_state_dict_to_openclip
from w2sd.sdxl.loading.keymap_unet import SGM_UNET_PREFIX, unet_key_map, unet_state_dict_to_sgm
from w2sd.sdxl.loading.keymap_vae import LDM_VAE_PREFIX, vae_key_map, vae_state_dict_to_ldm
from w2sd.sdxl.loading.safetensors_io import CheckpointReader
from w2sd.sdxl.loading.strict import TensorRecipe, _make, recipe_shape

DIFFUSERS_VERSION = diffusers.__version__
SDXL_UNET_TENSORS = 1680  # research/sdxl.md §2.1, verified there with diffusers 0.42.1
SDXL_VAE_TENSORS = 248  # research/sdxl.md §5.1


def _meta_unet(config: dict) -> DiffusersUNet:
    with torch.device("meta"):
        return DiffusersUNet.from_config(copy.deepcopy(config))


@pytest.mark.parametrize("config", [SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG], ids=["base", "refiner"])
def test_unet_map_equals_diffusers_conversion_on_full_key_list(config):
    unet = _meta_unet(config)
    sd = unet.state_dict()
    if config is SDXL_BASE_UNET_CONFIG:
        assert len(sd) == SDXL_UNET_TENSORS
    sgm = unet_state_dict_to_sgm(sd, unet.config)
    assert len(sgm) == len(sd)
    back = dsf.convert_ldm_unet_checkpoint(dict(sgm), unet.config)  # diffusers' own SGM -> diffusers
    assert set(back) == set(sd), f"diffusers {DIFFUSERS_VERSION} disagrees on keys"
    assert all(back[k] is sd[k] for k in sd)  # each tensor lands exactly where it came from
    key_map = unet_key_map(unet.config)
    tensor_to_key = {id(t): k for k, t in sd.items()}
    for sgm_key, tensor in sgm.items():
        mapped = key_map.forward(sgm_key[len(SGM_UNET_PREFIX):])
        assert mapped is not None, sgm_key
        assert mapped[0] == tensor_to_key[id(tensor)], sgm_key


def test_unet_map_whole_components_no_aliasing():
    """SD1-style config with 12 input blocks: ``input_blocks.1.`` must not capture ``input_blocks.10./11.``."""
    config = dict(
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        layers_per_block=2,
    )
    key_map = unet_key_map(config)
    assert key_map.forward("input_blocks.1.0.in_layers.0.weight") == ("down_blocks.0.resnets.0.norm1.weight", False)
    assert key_map.forward("input_blocks.10.0.in_layers.0.weight") == ("down_blocks.3.resnets.0.norm1.weight", False)
    assert key_map.forward("input_blocks.11.0.skip_connection.bias") == ("down_blocks.3.resnets.1.conv_shortcut.bias", False)
    # no attention in up block 0 -> its upsampler sits at slot .1 (SD1.x layout, sdxl.md §2.5)
    assert key_map.forward("output_blocks.2.1.conv.weight") == ("up_blocks.0.upsamplers.0.conv.weight", False)
    assert key_map.forward("output_blocks.5.2.conv.weight") == ("up_blocks.1.upsamplers.0.conv.weight", False)
    assert key_map.forward("input_blocks.1.0.not_a_resnet_part.weight") is None
    assert key_map.forward("input_blocks.99.0.in_layers.0.weight") is None


def test_our_unet_from_default_config_has_the_diffusers_key_set():
    """Our UNet2DConditionModel (others' module) built from the built-in SDXL default config, on meta, has the
    same names and shapes as diffusers' SDXL UNet: what the single-file map targets exists."""
    from w2sd.sdxl.loading.models import builder
    from w2sd.sdxl.loading.strict import params_on_meta

    for config in (SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG):
        with params_on_meta():
            ours = builder("unet", config)()
        theirs = _meta_unet(config)
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert ours_shapes == theirs_shapes


def test_vae_map_equals_diffusers_conversion_full_sdxl_meta():
    with torch.device("meta"):
        vae = DiffusersVAE.from_config(copy.deepcopy(SDXL_VAE_CONFIG))
    sd = vae.state_dict()
    assert len(sd) == SDXL_VAE_TENSORS
    ldm = vae_state_dict_to_ldm(sd, vae.config)
    attn_4d = [k for k, v in ldm.items() if v.dim() == 4 and ".attn_1." in k]
    assert len(attn_4d) == 8  # q, k, v, proj_out weights in encoder and decoder mid blocks: 1x1 convs
    back = dsf.convert_ldm_vae_checkpoint(dict(ldm), vae.config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    key_map = vae_key_map(vae.config)
    for ldm_key, tensor in ldm.items():
        mapped = key_map.forward(ldm_key[len(LDM_VAE_PREFIX):])
        assert mapped is not None, ldm_key
        name, squeeze = mapped
        assert recipe_shape(TensorRecipe(ldm_key, squeeze_1x1=squeeze), tuple(tensor.shape)) == tuple(sd[name].shape)


def test_vae_map_values_tiny(tmp_path):
    """Values through the file: G -> safetensors -> our recipes == diffusers' conversion == original."""
    from helpers_tiny_sdxl import TINY_VAE_CONFIG

    torch.manual_seed(0)
    vae = DiffusersVAE(**TINY_VAE_CONFIG)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in vae.state_dict().items()}
    ldm = vae_state_dict_to_ldm(sd, vae.config)
    back = dsf.convert_ldm_vae_checkpoint(dict(ldm), vae.config)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "vae.safetensors"))
    reader = CheckpointReader([tmp_path / "vae.safetensors"])
    key_map = vae_key_map(vae.config)
    for key in reader.keys():
        name, squeeze = key_map.forward(key[len(LDM_VAE_PREFIX):])
        ours = _make(TensorRecipe(key, squeeze_1x1=squeeze), reader, None, "cpu")
        assert torch.equal(ours, back[name]) and torch.equal(ours, sd[name]), key


def test_text_encoder_maps_equal_diffusers_conversion(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from helpers_tiny_sdxl import SGM_TE1_PREFIX, SGM_TE2_PREFIX, TINY_TEXT_CONFIG

    torch.manual_seed(0)
    config = dict(TINY_TEXT_CONFIG, hidden_act="gelu")
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    sd2 = {k: v + 0.01 * torch.randn_like(v) for k, v in te2.state_dict().items() if "position_ids" not in k}
    packed = text_state_dict_to_openclip(sd2, config, SGM_TE2_PREFIX)
    assert packed[SGM_TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    # TE1 in SGM naming, with the junk position_ids
    te1_sd = {f"{SGM_TE1_PREFIX}text_model.{k}": torch.randn(3, 4) for k in ("final_layer_norm.weight", "x.bias")}
    te1_sd[SGM_TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt = {**packed, **te1_sd, SGM_TE2_PREFIX + "logit_scale": torch.tensor(4.6)}
    save_file(ckpt, str(tmp_path / "te.safetensors"))
    reader = CheckpointReader([tmp_path / "te.safetensors"])

    theirs2 = dsf.convert_open_clip_checkpoint(te2, dict(ckpt), prefix=SGM_TE2_PREFIX)
    ours2 = {k: _make(r, reader, None, "cpu") for k, r in openclip_recipes(config, SGM_TE2_PREFIX, reader.keys()).items()}
    theirs2 = {k: v for k, v in theirs2.items() if not k.endswith(("position_ids", "logit_scale"))}
    assert set(ours2) == set(theirs2) == set(sd2)
    for k in ours2:
        assert torch.equal(ours2[k], theirs2[k]) and torch.equal(ours2[k], sd2[k]), k

    theirs1 = dsf.convert_ldm_clip_checkpoint(dict(ckpt), remove_prefix=SGM_TE1_PREFIX)
    ours1 = hf_clip_recipes(reader.keys(), SGM_TE1_PREFIX)
    expected = {k for k in theirs1 if k.startswith("text_model.") and not k.endswith("position_ids")}
    assert set(ours1) == expected
    assert all(ours1[k].source == SGM_TE1_PREFIX + k for k in ours1)


def test_full_size_openclip_recipes_cover_bigG_names():
    """The OpenCLIP recipes for the real bigG config (32 layers) produce exactly the transformers key set
    (517 tensors incl. text_projection, sdxl.md §3.1, minus position_ids)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in SDXL_OPENCLIP_BIGG_CONFIG.items()
                                                            if k != "architectures"}))
    names = {k for k in te2.state_dict() if not k.endswith("position_ids")}
    recipes = openclip_recipes(SDXL_OPENCLIP_BIGG_CONFIG, "p.")
    assert set(recipes) == names
    assert len({r.source for r in recipes.values()}) == 4 + 1 + 32 * (10 + 2)  # packed in_proj w/b per layer


def _fake_reader(shapes: dict[str, tuple[int, ...]]) -> CheckpointReader:
    """A reader over a header only (no data): enough for detection and strict key/shape checks at full size."""
    from pathlib import Path

    from w2sd.sdxl.loading.safetensors_io import TensorInfo

    reader = CheckpointReader.__new__(CheckpointReader)
    reader.files, reader.metadata, reader.description, reader._scratch = [], {}, "full-size header", None
    reader.infos = {k: TensorInfo(Path("none"), torch.float16, tuple(s), 0, 0) for k, s in shapes.items()}
    return reader


@pytest.mark.parametrize("arch", ["sdxl_base", "sdxl_refiner"])
def test_full_size_single_file_key_set_fits_default_configs(arch):
    """A full-size SGM single file (key names from the inverse maps proven above against diffusers, plus the junk
    keys real files carry) is detected and passes the strict key/shape check against our modules built from the
    built-in default configs -- what loading ``sd_xl_base_1.0.safetensors`` or a fine-tune of it needs."""
    from w2sd.sdxl.loading.configs import SINGLE_FILE_DEFAULTS
    from w2sd.sdxl.loading.keymap_text import hf_clip_key
    from w2sd.sdxl.loading.models import builder
    from w2sd.sdxl.loading.single_file import SINGLE_FILE_PREFIXES, detect_architecture, single_file_recipes
    from w2sd.sdxl.loading.strict import check_keys, params_on_meta

    defaults, prefixes = SINGLE_FILE_DEFAULTS[arch], SINGLE_FILE_PREFIXES[arch]
    models = {}
    with params_on_meta():
        for kind in prefixes:
            models[kind] = builder(kind, defaults[kind])()
    sds = {kind: m.state_dict() for kind, m in models.items()}
    sgm: dict[str, torch.Tensor] = {}
    sgm.update(unet_state_dict_to_sgm(sds["unet"], defaults["unet"]))
    sgm.update(vae_state_dict_to_ldm(sds["vae"], defaults["vae"]))
    if "text_encoder" in prefixes:
        sgm.update({prefixes["text_encoder"] + hf_clip_key(k): v for k, v in sds["text_encoder"].items()})
        sgm[prefixes["text_encoder"] + "text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    sgm.update(text_state_dict_to_openclip(sds["text_encoder_2"], defaults["text_encoder_2"],
                                           prefixes["text_encoder_2"]))
    sgm[prefixes["text_encoder_2"] + "logit_scale"] = torch.empty((), device="meta")
    reader = _fake_reader({k: tuple(v.shape) for k, v in sgm.items()})
    if arch == "sdxl_base":
        assert len(reader) == 1680 + 248 + 197 + 390  # UNet, VAE, TE1 + position_ids, TE2 + logit_scale
    assert detect_architecture(reader) == arch
    for kind, prefix in prefixes.items():
        naming = "openclip" if kind == "text_encoder_2" else ("diffusers" if kind == "text_encoder" else "sgm")
        recipes, unplaced = single_file_recipes(reader, kind, prefix, naming, defaults[kind])
        expected = {k: tuple(v.shape) for k, v in sds[kind].items()}
        check_keys(kind, expected, recipes, reader, unplaced)  # raises CheckpointError listing any difference
