"""Parity of w2sd.sdxl.prompt with diffusers' StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids.

Oracle: diffusers + transformers (versions printed by ``test_oracle_versions``). A tiny SDXL pipeline (research note
sdxl.md §8.2: tiny UNet/VAE, tiny CLIP text encoders with eos_token_id=2, weights from transformers' init under
``torch.manual_seed(SEED)`` plus seeded N(0, WEIGHT_NOISE) perturbation) with transformers ``CLIPTokenizer`` objects
built from the real CLIP BPE (``tests/helpers_clip_vocab.py``; tokenizer_2 pads with "!"). Our side loads the same
weights into w2sd's text encoders and tokenizes with ``w2sd.sdxl.tokenizer.CLIPTokenizer`` (the HF wrapper when it
is not available, and in one test on purpose). CPU, float32.
"""

from __future__ import annotations

import functools

import pytest
import torch

import diffusers  # noqa: E402  (test extra; a missing oracle must fail, not skip)
import transformers  # noqa: E402  (test extra; a missing oracle must fail, not skip)

from helpers_clip_vocab import EOS_TOKEN, HFTokenizerCallable, hf_clip_tokenizer  # noqa: E402

from w2sd.sdxl.prompt import (  # noqa: E402
    PromptEmbeds,
    add_time_ids,
    check_add_embedding_dim,
    encode_prompt,
    negative_add_time_ids,
)
from w2sd.sdxl.text_encoder import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    normalize_text_encoder_keys,
)

try:  # prefer w2sd's own tokenizer (written in parallel); fall back to wrapping transformers'
    from w2sd.sdxl.tokenizer import CLIPTokenizer as W2SDTokenizer
except ImportError:  # pragma: no cover - depends on the state of the tree
    W2SDTokenizer = None

from helpers_tiny_sdxl import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG  # noqa: E402

SEED = 0
WEIGHT_NOISE = 0.1
ATOL = 1e-5  # max abs error, float32 on CPU
TE_TINY = TINY_TEXT_CONFIG


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WEIGHT_NOISE)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _pipe_parts():
    """Tiny diffusers SDXL components (cached; never mutated)."""
    torch.manual_seed(SEED)
    te1 = _perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TE_TINY, hidden_act="quick_gelu")))
    te2 = _perturbed(
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TE_TINY, hidden_act="gelu"))
    )
    unet = diffusers.UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = diffusers.AutoencoderKL(**TINY_VAE_CONFIG)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
        clip_sample=False, timestep_spacing="leading",
    )
    tok1, tok2 = hf_clip_tokenizer(EOS_TOKEN), hf_clip_tokenizer("!")
    return dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
                scheduler=scheduler)


def _pipe(force_zeros: bool, refiner: bool = False):
    parts = dict(_pipe_parts())
    if refiner:
        parts.update(text_encoder=None, tokenizer=None)
    return diffusers.StableDiffusionXLPipeline(
        **parts, force_zeros_for_empty_prompt=force_zeros, add_watermarker=False
    )


def _our_encoder(hf_model, with_projection: bool):
    import json

    cfg = CLIPTextConfig.from_dict(json.loads(hf_model.config.to_json_string()))
    ours = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()
    ours.load_state_dict(normalize_text_encoder_keys(hf_model.state_dict()), strict=True)
    return ours


@functools.lru_cache(maxsize=None)
def _ours(use_hf_tokenizer: bool = False):
    parts = _pipe_parts()
    encoders = [_our_encoder(parts["text_encoder"], False), _our_encoder(parts["text_encoder_2"], True)]
    if W2SDTokenizer is not None and not use_hf_tokenizer:
        tokenizers = [W2SDTokenizer.from_bundled(pad_token=EOS_TOKEN), W2SDTokenizer.from_bundled(pad_token="!")]
    else:
        tokenizers = [HFTokenizerCallable(parts["tokenizer"]), HFTokenizerCallable(parts["tokenizer_2"])]
    return tokenizers, encoders


def _max_err(a, b) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a - b).abs().max().item()


def _compare(ours: PromptEmbeds, ref: tuple, cfg: bool = True) -> None:
    pe, npe, pooled, npooled = ref
    assert _max_err(ours.prompt_embeds, pe) <= ATOL
    assert _max_err(ours.pooled, pooled) <= ATOL
    if cfg:
        assert _max_err(ours.negative_prompt_embeds, npe) <= ATOL
        assert _max_err(ours.negative_pooled, npooled) <= ATOL
    else:
        assert ours.negative_prompt_embeds is None and ours.negative_pooled is None
        assert npe is None and npooled is None


def _run_both(force_zeros=True, prompt="a photo of an astronaut riding a horse", negative=None, prompt_2=None,
              negative_2=None, n=1, cfg=True, clip_skip=None, use_hf_tokenizer=False):
    ref = _pipe(force_zeros).encode_prompt(
        prompt, prompt_2=prompt_2, device="cpu", num_images_per_prompt=n, do_classifier_free_guidance=cfg,
        negative_prompt=negative, negative_prompt_2=negative_2, clip_skip=clip_skip,
    )
    tokenizers, encoders = _ours(use_hf_tokenizer)
    ours = encode_prompt(
        prompt, negative, tokenizers, encoders, force_zeros, n, cfg,
        prompts_2=prompt_2, negative_prompts_2=negative_2, clip_skip=clip_skip,
    )
    return ours, ref


def test_oracle_versions():
    print(f"oracle: diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"torch {torch.__version__}")
    print(f"tokenizer under test: {'w2sd' if W2SDTokenizer is not None else 'transformers (wrapped)'}")


def test_plain_prompt_cfg_force_zeros():
    ours, ref = _run_both(force_zeros=True)
    _compare(ours, ref)
    assert ours.prompt_embeds.shape == (1, 77, 64) and ours.pooled.shape == (1, 32)
    assert torch.count_nonzero(ours.negative_prompt_embeds) == 0 and torch.count_nonzero(ours.negative_pooled) == 0


def test_negative_prompt_batch():
    prompts = ["a red fox! in the snow", "an oil painting of a lighthouse at dusk, 4k"]
    ours, ref = _run_both(prompt=prompts, negative=["blurry", "low quality, jpeg artifacts"])
    _compare(ours, ref)
    ours, ref = _run_both(prompt=prompts, negative="blurry")  # one negative broadcast to the batch
    _compare(ours, ref)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_empty_negative_is_encoded(force_zeros):
    """diffusers zeroes only negative_prompt=None; "" is encoded even with force_zeros_for_empty_prompt."""
    ours, ref = _run_both(force_zeros=force_zeros, negative="")
    _compare(ours, ref)
    assert torch.count_nonzero(ours.negative_prompt_embeds) > 0


def test_no_force_zeros_none_negative_encodes_empty_string():
    ours, ref = _run_both(force_zeros=False, negative=None)
    _compare(ours, ref)
    ours_empty, _ = _run_both(force_zeros=False, negative="")
    assert torch.equal(ours.negative_prompt_embeds, ours_empty.negative_prompt_embeds)


def test_prompt_2_and_negative_prompt_2():
    ours, ref = _run_both(prompt="a cat", prompt_2="a watercolor dog", negative="ugly", negative_2="oversaturated")
    _compare(ours, ref)
    same, _ = _run_both(prompt="a cat", negative="ugly")
    # the first encoder's slice is unchanged, the second encoder's differs
    assert torch.equal(ours.prompt_embeds[..., :32], same.prompt_embeds[..., :32])
    assert not torch.allclose(ours.prompt_embeds[..., 32:], same.prompt_embeds[..., 32:])


def test_num_images_per_prompt():
    ours, ref = _run_both(prompt=["a cat", "a dog on a skateboard"], negative=["rain", ""], n=2)
    _compare(ours, ref)
    assert ours.prompt_embeds.shape[0] == 4 and torch.equal(ours.prompt_embeds[0], ours.prompt_embeds[1])
    ours, ref = _run_both(prompt=["a cat", "a dog"], n=2)  # zero negatives repeated too
    _compare(ours, ref)


def test_no_cfg_and_clip_skip():
    ours, ref = _run_both(cfg=False)
    _compare(ours, ref, cfg=False)
    ours, ref = _run_both(negative="blurry", clip_skip=1)  # prompt uses hidden_states[-3], negative still [-2]
    _compare(ours, ref)


def test_any_tokenizer_callable_hf_wrapper():
    ours, ref = _run_both(prompt=["a cat!! wow", "dog"], negative="bad", use_hf_tokenizer=True)
    _compare(ours, ref)


def test_refiner_single_encoder_path():
    """Only text_encoder_2 (SDXL refiner): diffusers encodes `prompt` with it; pooled is its text_embeds."""
    pipe = _pipe(force_zeros=False, refiner=True)
    ref = pipe.encode_prompt("a castle", prompt_2="ignored by the refiner", device="cpu", negative_prompt="fog")
    tokenizers, encoders = _ours()
    ours = encode_prompt("a castle", "fog", tokenizers[1:], encoders[1:], False, prompts_2="ignored by the refiner")
    _compare(ours, ref)
    assert ours.prompt_embeds.shape == (1, 77, 32)


def test_errors_name_the_argument():
    tokenizers, encoders = _ours()
    with pytest.raises(ValueError, match="negative_prompts"):
        encode_prompt(["a", "b"], ["x"], tokenizers, encoders, True)
    with pytest.raises(ValueError, match="text_projection"):
        encode_prompt("a", None, tokenizers[:1], encoders[:1], True)
    with pytest.raises(ValueError, match="tokenizers"):
        encode_prompt("a", None, tokenizers[:1], encoders, True)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        encode_prompt("a", None, tokenizers, encoders, True, 0)


def test_dtype_follows_last_encoder():
    tokenizers, encoders = _ours()
    half = [_our_encoder(_pipe_parts()["text_encoder"], False), _our_encoder(_pipe_parts()["text_encoder_2"], True)]
    half = [e.to(torch.bfloat16) for e in half]
    out = encode_prompt("a cat", "", tokenizers, half, True)
    assert out.prompt_embeds.dtype == out.negative_prompt_embeds.dtype == torch.bfloat16
    assert out.pooled.dtype == torch.bfloat16
    assert encoders[0].dtype == torch.float32  # the cached fp32 encoders were not touched


@pytest.mark.parametrize(
    "original,crop,target,dtype",
    [((1024, 1024), (0, 0), (1024, 1024), torch.float32), ((768, 1344), (32, 64), (1024, 896), torch.float16)],
)
def test_add_time_ids_match_pipeline(original, crop, target, dtype):
    pipe = _pipe(True)
    proj = pipe.text_encoder_2.config.projection_dim
    ref = pipe._get_add_time_ids(original, crop, target, dtype=dtype, text_encoder_projection_dim=proj)
    ours = add_time_ids(original, crop, target, dtype=dtype)
    assert ours.shape == (1, 6) and ours.dtype == ref.dtype and torch.equal(ours, ref)
    unet = pipe.unet
    check_add_embedding_dim(unet.config.addition_time_embed_dim, proj, unet.add_embedding.linear_1.in_features)


def test_negative_add_time_ids_and_checks():
    pos = add_time_ids((1024, 1024), (0, 0), (1024, 1024))
    assert negative_add_time_ids(pos) is pos
    assert negative_add_time_ids(pos, negative_original_size=(512, 512)) is pos  # both sizes needed, as in diffusers
    neg = negative_add_time_ids(pos, (512, 512), (0, 0), (1024, 1024))
    assert neg.tolist() == [[512.0, 512.0, 0.0, 0.0, 1024.0, 1024.0]]
    with pytest.raises(ValueError, match="crops_coords_top_left"):
        add_time_ids((1024, 1024), (0,), (1024, 1024))
    with pytest.raises(ValueError, match="in_features"):
        check_add_embedding_dim(256, 1280, 2817)
    check_add_embedding_dim(256, 1280, 2816)  # SDXL base
