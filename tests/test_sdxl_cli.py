"""``w2sd sdxl`` end to end on the tiny random SDXL folder + kohya LoRA, and its input errors.

Oracle for the outputs: the library call (``w2sd.sdxl.pipeline.SDXLPipeline.generate`` / ``decode``), which
``test_sdxl_pipeline.py`` checks against diffusers 0.42 + peft (StableDiffusionXLPipeline and the published W2SD
loop). Models: ``helpers_tiny_sdxl`` (diffusers-built, seed 0, VAE factor 2), LoRA seed SEED_LORA. float32, CPU.
"""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_published_w2sd import write_tiny_kohya_lora
from helpers_tiny_sdxl import cached_tiny_sdxl
from w2sd.cli import main
from w2sd.sdxl import cli as sdxl_cli
from w2sd.sdxl.pairs import Setting, guidance_pair, lora_pair
from w2sd.sdxl.pipeline import SDXLPipeline

LATENT_RTOL = 1e-5   # CLI latents vs the library call in the same process (same code path; float32)
SEED_LORA = 31
SIZE, T = 32, 3
SEEDS = (5555, 7)
PROMPT = "a red cube on a blue table"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_tiny_sdxl(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_file(folder, tmp_path_factory):
    return write_tiny_kohya_lora(folder, tmp_path_factory.mktemp("lora") / "lora.safetensors", seed=SEED_LORA)


def base_args(folder, lora_file, save_dir) -> list[str]:
    return ["sdxl", "--model", str(folder), "--lora_path", str(lora_file), "--prompt", PROMPT, "--size", str(SIZE),
            "--T", str(T), "--save_dir", str(save_dir), "--device", "cpu", "--dtype", "fp32", "--no_progress"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_cli_end_to_end(folder, lora_file, tmp_path, capsys):
    out = tmp_path / "res"
    argv = base_args(folder, lora_file, out) + ["--seed", *map(str, SEEDS), "--batch_size", "2", "--save_latents",
                                                "--inversion", "reference"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lam = T - 1
    w2sd_items = 2 * T + 3 * lam  # main CFG 5.5 (2) + strong CFG 5.5 (2) + weak CFG 1.0 (1) per reflection
    assert f"{w2sd_items} model evaluations per image" in printed

    pipe = SDXLPipeline.load(folder, lora_path=lora_file)
    main_setting = Setting("main", 0.8, 5.5, PROMPT)
    lib = {
        "weak": pipe.generate(Setting("main", 0.0, 5.5, PROMPT), list(SEEDS), (SIZE, SIZE), T),
        "strong": pipe.generate(main_setting, list(SEEDS), (SIZE, SIZE), T),
        "w2sd": pipe.generate(main_setting, list(SEEDS), (SIZE, SIZE), T, inversion="reference",
                              pair=lora_pair(1.5, -1.5, strong_guidance=5.5, weak_guidance=1.0)),
    }
    for row, seed in enumerate(SEEDS):
        latents = load_file(str(out / f"seed_{seed}_latents.safetensors"))
        assert sorted(latents) == ["strong", "w2sd", "weak"]
        strip = matplotlib.image.imread(str(out / f"seed_{seed}.png"))  # float in [0, 1], (H, 3W, 3)
        assert strip.shape == (SIZE, 3 * SIZE, 3)
        for k, role in enumerate(("weak", "strong", "w2sd")):
            ref = lib[role].latents[row : row + 1]
            assert rel_err(latents[role], ref) <= LATENT_RTOL, (seed, role)
            png = matplotlib.image.imread(str(out / f"seed_{seed}_{role}.png"))
            expected = sdxl_cli.to_uint8(pipe.decode(ref)[0])
            assert np.array_equal((png * 255).round().astype(np.uint8), expected), (seed, role)
            assert np.array_equal(strip[:, k * SIZE : (k + 1) * SIZE], png)
        rec = json.loads((out / f"seed_{seed}.json").read_text())
        assert rec["seed"] == seed and rec["T"] == T and rec["lam"] == lam and rec["inversion"] == "reference"
        assert rec["nfe"]["w2sd"] == {"main": 2 * T, "strong": 2 * lam, "weak": lam, "total": w2sd_items,
                                      "unet_items": w2sd_items, "unet_calls": 3 * lam + 1}
        assert rec["nfe"]["weak"]["total"] == rec["nfe"]["strong"]["total"] == 2 * T
        assert rec["settings"]["w2sd"]["weak"] == {"model": "main", "lora_scale": -1.5, "guidance_scale": 1.0,
                                                   "prompt": PROMPT}
        assert rec["settings"]["weak"]["main"]["lora_scale"] == 0.0
        assert rec["pair"]["kind"] == "lora+guidance" and rec["versions"]["torch"] == torch.__version__
        assert set(rec["timings_s"]) >= {"load", "weak", "strong", "w2sd", "decode"}
    assert rel_err(lib["w2sd"].latents, lib["strong"].latents) > 1e-3  # W2SD changes the result

    # a second run refuses to overwrite, before loading anything; --overwrite replaces
    before = (out / f"seed_{SEEDS[0]}.json").read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2sd: error:") and "--overwrite" in err and "\n" not in err
    assert (out / f"seed_{SEEDS[0]}.json").read_text() == before


def test_cli_single_file_guidance_pair(folder, tmp_path):
    """A single SGM .safetensors checkpoint (+ --config for the tiny configs), no LoRA: the pair is the guidance
    difference alone (= Z-Sampling, weak CFG 0), and the weak image is the strong one (computed once)."""
    from helpers_tiny_sdxl import write_sgm_single_file

    file = write_sgm_single_file(folder, tmp_path / "tiny_sdxl.safetensors", junk=False)
    out = tmp_path / "res"
    argv = ["sdxl", "--model", str(file), "--config", str(folder), "--prompt", PROMPT, "--size", str(SIZE), "--T",
            "2", "--seed", "3", "--weak_guidance_scale", "0", "--save_dir", str(out), "--save_latents",
            "--device", "cpu", "--dtype", "fp32", "--no_progress"]
    assert main(argv) == 0
    rec = json.loads((out / "seed_3.json").read_text())
    assert rec["pair"]["kind"] == "guidance" and rec["weak_is_strong"] is True
    assert rec["nfe"]["w2sd"]["total"] == 2 * 2 + 3 * 1  # weak CFG 0: unconditional branch only
    lib = SDXLPipeline.load(folder).generate(Setting("main", None, 5.5, PROMPT), [3], (SIZE, SIZE), 2,
                                             pair=guidance_pair(5.5, 0.0))
    latents = load_file(str(out / "seed_3_latents.safetensors"))
    assert rel_err(latents["w2sd"], lib.latents) <= LATENT_RTOL
    assert torch.equal(latents["weak"], latents["strong"])


def test_png_writer_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(sdxl_cli.png_bytes(rgb))
    assert np.array_equal((matplotlib.image.imread(str(path)) * 255).round().astype(np.uint8), rgb)
    with pytest.raises(ValueError, match="uint8"):
        sdxl_cli.png_bytes(rgb.astype(np.float32))


BAD_INPUTS = [
    (["--size", "33"], "not a multiple of 2"),
    (["--dtype", "fp8"], "--dtype must be fp32, fp16 or bf16"),
    (["--inversion", "backwards"], "--inversion must be one of"),
    (["--lam", "9"], "--lam must lie in"),
    (["--T", "0"], "--T must be >= 1"),
    (["--seed", "1", "1"], "--seed must be distinct"),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu0"], "is not a torch device"),
    (["--config", "/nonexistent/folder"], "--config: not a diffusers folder"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: errors must come before loading."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(SDXLPipeline, "load", classmethod(boom))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "CUDA requested without CUDA" everywhere


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_cli_bad_inputs_one_line_before_loading(folder, lora_file, tmp_path, capsys, no_loading, extra, message):
    assert main(base_args(folder, lora_file, tmp_path / "res") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2sd: error:") and message in err and "\n" not in err, err


@pytest.mark.parametrize("which", ["model", "weak_model", "lora_path"])
def test_cli_missing_files(folder, lora_file, tmp_path, capsys, no_loading, which):
    args = base_args(folder, lora_file, tmp_path / "res")
    missing = str(tmp_path / "nope" / "missing.safetensors")
    if which == "weak_model":
        args += ["--weak_model", missing]
    else:
        args[args.index(f"--{which}") + 1] = missing
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2sd: error:") and "missing.safetensors" in err and "\n" not in err, err


def test_cli_identical_pair_is_an_error(folder, tmp_path, capsys, no_loading):
    args = ["sdxl", "--model", str(folder), "--prompt", PROMPT, "--size", str(SIZE), "--save_dir", str(tmp_path),
            "--strong_guidance_scale", "3", "--weak_guidance_scale", "3", "--device", "cpu"]
    assert main(args) == 2
    assert "strong and weak members are the same model" in capsys.readouterr().err
