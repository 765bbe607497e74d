"""The SD / SDXL KL autoencoder (diffusers ``AutoencoderKL``-compatible), see ``model.py``."""

from .config import VAEConfig
from .model import AutoencoderKL, Decoder, Encoder, LatentDistribution, check_state_dict
from .tiling import tiled_decode, tile_spans

__all__ = ["VAEConfig", "AutoencoderKL", "Encoder", "Decoder", "LatentDistribution", "check_state_dict",
           "tiled_decode", "tile_spans"]
