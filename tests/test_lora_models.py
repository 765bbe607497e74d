"""Tiny SDXL-topology models and kohya-file builders shared by the LoRA tests (plus sanity checks of the helpers).

Models: our ``w2sd.sdxl.unet.UNet2DConditionModel`` and ``w2sd.sdxl.text_encoder`` CLIP models on the tiny config
of research/sdxl.md §8.2, float32, CPU, weights from ``torch.manual_seed(seed)`` (our init) plus N(0, WEIGHT_NOISE)
noise so that no weight is a trivial 0 / 1. kohya files are written the way kohya-ss sd-scripts names them
(research/sdxl.md §6.1): ``lora_unet_<SGM path with _>``, ``lora_te1_text_model_...``, ``lora_te2_...``.
This module imports no oracle library, so the tests that only need the kohya merge formula stay fast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from w2sd.lora.kohya_names import diffusers_to_sgm_module_paths, lora_target_paths
from w2sd.sdxl.text_encoder import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig

from helpers_tiny_sdxl import TINY_UNET_CONFIG  # noqa: E402  (research/sdxl.md §8.2 tiny SDXL topology)

WEIGHT_NOISE = 0.05
# research/sdxl.md §8.2: same block topology as SDXL (DownBlock2D + 2 cross-attn blocks, depth [1, 2, 2]).
TINY_UNET = TINY_UNET_CONFIG
TINY_TE = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32,
               vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SEQ = 8  # text length used in the tests (positions 0..7 of the 77)

# kohya-ss sd-scripts networks/lora.py targets (research/sdxl.md §6.1): Linear / 1x1-conv children of Transformer2D,
# CLIP attention / MLP linears, and with conv_dim (LoCon) the resnet / down- / upsampler convs.
KOHYA_UNET_LEAVES = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
KOHYA_LOCON_LEAVES = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
KOHYA_TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run these tiny-model tests on one intra-op thread: on the shared 2-core box two OpenMP threads spin against
    other processes and make each tiny forward 20-100x slower. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * WEIGHT_NOISE)
    return model.eval()


def our_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return _perturb(UNet2DConditionModel(UNetConfig.from_dict(TINY_UNET)), seed + 100)


def our_text_encoders(seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig.from_dict(dict(TINY_TE, hidden_act="quick_gelu")))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(TINY_TE, hidden_act="gelu")))
    return _perturb(te1, seed + 200), _perturb(te2, seed + 300)


def unet_inputs(seed: int = 1, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),  # (B, 4, H, W)
        timestep=torch.tensor(417),
        encoder_hidden_states=torch.randn(batch, SEQ, 64, generator=g),  # (B, L, cross_attention_dim)
        text_embeds=torch.randn(batch, 32, generator=g),  # (B, pooled)
        time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1),  # (B, 6)
    )


def text_ids(seed: int = 2, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_TE["vocab_size"], (batch, SEQ), generator=g)
    ids[:, 0] = TINY_TE["bos_token_id"]
    ids[:, -1] = TINY_TE["eos_token_id"]
    return ids  # (B, SEQ)


@torch.no_grad()
def run_ours(models: dict[str, nn.Module], inputs: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of our UNet and text encoders (every tensor a LoRA can change)."""
    out = {"unet": models["unet"](**inputs)}
    if "text_encoder" in models:
        out["te1"] = models["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
    if "text_encoder_2" in models:
        o = models["text_encoder_2"](ids, output_hidden_states=True)
        out["te2"], out["te2_embeds"] = o.hidden_states[-2], o.text_embeds
    return out


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the reference's scale)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------- kohya files


def kohya_unet_names(unet: nn.Module, locon: bool = True) -> dict[str, str]:
    """``{kohya name: diffusers module path}`` for the modules kohya's SDXL LoRA (+ LoCon) trains.

    The kohya names are ``lora_unet_`` + the SGM path with ``.`` -> ``_`` (research/sdxl.md §6.1); the SGM paths
    come from ``diffusers_to_sgm_module_paths``, which ``test_lora_names`` checks against diffusers' converter.
    """
    paths = [n for n, _ in unet.named_modules()]
    sgm = diffusers_to_sgm_module_paths(paths)
    leaves = KOHYA_UNET_LEAVES + (KOHYA_LOCON_LEAVES if locon else ())
    out = {}
    for path in lora_target_paths(unet):
        in_transformer = ".attentions." in path and path.endswith(KOHYA_UNET_LEAVES)
        in_resnet = (".resnets." in path or "samplers.0." in path) and path.endswith(KOHYA_LOCON_LEAVES)
        if in_transformer or (locon and in_resnet and path.endswith(leaves)):
            out["lora_unet_" + sgm[path].replace(".", "_")] = path
    return out


def kohya_te_names(te: nn.Module, prefix: str) -> dict[str, str]:
    """``{kohya name: module path}`` for the CLIP attention / MLP linears (``lora_te1`` / ``lora_te2``)."""
    out = {}
    for path in lora_target_paths(te):
        if ".layers." in path and path.endswith(KOHYA_TE_LEAVES):
            full = path if path.startswith("text_model.") else "text_model." + path
            out[f"{prefix}_{full.replace('.', '_')}"] = path
    return out


def make_kohya_state_dict(
    targets: dict[str, nn.Module],
    rank: int,
    alpha: Callable[[str, int], float | None],
    seed: int,
    std: float = 0.2,
    conv_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random kohya tensors for ``{kohya name: base module}``.

    ``alpha(name, i)`` gives the alpha of the i-th module (None: no ``.alpha`` key). Conv modules get a LoCon pair:
    down (r, C_in, kh, kw) with the base kernel, up (C_out, r, 1, 1).
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (name, base) in enumerate(targets.items()):
        if isinstance(base, nn.Conv2d):
            r = conv_rank or rank
            kh, kw = base.kernel_size
            down = torch.randn(r, base.in_channels, kh, kw, generator=g) * std
            up = torch.randn(base.out_channels, r, 1, 1, generator=g) * std
        else:
            r = rank
            down = torch.randn(r, base.in_features, generator=g) * std
            up = torch.randn(base.out_features, r, generator=g) * std
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        a = alpha(name, i)
        if a is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(a))
    return sd


def kohya_merge(model: nn.Module, names: dict[str, str], sd: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """A deep copy of ``model`` with kohya's merge formula applied by hand (research/sdxl.md §6.1):
    ``W += scale * (alpha / r) * up @ down`` (3x3 conv: ``(up.flatten(1) @ down.flatten(1)).reshape(W.shape)``),
    in float64, alpha missing -> alpha = r."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, path in names.items():
            down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
            r = down.shape[0]
            alpha = sd[f"{name}.alpha"].item() if f"{name}.alpha" in sd else r
            w = modules[path].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            w.copy_((w.double() + scale * (alpha / r) * delta).to(w.dtype))
    return merged


def tiny_models(seed: int = 0) -> dict[str, nn.Module]:
    te1, te2 = our_text_encoders(seed)
    return {"unet": our_unet(seed), "text_encoder": te1, "text_encoder_2": te2}


def kohya_targets(
    models: dict[str, nn.Module], locon: bool = True
) -> tuple[dict[str, nn.Module], dict[str, tuple[str, str]]]:
    """All kohya targets of the three components: ``{name: module}`` and ``{name: (component, path)}``."""
    where: dict[str, tuple[str, str]] = {}
    for name, path in kohya_unet_names(models["unet"], locon).items():
        where[name] = ("unet", path)
    for comp, prefix in (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        if comp in models:
            for name, path in kohya_te_names(models[comp], prefix).items():
                where[name] = (comp, path)
    mods = {name: models[comp].get_submodule(path) for name, (comp, path) in where.items()}
    return mods, where


def merge_all(
    models: dict[str, nn.Module], where: dict[str, tuple[str, str]], sd: dict, scale: float
) -> dict[str, nn.Module]:
    """``kohya_merge`` applied to every component (the oracle for a multi-component LoRA)."""
    return {
        comp: kohya_merge(model, {n: p for n, (c, p) in where.items() if c == comp}, sd, scale)
        for comp, model in models.items()
    }


# ----------------------------------------------------------------------------------------- sanity of the helpers


def test_kohya_target_lists_cover_every_kind():
    models = tiny_models()
    mods, where = kohya_targets(models)
    leaves = {p.rsplit(".", 1)[-1] for _, p in where.values()}
    # attention / ff / proj, LoCon convs incl. 3x3 and samplers, te attention + mlp
    for leaf in ("to_q", "to_k", "to_v", "0", "proj", "2", "proj_in", "proj_out", "conv1", "conv2",
                 "conv_shortcut", "time_emb_proj", "conv", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert leaf in leaves, leaf
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in mods.values())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in where
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in where


def test_kohya_merge_helper_changes_each_target_once():
    models = tiny_models()
    mods, where = kohya_targets(models)
    sd = make_kohya_state_dict(mods, rank=2, alpha=lambda n, i: 1.0, seed=3)
    merged = merge_all(models, where, sd, 0.5)
    for name, (comp, path) in where.items():
        base_w = models[comp].get_submodule(path).weight
        new_w = merged[comp].get_submodule(path).weight
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        expect = 0.5 * (1.0 / 2) * (up.flatten(1) @ down.flatten(1)).reshape(base_w.shape)
        assert torch.allclose(new_w - base_w, expect, atol=1e-6), name
