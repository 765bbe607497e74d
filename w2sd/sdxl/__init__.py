"""The SDXL adapter: pure-PyTorch UNet, VAE, CLIP text encoders and tokenizer, prompt encoding, and loading of
real checkpoints (diffusers folders, Hugging Face cache snapshots, SGM single files) from safetensors."""

from .loading import SDXLComponents, load_sdxl_components, load_text_encoder, load_text_encoder_2, load_unet, load_vae
from .prompt import PromptEmbeds, add_time_ids, encode_prompt, negative_add_time_ids
from .text_encoder import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, normalize_text_encoder_keys
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .denoiser import SDXLConditioning, SDXLDenoiser
from .pairs import Member, Pair, Setting, combine, full_model_pair, guidance_pair, lora_pair, prompt_pair
from .pipeline import Generation, SDXLPipeline, initial_latents
