"""CLIP text transformers used by SDXL: ViT-L/14 text (``text_encoder``) and OpenCLIP bigG/14 text (``text_encoder_2``).

Parameter names mirror transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` exactly, *with* the
``text_model.`` prefix of the real SDXL files (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.q_proj.weight``, ..., ``text_model.final_layer_norm.weight``,
``text_projection.weight``), so a state dict passed through :func:`normalize_text_encoder_keys` loads with
``load_state_dict(strict=True)``. Conversions from other naming schemes (OpenCLIP / SGM single files) belong to the
key-map modules of ``w2sd.sdxl.loading``, not here.

Forward pass (transformers ``models/clip/modeling_clip.py``; research note sdxl.md §3.2)::

    x = token_embedding(ids) + position_embedding(arange(T))         # hidden_states[0]
    for layer in layers:                                               # pre-LN, causal self-attention
        x = x + out_proj(attn(ln1(x)))
        x = x + fc2(act(fc1(ln2(x))))                                  # hidden_states[i + 1]
    last_hidden_state = final_layer_norm(x)
    pooled = last_hidden_state[arange(B), eos_index(ids)]
    text_embeds = text_projection(pooled)                              # WithProjection only

SDXL passes no attention mask, so attention is causal only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from w2sd.errors import CheckpointError, ConfigError

__all__ = [
    "CLIPTextConfig",
    "CLIPTextOutput",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "normalize_text_encoder_keys",
    "TEXT_MODEL_PREFIX",
]

TEXT_MODEL_PREFIX = "text_model."
# The eos id written by transformers before PR #24773 (SDXL's configs carry it); it selects argmax pooling.
LEGACY_EOS_TOKEN_ID = 2
_SUPPORTED_ACTS = ("quick_gelu", "gelu")
# Buffers that some files carry but that are recomputed here (position ids are always arange(T)).
_IGNORED_KEYS = ("embeddings.position_ids",)


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``text_encoder/config.json`` that the text transformer needs.

    Defaults are transformers 5.x ``CLIPTextConfig`` defaults; the four size fields have none and must be given.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    _REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")

    def __post_init__(self) -> None:
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} is not supported (expected one of {_SUPPORTED_ACTS})")
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                     "max_position_embeddings", "vocab_size", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from a parsed ``config.json``; unrelated keys are ignored, missing size keys raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"text encoder config: expected a dict, got {type(d).__name__}")
        missing = [k for k in cls._REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"text encoder config is missing required key(s): {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)


@dataclass
class CLIPTextOutput:
    """Result of a CLIP text forward.

    last_hidden_state: (B, T, D) after the final layer norm.
    pooled: (B, D) final-layer-norm output at the eos position.
    hidden_states: (embeddings, layer 1, ..., layer L), each (B, T, D), without final layer norm; None unless
        requested. SDXL uses ``hidden_states[-2]``.
    text_embeds: (B, projection_dim) = text_projection(pooled); None for the model without projection.
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    text_embeds: torch.Tensor | None = None


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact (erf) GELU, transformers "gelu"


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[-1]
        max_len = self.position_embedding.num_embeddings
        if seq_len > max_len:
            raise ValueError(f"input_ids: sequence length {seq_len} exceeds max_position_embeddings {max_len}")
        positions = torch.arange(seq_len, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # scale defaults to head_dim**-0.5, as in CLIP
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder layers and final layer norm (the ``text_model`` submodule)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def eos_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position of the pooled token per row, exactly as transformers chooses it. (B, T) -> (B,)"""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            # legacy configs (SDXL): first position of the largest id, which is EOT 49407 for CLIP's vocab
            return input_ids.to(torch.int).argmax(dim=-1)
        # first position equal to eos_token_id (0 if a row has none, as in transformers)
        return (input_ids.to(torch.int) == self.config.eos_token_id).to(torch.int).argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids)  # (B, T, D)
        hidden: list[torch.Tensor] = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = self.final_layer_norm(x)  # (B, T, D)
        rows = torch.arange(last.shape[0], device=last.device)
        pooled = last[rows, self.eos_index(input_ids).to(last.device)]  # (B, D)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooled=pooled,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )


class _TextEncoderBase(nn.Module):
    config: CLIPTextConfig

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device


class CLIPTextModel(_TextEncoderBase):
    """CLIP text transformer without projection (SDXL ``text_encoder``, CLIP ViT-L/14)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids (B, T) int64 -> CLIPTextOutput (text_embeds None)."""
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)


class CLIPTextModelWithProjection(_TextEncoderBase):
    """CLIP text transformer plus ``text_projection`` (SDXL ``text_encoder_2``, OpenCLIP ViT-bigG/14)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids (B, T) int64 -> CLIPTextOutput with text_embeds (B, projection_dim)."""
        out = self.text_model(input_ids, output_hidden_states=output_hidden_states)
        out.text_embeds = self.text_projection(out.pooled)
        return out


def normalize_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of a transformers-named text-encoder state dict in our naming.

    Adds the ``text_model.`` prefix where it is missing (transformers 5 saves ``CLIPTextModel`` without it; the real
    SDXL files and ``CLIPTextModelWithProjection`` have it), keeps ``text_projection.weight`` at top level, and drops
    the ``embeddings.position_ids`` buffer that older files carry. Every other key is passed through unchanged, so a
    strict ``load_state_dict`` still reports unknown keys by name. A parameter present both with and without the
    prefix raises CheckpointError naming the key.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection."):
            new_key = key
        elif key.startswith(TEXT_MODEL_PREFIX):
            new_key = key
        else:
            new_key = TEXT_MODEL_PREFIX + key
        if new_key[len(TEXT_MODEL_PREFIX):] in _IGNORED_KEYS:
            continue
        if new_key in out:
            raise CheckpointError(
                f"text encoder state dict: key {key!r} appears both with and without the 'text_model.' prefix"
            )
        out[new_key] = value
    return out
