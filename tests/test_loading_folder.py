"""Loading diffusers-format SDXL folders: plain, fp16 variant, shards, HF cache snapshot, refiner-like, errors.

Oracle: a tiny random ``StableDiffusionXLPipeline`` built with diffusers/transformers (configs from sdxl.md §8.2,
``torch.manual_seed(0)``) and written with their own ``save_pretrained`` (plain, ``variant="fp16"``,
``max_shard_size``); versions in ``diffusers.__version__`` / ``transformers.__version__`` (0.42.1 / 5.24.0 when
written). Loaded weights must equal the saved ones exactly; model outputs must match the oracle modules.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import diffusers
import transformers
from helpers_tiny_sdxl import build_tiny_sdxl_pipeline
from w2sd.errors import CheckpointError
from w2sd.sdxl.loading import (
    load_scheduler_config,
    load_sdxl_components,
    load_text_encoder,
    load_text_encoder_2,
    load_tokenizer_2,
    load_unet,
    load_vae,
)
from w2sd.sdxl.loading.keymap_text import hf_clip_key

ORACLE = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
# fp32 CPU; our modules vs the oracle modules with identical weights (different kernels / op order).
UNET_ATOL = 1e-5
VAE_ATOL = 1e-5
TEXT_ATOL = 1e-5
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _reference(pipe, kind: str) -> dict[str, torch.Tensor]:
    sd = getattr(pipe, kind).state_dict()
    if kind.startswith("text_encoder"):
        sd = {hf_clip_key(k): v for k, v in sd.items() if hf_clip_key(k) is not None}
    return sd


def _assert_weights(components, pipe, cast=lambda t: t, dtype=torch.float32):
    for kind in COMPONENTS:
        ours = getattr(components, kind).state_dict()
        ref = _reference(pipe, kind)
        assert set(ours) == set(ref), kind
        for k, v in ref.items():
            assert ours[k].dtype == dtype and torch.equal(ours[k], cast(v).to(dtype)), (kind, k)


def _same(module, ref: dict[str, torch.Tensor], cast=lambda t: t) -> bool:
    sd = module.state_dict()
    return set(sd) == set(ref) and all(torch.equal(sd[k], cast(v)) for k, v in ref.items())


def test_folder_load_weights_configs_and_outputs(pipe, folder):
    c = load_sdxl_components(folder)
    _assert_weights(c, pipe)
    assert c.architecture == "sdxl_base" and c.force_zeros_for_empty_prompt is True
    assert c.scheduler_config == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert c.scheduler_config["_class_name"] == "DDIMScheduler" and c.scheduler_config["steps_offset"] == 1
    prompt = ["a photo of an astronaut! riding"]
    for ours, theirs in ((c.tokenizer, pipe.tokenizer), (c.tokenizer_2, pipe.tokenizer_2)):
        ref_ids = theirs(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ours(prompt), ref_ids)

    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for kind in ("text_encoder", "text_encoder_2"):
            ref = getattr(pipe, kind)(ids, output_hidden_states=True)
            out = getattr(c, kind)(ids, output_hidden_states=True)
            torch.testing.assert_close(out.hidden_states[-2], ref.hidden_states[-2], atol=TEXT_ATOL, rtol=0)
            if kind == "text_encoder_2":
                torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=TEXT_ATOL, rtol=0)
        torch.manual_seed(1)
        sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
        text_embeds, time_ids = torch.randn(2, 32), torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        ref = pipe.unet(sample, 500, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        out = c.unet(sample, 500, ctx, text_embeds=text_embeds, time_ids=time_ids)
        torch.testing.assert_close(out, ref, atol=UNET_ATOL, rtol=0)
        latents = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(c.vae.decode(latents), pipe.vae.decode(latents).sample, atol=VAE_ATOL, rtol=0)


def test_per_component_loaders(pipe, folder, tmp_path):
    assert _same(load_unet(folder), _reference(pipe, "unet"))
    assert _same(load_vae(folder / "vae", dtype="bf16"), _reference(pipe, "vae"), lambda t: t.bfloat16())
    with pytest.raises(ValueError, match=r"dtype: unknown dtype name 'fp8'"):
        load_vae(folder, dtype="fp8")
    assert _same(load_text_encoder_2(folder), _reference(pipe, "text_encoder_2"))
    assert load_tokenizer_2(folder).pad_token_id == 0  # "!" (sdxl.md §4.2)
    # A transformers-4 style text_encoder file: ``text_model.`` prefix plus the old position_ids buffer.
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "text_encoder"
    shutil.copytree(folder / "text_encoder", legacy)
    sd = {hf_clip_key(k): v for k, v in load_file(str(legacy / "model.safetensors")).items()}
    assert all(k.startswith("text_model.") for k in sd)
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(legacy / "model.safetensors"))
    assert _same(load_text_encoder(legacy), _reference(pipe, "text_encoder"))
    assert load_scheduler_config(folder)["beta_schedule"] == "scaled_linear"


def test_fp16_variant_explicit_and_auto_picked(pipe, folder, tmp_path):
    only = tmp_path / "only_fp16"
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(only, safe_serialization=True, variant="fp16")
    assert (only / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    # variant files only: picked without asking; read as fp16, converted per tensor to fp32
    c = load_sdxl_components(only)
    assert "only variant 'fp16'" in c.source
    _assert_weights(c, pipe, cast=lambda t: t.half(), dtype=torch.float32)
    # both present: variant="fp16" chooses them, dtype float16 keeps them as they are
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    for kind in COMPONENTS:
        for f in (only / kind).glob("*.fp16.safetensors"):
            shutil.copy(f, both / kind / f.name)
    c16 = load_sdxl_components(both, dtype=torch.float16, variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in c16.source
    _assert_weights(c16, pipe, cast=lambda t: t.half(), dtype=torch.float16)
    c32 = load_sdxl_components(both)  # default: the plain fp32 files
    _assert_weights(c32, pipe)


def test_sharded_checkpoints(pipe, tmp_path):
    sharded = tmp_path / "sharded"
    pipe.save_pretrained(sharded, safe_serialization=True, max_shard_size="2MB")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (sharded / "text_encoder" / "model.safetensors.index.json").is_file()
    c = load_sdxl_components(sharded)
    assert "shards" in c.source
    _assert_weights(c, pipe)
    # diffusers' own naming for a sharded fp16 variant
    unet_dir = tmp_path / "unet_v"
    copy.deepcopy(pipe.unet).to(torch.float16).save_pretrained(
        unet_dir, safe_serialization=True, variant="fp16", max_shard_size="2MB"
    )
    assert any(p.name.endswith(".index.fp16.json") for p in unet_dir.iterdir())
    shutil.copy(sharded / "unet" / "config.json", unet_dir / "config.json")
    unet = load_unet(unet_dir, variant="fp16", dtype=torch.float16)
    assert _same(unet, _reference(pipe, "unet"), lambda t: t.half())


def _make_hf_cache(folder: Path, cache: Path, repo: str = "models--tiny-org--tiny-sdxl") -> tuple[Path, Path]:
    """HF hub cache layout: blobs named by sha256, snapshot files as relative symlinks into blobs."""
    root = cache / repo
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root, snap


def test_hf_cache_snapshot_layout(pipe, folder, tmp_path, monkeypatch):
    root, snap = _make_hf_cache(folder, tmp_path / "hub")
    assert (snap / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    for path in (snap, root):
        _assert_weights(load_sdxl_components(path), pipe)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert torch.equal(load_unet("tiny-org/tiny-sdxl").conv_in.weight, pipe.unet.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_unet("tiny-org/absent")
    (root / "refs" / "main").rename(root / "refs" / "other")
    _assert_weights(load_sdxl_components(root), pipe)  # no refs/main, one snapshot: that one
    (root / "snapshots" / "fedcba").mkdir()
    with pytest.raises(CheckpointError, match=r"without refs/main; snapshots present: \['0123.*', 'fedcba'\]"):
        load_sdxl_components(root)
    (root / "snapshots" / "fedcba").rmdir()
    blob = (snap / "vae" / "diffusion_pytorch_model.safetensors").resolve()
    blob.unlink()  # a partly downloaded cache entry
    with pytest.raises(FileNotFoundError, match=r"vae/diffusion_pytorch_model.safetensors is a symlink .*blob"):
        load_sdxl_components(root)


def test_refiner_like_folder_without_text_encoder(pipe, folder, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(folder, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True,
                 force_zeros_for_empty_prompt=False, _class_name="StableDiffusionXLImg2ImgPipeline")
    (refiner / "model_index.json").write_text(json.dumps(index))
    c = load_sdxl_components(refiner)
    assert c.text_encoder is None and c.tokenizer is None and c.tokenizer_2 is not None
    assert c.architecture == "sdxl_refiner" and c.requires_aesthetics_score and not c.force_zeros_for_empty_prompt
    assert torch.equal(c.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight)


def test_missing_component_and_bad_folders(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"component 'vae' is listed in model_index.json but .*broken/vae is missing"):
        load_sdxl_components(broken)
    shutil.copytree(folder / "vae", broken / "vae")
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"required component 'text_encoder_2' is listed as \[null, null\]"):
        load_sdxl_components(broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        load_sdxl_components(broken)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sdxl_components(tmp_path / "nowhere")


def test_mis_shaped_and_truncated_component_file(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    unet_file = bad / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(unet_file))
    sd["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    del sd["conv_out.bias"]
    save_file(sd, str(unet_file))
    with pytest.raises(CheckpointError) as info:
        load_sdxl_components(bad)
    msg = str(info.value)
    assert "UNet" in msg and "conv_in.weight: [32, 5, 3, 3] vs [32, 4, 3, 3]" in msg and "conv_out.bias" in msg
    te_file = bad / "text_encoder_2" / "model.safetensors"
    te_file.write_bytes(te_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"text_encoder_2/model.safetensors: truncated"):
        load_text_encoder_2(bad)
