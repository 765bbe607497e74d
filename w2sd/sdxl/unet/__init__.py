"""SD/SDXL UNet in pure PyTorch with diffusers-compatible parameter names (sdxl.md §2)."""

from w2sd.sdxl.unet.attention import GEGLU, Attention, BasicTransformerBlock, FeedForward, Transformer2DModel
from w2sd.sdxl.unet.blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from w2sd.sdxl.unet.config import UNetConfig
from w2sd.sdxl.unet.embeddings import TimestepEmbedding, timestep_embedding
from w2sd.sdxl.unet.model import UNet2DConditionModel
from w2sd.sdxl.unet.resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = [
    "UNetConfig",
    "UNet2DConditionModel",
    "timestep_embedding",
    "TimestepEmbedding",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "Attention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2DModel",
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "CrossAttnUpBlock2D",
]
