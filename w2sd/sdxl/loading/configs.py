"""Default component configs for single-file checkpoints, which carry no config.

Values are those of the public diffusers folders ``stabilityai/stable-diffusion-xl-base-1.0`` and
``stabilityai/stable-diffusion-xl-refiner-1.0`` (``*/config.json``, ``scheduler/scheduler_config.json``,
``model_index.json``), as listed in research/sdxl.md §1.1, §2.1, §3.1, §5.1; SGM equivalents in
``configs/inference/sd_xl_{base,refiner}.yaml``. They are plain dicts in diffusers/transformers ``config.json``
form so they go through the same ``*.from_dict`` as a folder's files. Use ``copy.deepcopy`` before editing.
"""

from __future__ import annotations

__all__ = [
    "SDXL_BASE_UNET_CONFIG",
    "SDXL_REFINER_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "SDXL_CLIP_L_CONFIG",
    "SDXL_OPENCLIP_BIGG_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "SINGLE_FILE_DEFAULTS",
]

SDXL_BASE_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # = number of heads (diffusers naming trap, sdxl.md §2.1)
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_REFINER_UNET_CONFIG: dict = {
    **SDXL_BASE_UNET_CONFIG,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,  # 1280 pooled + 5 time ids (with aesthetic score) x 256
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

SDXL_VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,  # not SD1's 0.18215 (diffusers issue #6753)
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_CLIP_L_CONFIG: dict = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0,
    "eos_token_id": 2,  # legacy value: selects argmax pooling (sdxl.md §3.1)
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SDXL_OPENCLIP_BIGG_CONFIG: dict = {
    **SDXL_CLIP_L_CONFIG,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SDXL_SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Per detected single-file architecture: component configs and model_index values.
SINGLE_FILE_DEFAULTS: dict[str, dict] = {
    "sdxl_base": {
        "unet": SDXL_BASE_UNET_CONFIG,
        "vae": SDXL_VAE_CONFIG,
        "text_encoder": SDXL_CLIP_L_CONFIG,
        "text_encoder_2": SDXL_OPENCLIP_BIGG_CONFIG,
        "scheduler": SDXL_SCHEDULER_CONFIG,
        "force_zeros_for_empty_prompt": True,
    },
    "sdxl_refiner": {
        "unet": SDXL_REFINER_UNET_CONFIG,
        "vae": SDXL_VAE_CONFIG,
        "text_encoder": None,
        "text_encoder_2": SDXL_OPENCLIP_BIGG_CONFIG,
        "scheduler": SDXL_SCHEDULER_CONFIG,
        "force_zeros_for_empty_prompt": False,
    },
}
