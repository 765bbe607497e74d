"""SDXL prompt encoding and micro-conditioning ids, as diffusers' ``StableDiffusionXLPipeline`` computes them.

``encode_prompt`` follows ``pipeline_stable_diffusion_xl.py::encode_prompt`` (diffusers 0.42; research note
sdxl.md §3.3): every (tokenizer, text encoder) pair encodes its prompt list, ``hidden_states[-2]`` (penultimate layer,
no final layer norm) of the encoders are concatenated on the feature axis -> ``prompt_embeds`` (B, 77, 768 + 1280 for
SDXL base), and the pooled vector is ``text_embeds`` of the first encoder with a projection (``text_encoder_2``).
The SDXL refiner has only ``text_encoder_2``: pass one tokenizer and one encoder; it then encodes ``prompts``.

``add_time_ids`` follows ``_get_add_time_ids`` (§3.4): ``[[orig_h, orig_w, crop_top, crop_left, target_h, target_w]]``.

A tokenizer is any callable ``tok(list_of_prompts) -> LongTensor (B, T)`` (padded and truncated to its
``model_max_length``), e.g. ``w2sd.sdxl.tokenizer.CLIPTokenizer``. A text encoder is a
``w2sd.sdxl.text_encoder.CLIPTextModel`` / ``CLIPTextModelWithProjection`` (or anything with the same call,
``dtype`` and ``device``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from w2sd.sdxl.text_encoder import CLIPTextOutput

__all__ = [
    "PromptEmbeds",
    "Tokenizer",
    "encode_prompt",
    "add_time_ids",
    "negative_add_time_ids",
    "check_add_embedding_dim",
]

Tokenizer = Callable[[list[str]], torch.Tensor]
# SDXL always takes the penultimate hidden state (diffusers: hidden_states[-2]; clip_skip=k -> -(k + 2)).
PENULTIMATE = -2


@dataclass
class PromptEmbeds:
    """Encoded prompts; the negatives are None when classifier-free guidance is off.

    prompt_embeds: (B * num_images_per_prompt, T, sum of encoder widths), e.g. (B*n, 77, 2048) for SDXL base.
    pooled: (B * num_images_per_prompt, projection_dim), ``text_embeds`` of ``text_encoder_2``.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


def _as_prompt_list(value: str | Sequence[str], name: str, batch_size: int | None = None) -> list[str]:
    """A str (broadcast to batch_size when given) or a sequence of str -> list[str] of the right length."""
    if isinstance(value, str):
        return [value] * (batch_size if batch_size is not None else 1)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name}: expected a str or a list of str, got {type(value).__name__}")
    items = list(value)
    if batch_size is not None and len(items) != batch_size:
        raise ValueError(f"{name}: has batch size {len(items)}, but prompts has batch size {batch_size}")
    return items


def _encode(
    prompt_lists: Sequence[list[str]],
    tokenizers: Sequence[Tokenizer],
    text_encoders: Sequence[torch.nn.Module],
    layer_index: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated ``hidden_states[layer_index]`` (B, T, sum D) and the first ``text_embeds`` (B, P) or None."""
    embeds: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for i, (prompts, tokenizer, encoder) in enumerate(zip(prompt_lists, tokenizers, text_encoders)):
        ids = tokenizer(prompts)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != len(prompts):
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"tokenizers[{i}]: expected a LongTensor (B={len(prompts)}, T), got {got}")
        out: CLIPTextOutput = encoder(ids.to(device=encoder.device, dtype=torch.long), output_hidden_states=True)
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds  # (B, P)
        embeds.append(out.hidden_states[layer_index])  # (B, T, D_i)
    lengths = {e.shape[1] for e in embeds}
    if len(lengths) != 1:
        raise ValueError(f"tokenizers: sequence lengths differ between encoders ({sorted(lengths)})")
    device = embeds[-1].device
    return torch.cat([e.to(device) for e in embeds], dim=-1), pooled


def encode_prompt(
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None,
    tokenizers: Sequence[Tokenizer],
    text_encoders: Sequence[torch.nn.Module],
    force_zeros_for_empty_prompt: bool,
    num_images_per_prompt: int = 1,
    do_cfg: bool = True,
    *,
    prompts_2: str | Sequence[str] | None = None,
    negative_prompts_2: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
    device: torch.device | str | None = None,
) -> PromptEmbeds:
    """Encode prompts (and negatives for CFG) exactly as diffusers' ``StableDiffusionXLPipeline.encode_prompt``.

    Args:
        prompts: one prompt or a list of B prompts (for ``tokenizers[0]`` / ``text_encoders[0]``).
        negative_prompts: None, one negative prompt (broadcast to B) or a list of B. With
            ``force_zeros_for_empty_prompt`` and ``negative_prompts is None`` the negatives are exact zeros;
            otherwise None means ``""``, which is encoded (``""`` is *not* zeroed, as in diffusers).
        tokenizers: one callable per encoder, ``tok(list_of_prompts) -> LongTensor (B, T)``.
        text_encoders: ``[text_encoder, text_encoder_2]`` (base) or ``[text_encoder_2]`` (refiner).
        force_zeros_for_empty_prompt: the pipeline's config flag (``model_index.json``; True for SDXL base).
        num_images_per_prompt: each prompt's rows are repeated this many times, consecutively.
        do_cfg: compute the negatives; when False they are None.
        prompts_2: prompts for the second encoder; None or ``""`` means ``prompts`` (a str is broadcast to B).
        negative_prompts_2: negatives for the second encoder; None or ``""`` means ``negative_prompts``.
        clip_skip: take ``hidden_states[-(clip_skip + 2)]`` for the prompts (negatives always use ``[-2]``).
        device: where the results go; default the last encoder's device.

    Returns:
        PromptEmbeds; embeddings are cast to the last text encoder's dtype (diffusers casts to
        ``text_encoder_2.dtype``), pooled vectors keep the projection encoder's dtype.
    """
    if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
        raise ValueError(
            f"tokenizers/text_encoders: expected 1 or 2 of each, paired, got {len(tokenizers)} and {len(text_encoders)}"
        )
    n = num_images_per_prompt
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt: expected an int >= 1, got {num_images_per_prompt!r}")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip: expected None or an int >= 0, got {clip_skip!r}")
    prompt_list = _as_prompt_list(prompts, "prompts")
    batch_size = len(prompt_list)
    if batch_size == 0:
        raise ValueError("prompts: empty list")
    prompt_2_list = _as_prompt_list(prompts_2 or prompts, "prompts_2", batch_size)
    last = text_encoders[-1]
    device = torch.device(device) if device is not None else last.device
    layer = PENULTIMATE if clip_skip is None else -(clip_skip + 2)

    with torch.no_grad():
        # with one encoder (refiner) only `prompts` is used, as in diffusers' zip over [prompt, prompt_2]
        embeds, pooled = _encode([prompt_list, prompt_2_list], tokenizers, text_encoders, layer)
        if pooled is None:
            raise ValueError(
                "text_encoders: none has a text_projection (CLIPTextModelWithProjection) for the pooled output"
            )

        neg_embeds = neg_pooled = None
        if do_cfg and negative_prompts is None and force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        elif do_cfg:
            negative = negative_prompts or ""
            negative_2 = negative_prompts_2 or negative
            neg_lists = [
                _as_prompt_list(negative, "negative_prompts", batch_size),
                _as_prompt_list(negative_2, "negative_prompts_2", batch_size),
            ]
            neg_embeds, neg_pooled = _encode(neg_lists, tokenizers, text_encoders, PENULTIMATE)
            if neg_embeds.shape[1] != embeds.shape[1]:
                raise ValueError(
                    f"tokenizers: negative sequence length {neg_embeds.shape[1]} != prompt length {embeds.shape[1]}"
                )

    def finish(x: torch.Tensor | None, cast: bool) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(device=device, dtype=last.dtype if cast else x.dtype)
        return x.repeat_interleave(n, dim=0)  # (B*n, ...), rows of one prompt adjacent

    return PromptEmbeds(
        prompt_embeds=finish(embeds, True),
        pooled=finish(pooled, False),
        negative_prompt_embeds=finish(neg_embeds, True),
        negative_pooled=finish(neg_pooled, False),
    )


def _size_pair(value: Sequence[float], name: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name}: expected a pair (height, width) / (top, left), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}: expected numbers, got {value!r}")
    return list(value)


def add_time_ids(
    original_size: Sequence[float],
    crops_coords_top_left: Sequence[float],
    target_size: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SDXL micro-conditioning ``[[orig_h, orig_w, crop_top, crop_left, target_h, target_w]]``, shape (1, 6).

    The pipeline passes ``dtype=prompt_embeds.dtype``; defaults are ``original_size = target_size = (H, W)`` and
    ``crops_coords_top_left = (0, 0)``.
    """
    values = (
        _size_pair(original_size, "original_size")
        + _size_pair(crops_coords_top_left, "crops_coords_top_left")
        + _size_pair(target_size, "target_size")
    )
    return torch.tensor([values], dtype=dtype, device=device)  # (1, 6)


def negative_add_time_ids(
    positive: torch.Tensor,
    negative_original_size: Sequence[float] | None = None,
    negative_crops_coords_top_left: Sequence[float] = (0, 0),
    negative_target_size: Sequence[float] | None = None,
) -> torch.Tensor:
    """The unconditional branch's ids: built from the negative sizes only when both sizes are given, else ``positive``.

    (diffusers ``__call__``: ``negative_add_time_ids = add_time_ids`` unless ``negative_original_size`` and
    ``negative_target_size`` are both set.) Result has ``positive``'s dtype and device, shape (1, 6).
    """
    if negative_original_size is not None and negative_target_size is not None:
        return add_time_ids(
            negative_original_size, negative_crops_coords_top_left, negative_target_size,
            dtype=positive.dtype, device=positive.device,
        )
    return positive


def check_add_embedding_dim(
    addition_time_embed_dim: int,
    text_encoder_projection_dim: int,
    add_embedding_in_features: int,
    num_time_ids: int = 6,
) -> None:
    """Raise ValueError when ``addition_time_embed_dim * 6 + projection_dim`` differs from the UNet's
    ``add_embedding.linear_1.in_features`` (SDXL base: 256 * 6 + 1280 = 2816), as the pipeline does."""
    passed = addition_time_embed_dim * num_time_ids + text_encoder_projection_dim
    if passed != add_embedding_in_features:
        raise ValueError(
            f"add_embedding.linear_1.in_features: the UNet expects {add_embedding_in_features}, but "
            f"addition_time_embed_dim ({addition_time_embed_dim}) * {num_time_ids} + text_encoder_2 projection_dim "
            f"({text_encoder_projection_dim}) = {passed}"
        )
