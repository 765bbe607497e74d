"""Loading real SDXL weights: diffusers folders (variants, shards, HF cache snapshots) and SGM single files,
strict, on the meta device, straight to the target dtype/device.

Example::

    from w2sd.sdxl.loading import load_sdxl_components, load_unet

    c = load_sdxl_components("stabilityai/stable-diffusion-xl-base-1.0",  # in the local HF cache, or a folder
                             dtype=torch.float16, device="cuda", variant="fp16", vae_dtype=torch.float32)
    c = load_sdxl_components("juggernautXL.safetensors", dtype=torch.float16)  # SGM single file
    unet = load_unet("sd_xl_base_1.0.safetensors", dtype=torch.bfloat16)

Modules: ``safetensors_io`` (reader, weight-file discovery), ``strict`` (meta build + strict assign),
``keymap_unet`` / ``keymap_vae`` / ``keymap_text`` (original -> diffusers/transformers names), ``configs``
(single-file defaults), ``folder``, ``single_file``, ``api``.
"""

from w2sd.sdxl.loading.api import (
    SDXLComponents,
    load_scheduler_config,
    load_sdxl_components,
    load_text_encoder,
    load_text_encoder_2,
    load_tokenizer,
    load_tokenizer_2,
    load_unet,
    load_vae,
)
from w2sd.sdxl.loading.configs import SINGLE_FILE_DEFAULTS
from w2sd.sdxl.loading.folder import resolve_pretrained_path
from w2sd.sdxl.loading.keymap_text import hf_clip_key, openclip_recipes, text_state_dict_to_openclip
from w2sd.sdxl.loading.keymap_unet import unet_key_map, unet_state_dict_to_sgm
from w2sd.sdxl.loading.keymap_vae import vae_key_map, vae_state_dict_to_ldm
from w2sd.sdxl.loading.safetensors_io import CheckpointReader, find_weight_files, read_safetensors_header
from w2sd.sdxl.loading.single_file import detect_architecture
from w2sd.sdxl.loading.strict import TensorRecipe, load_strict

__all__ = [
    "SDXLComponents",
    "load_sdxl_components",
    "load_unet",
    "load_vae",
    "load_text_encoder",
    "load_text_encoder_2",
    "load_tokenizer",
    "load_tokenizer_2",
    "load_scheduler_config",
    "SINGLE_FILE_DEFAULTS",
    "resolve_pretrained_path",
    "CheckpointReader",
    "find_weight_files",
    "read_safetensors_header",
    "detect_architecture",
    "TensorRecipe",
    "load_strict",
    "unet_key_map",
    "unet_state_dict_to_sgm",
    "vae_key_map",
    "vae_state_dict_to_ldm",
    "hf_clip_key",
    "openclip_recipes",
    "text_state_dict_to_openclip",
]
