"""Test helper: a tiny random SDXL pipeline built with diffusers/transformers (the oracles) and saved in real file
formats: a diffusers folder (``StableDiffusionXLPipeline.save_pretrained``) and an SGM single file written from it.

Tiny configs from research/sdxl.md §8.2 (same block topology as SDXL base). Oracle versions are recorded by the
tests through ``diffusers.__version__`` / ``transformers.__version__``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers_clip_vocab import hf_clip_tokenizer

TINY_UNET_CONFIG = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 2],
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    sample_size=16,
    norm_num_groups=8,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=4,
    scaling_factor=0.13025,
    force_upcast=True,
)
TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=32,
    vocab_size=49408,
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=1,
)
# diffusers SCHEDULER_DEFAULT_CONFIG / SDXL base scheduler_config.json values (sdxl.md §1.1).
SDXL_SCHEDULER_KWARGS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="leading", sample_max_value=1.0,
)

SGM_TE1_PREFIX = "conditioner.embedders.0.transformer."
SGM_TE2_PREFIX = "conditioner.embedders.1.model."


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A random tiny ``StableDiffusionXLPipeline`` (DDIM scheduler with SDXL's config), seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    te1 = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG, hidden_act="gelu"))
    # Random init leaves some tensors constant (norm weights 1, biases 0); perturb all so key mix-ups show.
    with torch.no_grad():
        for module in (unet, vae, te1, te2):
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=hf_clip_tokenizer(),
        tokenizer_2=hf_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(**SDXL_SCHEDULER_KWARGS),
        add_watermarker=False,
    )


def save_tiny_sdxl_folder(folder: str | Path, seed: int = 0, **save_kwargs) -> Path:
    """Build the tiny pipeline and ``save_pretrained(folder, safe_serialization=True, **save_kwargs)``."""
    folder = Path(folder)
    pipe = build_tiny_sdxl_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


def folder_state_dicts(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-component state dicts read from a saved folder (diffusers/transformers names as saved)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {}
    for kind, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("text_encoder_2", "model")]:
        out[kind] = load_file(str(folder / kind / f"{name}.safetensors"))
    return out


def write_sgm_single_file(folder: str | Path, out_file: str | Path, *, junk: bool = True) -> Path:
    """Write an SDXL-base SGM single file from a saved tiny diffusers folder, with w2sd's inverse key maps:
    ``model.diffusion_model.*``, ``first_stage_model.*`` (1x1-conv attention), TE1 under
    ``conditioner.embedders.0.transformer.text_model.*``, TE2 in OpenCLIP layout (packed in_proj, transposed
    text_projection). ``junk`` adds ``position_ids``, ``logit_scale`` and ``denoiser.sigmas`` like real files."""
    from safetensors.torch import save_file

    from w2sd.sdxl.loading.keymap_text import hf_clip_key, text_state_dict_to_openclip
    from w2sd.sdxl.loading.keymap_unet import unet_state_dict_to_sgm
    from w2sd.sdxl.loading.keymap_vae import vae_state_dict_to_ldm

    folder = Path(folder)
    sds = folder_state_dicts(folder)
    cfg = {k: json.loads((folder / k / "config.json").read_text()) for k in sds}
    out: dict[str, torch.Tensor] = {}
    out.update(unet_state_dict_to_sgm(sds["unet"], cfg["unet"]))
    out.update(vae_state_dict_to_ldm(sds["vae"], cfg["vae"]))
    for key, tensor in sds["text_encoder"].items():
        name = hf_clip_key(key)
        if name is not None:
            out[SGM_TE1_PREFIX + name] = tensor
    out.update(text_state_dict_to_openclip(sds["text_encoder_2"], cfg["text_encoder_2"], SGM_TE2_PREFIX))
    if junk:
        out[SGM_TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        out[SGM_TE2_PREFIX + "logit_scale"] = torch.tensor(4.6052)
        out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(out_file))
    return Path(out_file)


_CACHE: dict[tuple, Path] = {}


def cached_tiny_sdxl(tmp_path_factory, name: str = "base", seed: int = 0, **save_kwargs) -> Path:
    """One saved tiny folder per (name, seed, options) for the whole pytest session (building costs seconds)."""
    key = (name, seed, tuple(sorted(save_kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = save_tiny_sdxl_folder(tmp_path_factory.mktemp(f"tiny_sdxl_{name}"), seed, **save_kwargs)
    return _CACHE[key]
