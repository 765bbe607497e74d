"""Single-file SGM/LDM checkpoints (SDXL base / refiner layout) against the diffusers-folder load.

Oracle: a tiny random ``StableDiffusionXLPipeline`` (diffusers/transformers, versions in ``__version__``; configs
sdxl.md §8.2; ``torch.manual_seed(0)``) saved with ``save_pretrained``; the single file is written from that folder
with w2sd's inverse maps (OpenCLIP packing, transposed projection, 1x1-conv VAE attention, plus ``position_ids`` /
``logit_scale`` / ``denoiser.sigmas`` junk). That the forward maps equal diffusers' own converters is proven in
``test_loading_keymaps.py``; here the file must load into our modules with weights identical to the folder load,
and therefore identical outputs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from helpers_tiny_sdxl import SGM_TE1_PREFIX, SGM_TE2_PREFIX, cached_tiny_sdxl, write_sgm_single_file
from w2sd.errors import CheckpointError
from w2sd.sdxl.loading import (
    CheckpointReader,
    detect_architecture,
    load_sdxl_components,
    load_text_encoder,
    load_text_encoder_2,
    load_tokenizer,
    load_tokenizer_2,
    load_unet,
    load_vae,
)

ORACLE = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
# Same weights, same modules, same inputs: outputs must be bit-identical.
SINGLE_VS_FOLDER_ATOL = 0.0
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# The fixture file carries denoiser.sigmas on purpose; its "ignored keys" warning is asserted once, below.
pytestmark = pytest.mark.filterwarnings("ignore:.*outside the SDXL components")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_tiny_sdxl(tmp_path_factory)  # shared with other test files in the session; not modified here


@pytest.fixture(scope="module")
def sgm_file(folder, tmp_path_factory):
    return write_sgm_single_file(folder, tmp_path_factory.mktemp("sgm") / "tiny_sdxl_sgm.safetensors", junk=True)


@pytest.fixture(scope="module")
def folder_components(folder):
    return load_sdxl_components(folder)


def _same_weights(a, b, cast=lambda t: t) -> None:
    for kind in COMPONENTS:
        sa, sb = getattr(a, kind).state_dict(), getattr(b, kind).state_dict()
        assert set(sa) == set(sb), kind
        for k in sa:
            ref = cast(sb[k])
            assert sa[k].dtype == ref.dtype and torch.equal(sa[k], ref), (kind, k)


def test_sgm_single_file_equals_folder_load(sgm_file, folder, folder_components):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = load_sdxl_components(sgm_file, config=folder)
    assert c.ignored_keys == ["denoiser.sigmas"]
    assert any("denoiser.sigmas" in str(w.message) for w in caught)
    assert c.architecture == "sdxl_base" and c.force_zeros_for_empty_prompt and "single file" in c.source
    f = folder_components
    _same_weights(c, f)
    ids = c.tokenizer_2(["a red cube on a table!"])
    assert torch.equal(ids, f.tokenizer_2(["a red cube on a table!"]))
    with torch.no_grad():
        for kind in ("text_encoder", "text_encoder_2"):
            out, ref = getattr(c, kind)(ids, output_hidden_states=True), getattr(f, kind)(ids, output_hidden_states=True)
            torch.testing.assert_close(out.hidden_states[-2], ref.hidden_states[-2], atol=SINGLE_VS_FOLDER_ATOL, rtol=0)
            torch.testing.assert_close(out.pooled, ref.pooled, atol=SINGLE_VS_FOLDER_ATOL, rtol=0)
        torch.testing.assert_close(c.text_encoder_2(ids).text_embeds, f.text_encoder_2(ids).text_embeds,
                                   atol=SINGLE_VS_FOLDER_ATOL, rtol=0)
        torch.manual_seed(2)
        sample, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
        extra = dict(text_embeds=torch.randn(1, 32), time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]]))
        torch.testing.assert_close(c.unet(sample, 999, ctx, **extra), f.unet(sample, 999, ctx, **extra),
                                   atol=SINGLE_VS_FOLDER_ATOL, rtol=0)
        latents = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(c.vae.decode(latents), f.vae.decode(latents), atol=SINGLE_VS_FOLDER_ATOL, rtol=0)


def test_single_file_dtypes(sgm_file, folder, folder_components, tmp_path):
    c = load_sdxl_components(sgm_file, config=folder, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert c.unet.conv_in.weight.dtype == torch.bfloat16 and c.vae.decoder.conv_in.weight.dtype == torch.float32
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(sgm_file)).items()}
    save_file(sd16, str(tmp_path / "fp16.safetensors"))
    c16 = load_sdxl_components(tmp_path / "fp16.safetensors", config=folder, dtype=torch.float16)
    _same_weights(c16, folder_components, cast=lambda t: t.half())


def test_per_component_single_file_loaders(sgm_file, folder, folder_components):
    f = folder_components
    te1_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    for loaded, ref in [
        (load_unet(sgm_file, config=folder), f.unet),
        (load_vae(sgm_file, config=folder / "vae"), f.vae),
        (load_text_encoder(sgm_file, config=te1_cfg), f.text_encoder),
        (load_text_encoder_2(sgm_file, config=folder), f.text_encoder_2),
        # a diffusers-named single file finds config.json beside it
        (load_unet(folder / "unet" / "diffusion_pytorch_model.safetensors"), f.unet),
    ]:
        a, b = loaded.state_dict(), ref.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bundled_tokenizers_for_single_files(sgm_file, folder_components):
    tok, tok2 = load_tokenizer(sgm_file), load_tokenizer_2(sgm_file)
    assert tok.pad_token_id == 49407 and tok2.pad_token_id == 0  # "<|endoftext|>" and "!" (sdxl.md §4.2)
    prompts = ["a photo of an astronaut riding a horse!!", ""]
    assert torch.equal(tok(prompts), folder_components.tokenizer(prompts))
    assert torch.equal(tok2(prompts), folder_components.tokenizer_2(prompts))


def test_default_configs_do_not_fit_tiny_file(sgm_file):
    with pytest.raises(CheckpointError) as info:
        load_sdxl_components(sgm_file)
    msg = str(info.value)
    assert "mis-shaped keys" in msg and "built-in sdxl_base default config" in msg and "config=" in msg


def test_refiner_layout_detected_and_loaded(sgm_file, folder, tmp_path):
    sd = load_file(str(sgm_file))
    refiner = {k.replace(SGM_TE2_PREFIX, "conditioner.embedders.0.model."): v for k, v in sd.items()
               if not k.startswith(SGM_TE1_PREFIX)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    assert detect_architecture(CheckpointReader([tmp_path / "refiner.safetensors"])) == "sdxl_refiner"
    c = load_sdxl_components(tmp_path / "refiner.safetensors", config=folder)
    assert c.architecture == "sdxl_refiner" and c.text_encoder is None and c.tokenizer is None
    assert c.requires_aesthetics_score and c.text_encoder_2 is not None


def _tiny_file(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "keys, pattern",
    [
        ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 4),
          "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
         r"looks like Stable Diffusion 1\.x \(has cond_stage_model\.transformer\.\*"),
        ({"cond_stage_model.model.token_embedding.weight": (10, 4)}, r"looks like Stable Diffusion 2\.x"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, r"LoRA file"),
        ({"double_blocks.0.img_attn.qkv.weight": (6, 2)}, r"not an SDXL single-file checkpoint.*double_blocks"),
        ({"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}, r"SDXL UNet \(sdxl_base.*no SDXL text encoders"),
        ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
          "conditioner.embedders.1.model.ln_final.weight": (1280,),
          "model.diffusion_model.label_emb.0.0.weight": (1536, 2560)},
         r"laid out as sdxl_base but the UNet's model\.diffusion_model\.label_emb\.0\.0\.weight \[1536, 2560\] "
         r"has the input width of sdxl_refiner"),
    ],
    ids=["sd15", "sd2", "lora", "unknown", "unet_only", "mixed"],
)
def test_wrong_architecture_is_named(tmp_path, keys, pattern):
    path = _tiny_file(tmp_path / "other.safetensors", keys)
    with pytest.raises(CheckpointError, match=pattern):
        load_sdxl_components(path)


def test_strict_errors_name_the_keys(sgm_file, folder, tmp_path):
    base = load_file(str(sgm_file))
    unet_conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    cases = [
        ({unet_conv: torch.zeros(32, 32, 1, 1)},
         r"down_blocks\.0\.resnets\.0\.conv1\.weight \(from model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.2"
         r"\.weight\): \[32, 32, 1, 1\] vs \[32, 32, 3, 3\]"),
        ({"first_stage_model.decoder.mid.attn_1.q.weight": None},
         r"VAE.*missing keys \(1\):\n    decoder\.mid_block\.attentions\.0\.to_q\.weight"),
        ({"model.diffusion_model.input_blocks.1.0.extra_layer.weight": torch.zeros(2)},
         r"unexpected keys \(1\):\n    model\.diffusion_model\.input_blocks\.1\.0\.extra_layer\.weight"),
        ({SGM_TE2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight": None},
         r"text_encoder_2.*missing keys \(3\):\n    text_model\.encoder\.layers\.1\.self_attn\.[qkv]_proj\.weight \(from "
         r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.1\.attn\.in_proj_weight\)"),
        ({SGM_TE2_PREFIX + "transformer.resblocks.3.ln_1.weight": torch.zeros(32)},
         r"unexpected keys \(1\):\n    conditioner\.embedders\.1\.model\.transformer\.resblocks\.3\.ln_1\.weight"),
    ]
    for change, pattern in cases:
        sd = dict(base)
        for k, v in change.items():
            if v is None:
                del sd[k]
            else:
                sd[k] = v
        save_file(sd, str(tmp_path / "bad.safetensors"))
        with pytest.raises(CheckpointError, match="(?s)" + pattern):
            load_sdxl_components(tmp_path / "bad.safetensors", config=folder)


def test_unet_only_file_without_sdxl_embedding_needs_a_config(tmp_path):
    path = _tiny_file(tmp_path / "sd15_unet.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    with pytest.raises(CheckpointError, match=r"sd15_unet\.safetensors: the UNet has no SDXL text-time embedding"):
        load_unet(path)


def test_truncated_single_file_and_linear_text_projection(sgm_file, folder, folder_components, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(sgm_file.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated safetensors file"):
        load_sdxl_components(cut, config=folder)
    # community files with text_projection already in Linear layout (``text_projection.weight``)
    sd = load_file(str(sgm_file))
    proj = sd.pop(SGM_TE2_PREFIX + "text_projection")
    sd[SGM_TE2_PREFIX + "text_projection.weight"] = proj.t().contiguous()
    save_file(sd, str(tmp_path / "linear_proj.safetensors"))
    te2 = load_text_encoder_2(tmp_path / "linear_proj.safetensors", config=folder)
    assert torch.equal(te2.text_projection.weight, folder_components.text_encoder_2.text_projection.weight)


def test_standalone_vae_files_in_three_namings(folder, folder_components, tmp_path):
    """diffusers names + config.json beside (like ``sdxl_vae.safetensors`` in a vae folder), unprefixed LDM names,
    and old diffusers attention names ``query/key/value/proj_attn``."""
    from w2sd.sdxl.loading import vae_state_dict_to_ldm

    cfg = json.loads((folder / "vae" / "config.json").read_text())
    diffusers_sd = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    ldm = vae_state_dict_to_ldm(diffusers_sd, cfg, prefix="")
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "ldm_vae.safetensors"))
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for k, v in diffusers_sd.items():
        for new, legacy in old_names.items():
            k = k.replace(".attentions.0." + new, ".attentions.0." + legacy)
        old[k] = v
    assert any(".query." in k for k in old)
    save_file(old, str(tmp_path / "old_vae.safetensors"))
    ref = folder_components.vae.state_dict()
    for vae in (load_vae(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                load_vae(tmp_path / "ldm_vae.safetensors", config=cfg),
                load_vae(tmp_path / "old_vae.safetensors", config=cfg)):
        sd = vae.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
