"""``w2sd sdxl``: the published W2SD demo (``w2sd_lora.py``) on our SDXL port.

For every seed it samples three images from the same initial latent, like the demo:
  weak    the weak member's model (base model: LoRA off, or --weak_model) and prompt at the main CFG scale
          (when that is the strong image's setting, e.g. a pure guidance pair, it is computed once);
  strong  the main model with the LoRA at --lora_scale, main CFG (plain DDIM);
  w2sd    W2SD: main step as "strong", reflections with the strong / weak members (Algorithm 1).
and writes SAVE_DIR/seed_{seed}.png (weak | strong | w2sd side by side), seed_{seed}_{weak,strong,w2sd}.png,
seed_{seed}.json (settings, versions, NFE, timings) and, with --save_latents, seed_{seed}_latents.safetensors
(tensors "weak", "strong", "w2sd": final latents (1, 4, H/8, W/8) before VAE decoding, not divided by the
scaling factor).

The pair is built from the options (w2sd.sdxl.pairs): --lora_path gives the LoRA-scale pair (strong
--strong_lora_scale, weak --weak_lora_scale), --weak_model a full-model pair, --weak_guidance_scale /
--strong_guidance_scale a guidance difference, --weak_prompt a prompt difference; several combine.
Input errors (sizes, dtypes, missing files, CUDA without CUDA, existing outputs) are reported before any model
is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from w2sd.errors import ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
INVERSION_CHOICES = ("exact", "reference")
ROLES = ("weak", "strong", "w2sd")
DEFAULT_LATENT_FACTOR = 8  # SDXL's VAE; read from vae/config.json when the model is a folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``w2sd sdxl`` (the published demo's, plus a few)."""
    g = p.add_argument_group("models")
    g.add_argument("--model", required=True, help="SDXL base: diffusers folder, HF cache name or single .safetensors")
    g.add_argument("--weak_model", default=None, help="a second checkpoint as the weak model (full-model pair)")
    g.add_argument("--lora_path", default=None, help="LoRA .safetensors (kohya, PEFT or old diffusers format)")
    g.add_argument("--variant", default=None, help='read "*.{variant}.safetensors" files of folders, e.g. fp16')
    g.add_argument("--config", default=None,
                   help="diffusers folder with the configs / tokenizers for single-file checkpoints (default: SDXL's)")
    g = p.add_argument_group("prompt and image")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--negative_prompt", default=None, help="negative prompt (default: none = zero embeddings)")
    g.add_argument("--weak_prompt", default=None, help="prompt of the weak member (prompt pair; --prompt is strong)")
    g.add_argument("--size", type=int, default=1024, help="image height and width in pixels (default 1024)")
    g.add_argument("--T", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--seed", type=int, nargs="+", default=[5555], help="one or more seeds (default 5555)")
    g.add_argument("--batch_size", type=int, default=1, help="seeds sampled together in one batch (default 1)")
    g = p.add_argument_group("W2SD")
    scale = {"type": float}
    g.add_argument("--lora_scale", default=0.8, **scale,
                   help="LoRA scale of the main step and the strong image (default 0.8)")
    g.add_argument("--guidance_scale", default=5.5, **scale,
                   help="CFG scale of the main step and plain images (default 5.5)")
    g.add_argument("--strong_lora_scale", default=1.5, **scale, help="LoRA scale of the strong member (default 1.5)")
    g.add_argument("--weak_lora_scale", default=-1.5, **scale,
                   help="LoRA scale of the weak member (default -1.5; unused with --weak_model: the LoRA is on the "
                        "main model)")
    g.add_argument("--strong_guidance_scale", default=5.5, **scale, help="CFG scale of the strong member (default 5.5)")
    g.add_argument("--weak_guidance_scale", default=1.0, **scale,
                   help="CFG scale of the weak member (default 1.0; 0 = unconditional)")
    g.add_argument("--lam", type=int, default=None, help="reflect on the first lam steps (default T-1)")
    g.add_argument("--inversion", default="exact",
                   help="exact (paper: invert t_{i+1} -> t_i, default) or reference (the published code's levels)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--save_dir", default="./res", help="output folder (default ./res)")
    g.add_argument("--save_latents", action="store_true", help="also write seed_{seed}_latents.safetensors")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------- validation


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value}")
    return value


def latent_factor(model: str | os.PathLike, config: str | os.PathLike | None = None) -> int:
    """The VAE's spatial factor from ``vae/config.json`` of a pipeline folder (cheap), of ``config`` for a single
    file, else 8 (SDXL)."""
    from w2sd.sdxl.loading import resolve_pretrained_path

    root = resolve_pretrained_path(model)  # FileNotFoundError names the path
    if root.is_file() and config is not None:
        root = resolve_pretrained_path(config)
    cfg = root / "vae" / "config.json"
    if root.is_dir() and cfg.is_file():
        try:
            channels = json.loads(cfg.read_text(encoding="utf-8")).get("block_out_channels")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            channels = None
        if isinstance(channels, list) and channels:
            return 2 ** (len(channels) - 1)
    return DEFAULT_LATENT_FACTOR


def output_names(seeds: list[int], save_latents: bool) -> list[str]:
    names = []
    for s in seeds:
        names += [f"seed_{s}.png", f"seed_{s}.json"] + [f"seed_{s}_{r}.png" for r in ROLES]
        if save_latents:
            names.append(f"seed_{s}_latents.safetensors")
    return names


def check_args(args: argparse.Namespace) -> tuple[torch.dtype, torch.device]:
    """Validate everything that can be checked without loading a model; returns (dtype, device)."""
    if args.T < 1:
        raise ConfigError(f"--T must be >= 1, got {args.T}")
    if args.lam is not None and not 0 <= args.lam <= args.T:
        raise ConfigError(f"--lam must lie in [0, T] = [0, {args.T}], got {args.lam}")
    if args.inversion not in INVERSION_CHOICES:
        raise ConfigError(f"--inversion must be one of {', '.join(INVERSION_CHOICES)}, got {args.inversion!r}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if len(set(args.seed)) != len(args.seed) or any(s < 0 for s in args.seed):
        raise ConfigError(f"--seed must be distinct non-negative integers, got {args.seed}")
    for name in ("lora_scale", "guidance_scale", "strong_lora_scale", "weak_lora_scale", "strong_guidance_scale",
                 "weak_guidance_scale"):
        _finite(name, getattr(args, name))
    try:
        default = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(args.device or default)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} requested but CUDA is not available (torch {torch.__version__})")
    if args.dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif args.dtype.lower() in DTYPES:
        dtype = DTYPES[args.dtype.lower()]
    else:
        raise ConfigError(f"--dtype must be fp32, fp16 or bf16, got {args.dtype!r}")
    if args.size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, got {args.size}")
    if args.config is not None and not Path(args.config).is_dir():
        raise FileNotFoundError(f"--config: not a diffusers folder: {args.config}")
    factor = latent_factor(args.model, args.config)
    if args.size % factor:
        raise ConfigError(f"--size {args.size} is not a multiple of {factor} (the VAE's latent factor)")
    if args.weak_model is not None:
        from w2sd.sdxl.loading import resolve_pretrained_path

        resolve_pretrained_path(args.weak_model)
    if args.lora_path is not None and not os.path.isfile(args.lora_path):
        raise FileNotFoundError(f"--lora_path: LoRA file not found: {args.lora_path}")
    return dtype, device


def build_pair(args: argparse.Namespace):
    """The weak-to-strong pair the options describe, and the settings of the three images."""
    from w2sd.sdxl.pairs import (
        MAIN_MODEL, OFF, WEAK_MODEL, Member, Pair, Setting, combine, full_model_pair, lora_pair, prompt_pair,
        resolve,
    )

    has_lora = args.lora_path is not None
    parts = []
    if args.weak_model is not None:
        parts.append(full_model_pair())
    if has_lora:
        parts.append(lora_pair(args.strong_lora_scale, args.weak_lora_scale) if args.weak_model is None
                     else Pair(Member(lora_scale=args.strong_lora_scale), Member(), kind="lora"))
    sg, wg = args.strong_guidance_scale, args.weak_guidance_scale
    parts.append(Pair(Member(guidance_scale=sg), Member(guidance_scale=wg), kind="guidance" if sg != wg else "cfg"))
    if args.weak_prompt is not None:
        parts.append(prompt_pair(raw=args.weak_prompt))
    pair = combine(*parts)
    main = Setting(MAIN_MODEL, args.lora_scale if has_lora else None, args.guidance_scale, args.prompt)
    strong, weak = resolve(pair.strong, main), resolve(pair.weak, main)
    if strong == weak:
        raise ConfigError(
            "the strong and weak members are the same model (give --lora_path, --weak_model, --weak_prompt or "
            f"different --strong_guidance_scale / --weak_guidance_scale): {strong.as_dict()}")
    weak_image = Setting(weak.model, OFF if has_lora else None, args.guidance_scale, weak.prompt)
    assert weak_image.model in (MAIN_MODEL, WEAK_MODEL)
    return pair, {"weak": weak_image, "strong": main, "w2sd": main}


def describe(setting, main) -> str:
    """One line for a setting: model, LoRA scale, CFG scale, and the prompt when it is not the main one."""
    text = f"[{setting.model} model, LoRA {'-' if setting.lora_scale is None else setting.lora_scale}, " \
           f"CFG {setting.guidance_scale}"
    return text + (f", prompt {setting.prompt!r}]" if setting.prompt != main.prompt else "]")


# ---------------------------------------------------------------------------------------------- output files


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG file (8-bit RGB, no filter, zlib) for a (H, W, 3) uint8 array: no PIL needed."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as diffusers' ``numpy_to_pil``."""
    return (image.permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8)


def _versions() -> dict:
    import w2sd

    return {"w2sd": w2sd.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from w2sd.outputs import atomic_write, atomic_write_json, prepare_output_dir

    dtype, device = check_args(args)
    pair, image_settings = build_pair(args)
    save_dir = prepare_output_dir(args.save_dir, output_names(args.seed, args.save_latents), args.overwrite)

    from w2sd.sdxl.pairs import resolve
    from w2sd.sdxl.pipeline import SDXLPipeline

    t0 = time.perf_counter()
    pipe = SDXLPipeline.load(args.model, args.weak_model, args.lora_path, dtype=dtype, device=device,
                             variant=args.variant, config=args.config)
    load_s = time.perf_counter() - t0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"loaded {args.model} in {load_s:.1f} s on {device} ({device_name}), {str(dtype).replace('torch.', '')}"
          + (f"; weak model {args.weak_model}" if args.weak_model else "")
          + (f"; LoRA {args.lora_path}" if args.lora_path else ""))
    main_setting = image_settings["w2sd"]
    print(f"pair {pair.kind}: " + "; ".join(
        f"{role} {describe(resolve(getattr(pair, role), main_setting), main_setting)}" for role in ("strong", "weak"))
        + f"; main step {describe(main_setting, main_setting)}")
    size = (args.size, args.size)

    for start in range(0, len(args.seed), args.batch_size):
        seeds = args.seed[start : start + args.batch_size]
        tag = "seed " + ",".join(map(str, seeds))
        runs = {}
        for role in ROLES:
            setting = image_settings[role]
            if role == "weak" and setting == image_settings["strong"]:
                continue  # identical to the strong image: computed once below
            kwargs = dict(pair=pair, lam=args.lam, inversion=args.inversion) if role == "w2sd" else {}
            runs[role] = pipe.generate(setting, seeds, size, args.T, negative_prompt=args.negative_prompt,
                                       progress=not args.no_progress, desc=f"{tag} {role}", **kwargs)
            g = runs[role]
            n = g.nfe
            print(f"{tag} {role}: {args.T} steps, {n.total} model evaluations per image (main {n.main}, strong "
                  f"{n.strong}, weak {n.weak}) = {g.unet_items} UNet batch items in {g.unet_calls} calls, "
                  f"{g.seconds:.2f} s")
        if "weak" not in runs:
            runs["weak"] = runs["strong"]
        t1 = time.perf_counter()
        images = {role: pipe.decode(runs[role].latents, model=image_settings[role].model)
                  for role in ROLES if not (role == "weak" and runs["weak"] is runs["strong"])}
        images.setdefault("weak", images["strong"])
        decode_s = time.perf_counter() - t1
        for row, seed in enumerate(seeds):
            tiles = {role: to_uint8(images[role][row]) for role in ROLES}
            for role in ROLES:
                atomic_write(save_dir / f"seed_{seed}_{role}.png", lambda f, a=tiles[role]: f.write(png_bytes(a)))
            strip = np.concatenate([tiles[r] for r in ROLES], axis=1)  # (H, 3W, 3)
            atomic_write(save_dir / f"seed_{seed}.png", lambda f: f.write(png_bytes(strip)))
            files = [f"seed_{seed}.png"] + [f"seed_{seed}_{r}.png" for r in ROLES]
            if args.save_latents:
                from safetensors.torch import save

                blob = save({r: runs[r].latents[row : row + 1].detach().float().cpu().clone() for r in ROLES},
                            metadata={"format": "pt", "seed": str(seed), "dtype": str(dtype)})
                atomic_write(save_dir / f"seed_{seed}_latents.safetensors", lambda f: f.write(blob))
                files.append(f"seed_{seed}_latents.safetensors")
            record = {
                "seed": seed,
                "batch_seeds": seeds,
                "prompt": args.prompt,
                "negative_prompt": args.negative_prompt,
                "size": [args.size, args.size],
                "T": args.T,
                "lam": args.lam if args.lam is not None else max(args.T - 1, 0),
                "inversion": args.inversion,
                "pair": pair.as_dict(),
                "settings": {r: runs[r].settings for r in ROLES},
                "weak_is_strong": runs["weak"] is runs["strong"],
                "nfe": {r: dict(runs[r].nfe.as_dict(), unet_items=runs[r].unet_items // len(seeds),
                                unet_calls=runs[r].unet_calls) for r in ROLES},
                "timings_s": {"load": load_s, **{r: runs[r].seconds for r in ROLES}, "decode": decode_s,
                              "note": "sampling and decoding times are per batch of batch_seeds"},
                "options": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "device": str(device),
                "device_name": device_name,
                "dtype": str(dtype).replace("torch.", ""),
                "model_source": pipe.models["main"].source,
                "versions": _versions(),
                "files": files + [f"seed_{seed}.json"],
            }
            atomic_write_json(save_dir / f"seed_{seed}.json", record)
        print(f"{tag}: wrote {save_dir}/seed_{{{','.join(map(str, seeds))}}}*.png/.json")
        sys.stdout.flush()
    return 0
