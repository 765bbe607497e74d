"""kohya LoRA module names -> our module paths (w2sd.lora.kohya_names).

Oracles:
- diffusers ``loaders.single_file_utils.convert_ldm_unet_checkpoint`` (version in ``test_oracle_versions``): the SGM
  module paths we derive from the module tree, turned into SGM state-dict keys, must convert back to exactly our
  diffusers keys, on the tiny UNet and on the full SDXL base config (research/sdxl.md §2.1, built on the meta
  device, 1680 keys).
- research/sdxl.md §6.1 example kohya names (taken from real SDXL kohya files) for spot checks.
- transformers ``CLIPTextModel`` (5.x: no ``text_model.`` wrapper) for the text-encoder path variant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_lora_models import (
    KOHYA_TE_LEAVES,
    TINY_TE,
    TINY_UNET,
    kohya_targets,
    make_kohya_state_dict,
    our_text_encoders,
    our_unet,
    single_thread,  # noqa: F401  (autouse fixture)
)
from w2sd.errors import LoRAError
from w2sd.lora import attach_lora, diffusers_to_sgm_module_paths, kohya_name_table, lora_target_paths
from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig

import diffusers  # noqa: E402  (test extra; a missing oracle must fail, not skip)
import transformers  # noqa: E402  (test extra; a missing oracle must fail, not skip)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

# research/sdxl.md §2.1 (SDXL base 1.0 unet/config.json)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, num_attention_heads=None, only_cross_attention=False, out_channels=4,
    projection_class_embeddings_input_dim=2816, resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    resnet_time_scale_shift="default", sample_size=128, time_embedding_type="positional", timestep_post_act=None,
    time_cond_proj_dim=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)
SDXL_UNET_KEYS = 1680  # research/sdxl.md §2.1, verified there on the meta device


def test_oracle_versions():
    print(f"oracles: diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")


def _check_sgm_map_against_diffusers(unet: nn.Module, config: dict) -> int:
    sd = unet.state_dict()
    sgm = diffusers_to_sgm_module_paths([n for n, _ in unet.named_modules()])
    ldm = {}
    for key, tensor in sd.items():
        module, _, leaf = key.rpartition(".")
        assert module in sgm, f"{module} has no SGM path"
        ldm[f"model.diffusion_model.{sgm[module]}.{leaf}"] = tensor
    assert len(ldm) == len(sd)  # injective
    back = convert_ldm_unet_checkpoint(ldm, config)
    assert set(back) == set(sd)
    for key in sd:
        assert back[key] is sd[key], key  # the converter moved each tensor to the key it came from
    return len(sd)


# SD1.x topology (cross-attn first, plain block last, 1x1-conv proj_in/out): upsampler slots .1 and .2 both occur
TINY_SD15 = dict(
    block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, sample_size=16, use_linear_projection=False,
)


def test_sgm_module_map_matches_diffusers_converter_tiny():
    unet = our_unet()
    assert _check_sgm_map_against_diffusers(unet, dict(TINY_UNET)) > 300
    sd15 = UNet2DConditionModel(UNetConfig.from_dict(TINY_SD15))
    assert _check_sgm_map_against_diffusers(sd15, dict(TINY_SD15)) > 300
    table = kohya_name_table("unet", [n for n, _ in sd15.named_modules()])
    assert table["lora_unet_output_blocks_2_1_conv"] == "up_blocks.0.upsamplers.0.conv"  # no attention: slot .1
    assert table["lora_unet_output_blocks_5_2_conv"] == "up_blocks.1.upsamplers.0.conv"
    assert isinstance(sd15.get_submodule(table["lora_unet_input_blocks_1_1_proj_in"]), nn.Conv2d)


def test_sgm_module_map_matches_diffusers_converter_full_sdxl():
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(SDXL_UNET))
    assert _check_sgm_map_against_diffusers(unet, dict(SDXL_UNET)) == SDXL_UNET_KEYS
    table = kohya_name_table("unet", [n for n, _ in unet.named_modules()])
    # research/sdxl.md §6.1 examples of real kohya SDXL names
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert table["lora_unet_output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["lora_unet_middle_block_1_proj_in"] == "mid_block.attentions.0.proj_in"
    assert table["lora_unet_input_blocks_1_0_in_layers_2"] == "down_blocks.0.resnets.0.conv1"
    assert table["lora_unet_label_emb_0_0"] == "add_embedding.linear_1"
    assert table["lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj"] == (
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj")
    assert table["lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0"] == (
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0")
    assert table["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    assert table["lora_unet_output_blocks_8_0_skip_connection"] == "up_blocks.2.resnets.2.conv_shortcut"
    assert table["lora_unet_time_embed_0"] == "time_embedding.linear_1"
    assert table["lora_unet_out_2"] == "conv_out"


def test_every_linear_and_conv_resolves_in_sgm_and_diffusers_spelling():
    """Every Linear/Conv2d of the tiny UNet and both text encoders (a superset of kohya's SDXL targets, LoCon
    included) has a kohya name in each spelling, and every name resolves to that module."""
    unet = our_unet()
    te1, te2 = our_text_encoders()
    unet_paths = [n for n, _ in unet.named_modules()]
    sgm = diffusers_to_sgm_module_paths(unet_paths)
    table = kohya_name_table("unet", unet_paths)
    targets = lora_target_paths(unet)
    assert len(targets) == 313  # research/sdxl.md §6.3 counts 313 Linear/Conv modules on this tiny config
    for path in targets:
        assert table["lora_unet_" + sgm[path].replace(".", "_")] == path
        assert table["lora_unet_" + path.replace(".", "_")] == path  # diffusers-style kohya files
    for te, prefix, comp in ((te1, "lora_te1", "text_encoder"), (te2, "lora_te2", "text_encoder_2")):
        paths = [n for n, _ in te.named_modules()]
        t = kohya_name_table(comp, paths)
        linears = lora_target_paths(te)
        assert sum(p.endswith(KOHYA_TE_LEAVES) for p in linears) == 6 * TINY_TE["num_hidden_layers"]
        for path in linears:
            assert path.startswith("text_model.") or path == "text_projection"
            assert t[f"{prefix}_{path.replace('.', '_')}"] == path
    # the kohya target lists used by the parity tests are a subset, and attach resolves every one of them
    models = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    mods, where = kohya_targets(models)
    handle = attach_lora(models, make_kohya_state_dict(mods, 1, lambda n, i: 1.0, seed=0), name="all")
    try:
        assert set(handle.branches) == {f"{c}:{p}" for c, p in where.values()}
    finally:
        handle.detach()


def test_text_encoder_without_text_model_wrapper():
    """transformers 5 ``CLIPTextModel`` paths are ``encoder.layers.N...``; kohya names still say ``text_model_``."""
    cfg = transformers.CLIPTextConfig(**TINY_TE)
    hf = transformers.CLIPTextModel(cfg)
    paths = [n for n, _ in hf.named_modules()]
    assert "encoder.layers.0.self_attn.q_proj" in paths  # oracle naming (no wrapper)
    t = kohya_name_table("text_encoder", paths)
    assert t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"
    assert t["lora_te_text_model_encoder_layers_2_mlp_fc2"] == "encoder.layers.2.mlp.fc2"  # SD1.x prefix


def test_ambiguous_names_raise():
    # "a.b_c" and "a_b.c" both underscore to "a_b_c"
    model = nn.Module()
    model.a = nn.Module()
    model.a.b_c = nn.Linear(2, 2)
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(2, 2)
    with pytest.raises(LoRAError, match="ambiguous"):
        kohya_name_table("unet", [n for n, _ in model.named_modules()])
    with pytest.raises(LoRAError, match="no kohya prefix"):
        kohya_name_table("vae", ["x"])


def test_module_map_agrees_with_the_state_dict_key_map():
    """Same SGM names as ``w2sd.sdxl.loading.keymap_unet`` (the state-dict map, built from the config instead of
    the module tree), so the two can be deduplicated without changing behaviour."""
    from w2sd.sdxl.loading.keymap_unet import unet_key_map

    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(SDXL_UNET))
    sgm = diffusers_to_sgm_module_paths([n for n, _ in unet.named_modules()])
    key_map = unet_key_map(SDXL_UNET)
    for key in unet.state_dict():
        module, _, leaf = key.rpartition(".")
        mapped = key_map.inverse(key)
        assert mapped is not None and mapped[0] == f"{sgm[module]}.{leaf}", key
