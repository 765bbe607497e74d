"""Our LoRA branches on our UNet / text encoders vs diffusers' own LoRA loading (uniform alpha) and PEFT files.

Oracles (versions printed by ``test_oracle_versions``), tiny SDXL-topology models (research/sdxl.md §8.2), float32,
CPU, weights: diffusers / transformers init under ``torch.manual_seed(SEED_MODELS)`` plus seeded N(0, WEIGHT_NOISE).
Our models get the same weights through a strict ``load_state_dict``.
- kohya file (``make_kohya_state_dict``, uniform alpha, attention + ff + proj + LoCon convs + TE linears):
  ``StableDiffusionXLPipeline.load_lora_weights`` + ``set_adapters(["x"], [w])`` for w in {0.8, -1.5}.
- PEFT file: adapters added with peft ``LoraConfig`` (``alpha_pattern``, ``rank_pattern``, ``use_rslora``),
  exported with ``get_peft_model_state_dict`` and ``StableDiffusionXLPipeline.save_lora_weights`` (metadata
  included); oracle = the peft-injected models themselves (adapter weight 1) and a pipeline re-loading the file.
- old diffusers file (``processor.to_q_lora.down.weight`` / ``lora_linear_layer``) rewritten from the PEFT tensors;
  oracle = ``load_lora_weights`` of that file.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_lora_models import (
    TINY_TE,
    TINY_UNET,
    kohya_targets,
    make_kohya_state_dict,
    max_rel_err,
    run_ours,
    single_thread,  # noqa: F401  (autouse fixture)
    text_ids,
    unet_inputs,
    _perturb,
)
from w2sd.lora import attach_lora, load_lora
from w2sd.sdxl.text_encoder import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    normalize_text_encoder_keys,
)
from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig

import diffusers  # noqa: E402  (test extra; a missing oracle must fail, not skip)
import transformers  # noqa: E402  (test extra; a missing oracle must fail, not skip)
import peft  # noqa: E402  (test extra; a missing oracle must fail, not skip)

PARITY_RTOL = 1e-4  # max |ours - diffusers| / max |diffusers|, float32 (the required bound; measured <= 2.6e-6)
SEED_MODELS, SEED_KOHYA, SEED_PEFT = 0, 21, 22
USER_SCALES = (0.8, -1.5)  # W2SD main and weak scales


def test_oracle_versions():
    print(f"oracles: diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, torch {torch.__version__}")


def _oracle_models():
    torch.manual_seed(SEED_MODELS)
    unet = _perturb(diffusers.UNet2DConditionModel(**TINY_UNET), SEED_MODELS + 100)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TE, hidden_act="quick_gelu"))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_TE, hidden_act="gelu"))
    return {"unet": unet, "text_encoder": _perturb(te1, 200), "text_encoder_2": _perturb(te2, 300)}


def _ours_from(oracle: dict) -> dict:
    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNET))
    unet.load_state_dict(oracle["unet"].state_dict(), strict=True)
    te1 = CLIPTextModel(CLIPTextConfig.from_dict(dict(TINY_TE, hidden_act="quick_gelu")))
    te1.load_state_dict(normalize_text_encoder_keys(oracle["text_encoder"].state_dict()), strict=True)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(TINY_TE, hidden_act="gelu")))
    te2.load_state_dict(normalize_text_encoder_keys(oracle["text_encoder_2"].state_dict()), strict=True)
    return {"unet": unet.eval(), "text_encoder": te1.eval(), "text_encoder_2": te2.eval()}


@torch.no_grad()
def _run_oracle(m: dict, inputs: dict, ids: torch.Tensor) -> dict:
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    out = {"unet": m["unet"](inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                             added_cond_kwargs=added).sample}
    out["te1"] = m["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
    o = m["text_encoder_2"](ids, output_hidden_states=True)
    out["te2"], out["te2_embeds"] = o.hidden_states[-2], o.text_embeds
    return out


def _pipe(m: dict):
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"], tokenizer=None,
        tokenizer_2=None, unet=m["unet"], scheduler=None)


def _assert_parity(ours: dict, ref: dict, base: dict) -> None:
    for k in ref:
        err = max_rel_err(ours[k], ref[k])
        assert err <= PARITY_RTOL, f"{k}: max rel err {err:.3e} > {PARITY_RTOL}"
        assert max_rel_err(ref[k], base[k]) > 1e-3, f"{k}: the LoRA changes nothing in the oracle"


@pytest.fixture(scope="module")
def models():
    oracle = _oracle_models()
    ours = _ours_from(oracle)
    inputs, ids = unet_inputs(), text_ids()
    base = _run_oracle(oracle, inputs, ids)
    for k, v in run_ours(ours, inputs, ids).items():  # same base models before any LoRA
        assert max_rel_err(v, base[k]) <= PARITY_RTOL, k
    return oracle, ours, inputs, ids, base


def test_kohya_uniform_alpha_matches_diffusers_load_lora_weights(models, tmp_path):
    oracle, ours, inputs, ids, base = models
    mods, _ = kohya_targets(ours)  # attention, ff, proj_in/out, LoCon 3x3 + 1x1 convs, time_emb_proj, TE linears
    sd = make_kohya_state_dict(mods, rank=4, alpha=lambda n, i: 2.0, seed=SEED_KOHYA, conv_rank=4)
    path = tmp_path / "kohya_lora.safetensors"
    save_file(sd, str(path))

    pipe = _pipe(copy.deepcopy(oracle))
    pipe.load_lora_weights(str(path), adapter_name="x")
    lora = load_lora(path)
    assert lora.format == "kohya" and len(lora) == len(mods)
    handle = attach_lora(ours, lora, name="x")
    try:
        for w in USER_SCALES:
            pipe.set_adapters(["x"], [w])
            handle.scale = w
            ref = _run_oracle({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                               "text_encoder_2": pipe.text_encoder_2}, inputs, ids)
            _assert_parity(run_ours(ours, inputs, ids), ref, base)
    finally:
        handle.detach()


@pytest.fixture(scope="module")
def peft_file(models, tmp_path_factory):
    """Add peft adapters to copies of the oracle models and export them the way diffusers does."""
    oracle = models[0]
    tmp_path = tmp_path_factory.mktemp("peft")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    m = copy.deepcopy(oracle)
    torch.manual_seed(SEED_PEFT)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
                           alpha_pattern={"to_q": 2.0}, rank_pattern={"to_k": 2}),
        "text_encoder": LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj", "fc2"]),
    }
    m["unet"].add_adapter(configs["unet"], adapter_name="p")  # diffusers' PeftAdapterMixin
    for comp in ("text_encoder", "text_encoder_2"):  # transformers' add_adapter wants peft >= 0.22; inject directly
        inject_adapter_in_model(configs[comp], m[comp], adapter_name="p")
    layers = {c: get_peft_model_state_dict(m[c], adapter_name="p") for c in configs}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    return m, tmp_path / "pytorch_lora_weights.safetensors"


def test_peft_file_with_metadata_matches_peft_and_diffusers(models, peft_file):
    oracle, ours, inputs, ids, base = models
    injected, path = peft_file
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    assert meta["unet.alpha_pattern"] == {"to_q": 2.0} and meta["text_encoder_2.use_rslora"] is True
    lora = load_lora(path)
    assert lora.format == "peft"
    by_target = {(m.component, m.target): m for m in lora.modules}
    q = by_target[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")]
    k = by_target[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k")]
    assert (q.rank, q.multiplier, k.rank, k.multiplier) == (4, 0.5, 2, 4.0)  # alpha_pattern / rank_pattern
    assert by_target[("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2")].multiplier == 8 / 4 ** 0.5  # rsLoRA

    handle = attach_lora(ours, lora, name="p", scale=1.0)
    try:
        # peft-injected models at adapter weight 1 (independent of diffusers' loader)
        _assert_parity(run_ours(ours, inputs, ids), _run_oracle(injected, inputs, ids), base)
        pipe = _pipe(copy.deepcopy(oracle))
        pipe.load_lora_weights(str(path), adapter_name="p")
        pipe.set_adapters(["p"], [-1.5])
        handle.scale = -1.5
        ref = _run_oracle({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                           "text_encoder_2": pipe.text_encoder_2}, inputs, ids)
        _assert_parity(run_ours(ours, inputs, ids), ref, base)
    finally:
        handle.detach()


def test_old_diffusers_format_matches_diffusers(models, peft_file, tmp_path):
    """``unet.<attn>.processor.to_q_lora.down.weight`` and ``text_encoder.<...>.q_proj.lora_linear_layer`` keys."""
    oracle, ours, inputs, ids, base = models
    _, path = peft_file
    with safe_open(str(path), "pt") as f:
        peft_sd = {k: f.get_tensor(k) for k in f.keys()}
    old = {}
    for key, t in peft_sd.items():
        module, ab = key.rsplit(".lora_", 1)
        side = "down" if ab.startswith("A") else "up"
        if module.startswith("unet.") and ".attn" in module:
            if module.endswith("to_out.0"):
                stem, leaf = module[: -len(".to_out.0")], "to_out"
            else:
                stem, leaf = module.rsplit(".", 1)
            old[f"{stem}.processor.{leaf}_lora.{side}.weight"] = t
        elif module.startswith("text_encoder"):
            old[f"{module}.lora_linear_layer.{side}.weight"] = t
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    path_old = tmp_path / "old.safetensors"
    save_file(old, str(path_old))  # no metadata, no alphas: alpha = rank
    lora = load_lora(path_old)
    assert lora.format == "diffusers_old" and all(m.multiplier == 1.0 for m in lora.modules)

    pipe = _pipe(copy.deepcopy(oracle))
    pipe.load_lora_weights(str(path_old), adapter_name="o")
    pipe.set_adapters(["o"], [0.8])
    handle = attach_lora(ours, lora, name="o", scale=0.8)
    try:
        ref = _run_oracle({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                           "text_encoder_2": pipe.text_encoder_2}, inputs, ids)
        _assert_parity(run_ours(ours, inputs, ids), ref, base)
    finally:
        handle.detach()
