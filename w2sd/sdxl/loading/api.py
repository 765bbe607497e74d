"""Public loading API: a whole SDXL pipeline (diffusers folder, HF cache entry or single file) or one component.

Every model is built with its parameters on the ``meta`` device and filled with ``load_state_dict(assign=True)``
from tensors read one at a time straight into ``dtype`` on ``device`` (no second full copy of the weights).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.sdxl.loading.configs import SINGLE_FILE_DEFAULTS
from w2sd.sdxl.loading.folder import (
    REQUIRED_COMPONENTS,
    component_folder,
    load_component_folder,
    load_scheduler_config_folder,
    read_json,
    read_model_index,
    resolve_pretrained_path,
)
from w2sd.sdxl.loading.safetensors_io import CheckpointReader
from w2sd.sdxl.loading.single_file import (
    SINGLE_FILE_PREFIXES,
    describe_unclaimed,
    detect_architecture,
    find_component,
    load_single_file_component,
    unclaimed_keys,
    unet_architecture,
)

__all__ = [
    "SDXLComponents",
    "load_sdxl_components",
    "load_unet",
    "load_vae",
    "load_text_encoder",
    "load_text_encoder_2",
    "load_tokenizer",
    "load_tokenizer_2",
    "load_scheduler_config",
    "as_dtype",
]

PathLike = str | os.PathLike
# Pad tokens of SDXL's two tokenizers (sdxl.md §4.2): tokenizer pads with <|endoftext|>, tokenizer_2 with "!".
TOKENIZER_PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


@dataclass
class SDXLComponents:
    """Everything an SDXL pipeline needs, loaded.

    ``text_encoder`` / ``tokenizer`` are ``None`` for the refiner. ``scheduler_config`` is the raw
    ``scheduler_config.json`` dict. ``source`` says what was read (files, variants); ``ignored_keys`` lists
    single-file keys that belong to no component.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None
    text_encoder_2: nn.Module
    tokenizer: Any | None
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    source: str
    architecture: str = "sdxl_base"
    requires_aesthetics_score: bool = False
    ignored_keys: list[str] = field(default_factory=list)


DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DtypeLike = torch.dtype | str


def as_dtype(dtype: DtypeLike, name: str = "dtype") -> torch.dtype:
    """``torch.float32/float16/bfloat16`` or one of their names (``"fp16"``, ``"bf16"``, ...)."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"{name}: unknown dtype name {dtype!r} (expected one of {sorted(DTYPE_NAMES)})")
        dtype = DTYPE_NAMES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name}: expected torch.float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def _tokenizer_from(folder: Path | None, which: str):
    from w2sd.sdxl.tokenizer import CLIPTokenizer

    if folder is None:
        return CLIPTokenizer.from_bundled(pad_token=TOKENIZER_PAD[which])
    return CLIPTokenizer.from_folder(folder)


# ---------------------------------------------------------------------------------------------------- pipelines


def load_sdxl_components(
    path: PathLike,
    dtype: DtypeLike = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
    *,
    vae_dtype: DtypeLike | None = None,
    config: PathLike | None = None,
) -> SDXLComponents:
    """Load an SDXL pipeline from a diffusers folder, a Hugging Face cache entry or an SGM single file.

    Args:
        path: diffusers folder (with ``model_index.json``), HF cache ``models--org--name`` root or snapshot,
            ``"org/name"`` present in the local HF cache, or a single ``.safetensors`` checkpoint.
        dtype: dtype of the UNet and text encoders (``torch.float32/float16/bfloat16`` or ``"fp32"``, ``"fp16"``,
            ``"bf16"``), converted per tensor.
        device: where the weights go (``"cpu"``, ``"cuda"``, ...).
        variant: e.g. ``"fp16"``: read ``*.fp16.safetensors`` where present (folders only).
        vae_dtype: dtype of the VAE (default ``dtype``); SDXL's VAE overflows in float16 (sdxl.md §5.4).
        config: for single files only: a diffusers folder whose configs, tokenizers, scheduler config and
            ``force_zeros_for_empty_prompt`` are used instead of the built-in SDXL defaults.

    Raises:
        FileNotFoundError / CheckpointError naming the component, file or key that is wrong.
    """
    dtype = as_dtype(dtype)
    vdtype = as_dtype(vae_dtype, "vae_dtype") if vae_dtype is not None else dtype
    dev = torch.device(device)
    root = resolve_pretrained_path(path)
    if root.is_file():
        return _load_single_file_pipeline(root, dtype, vdtype, dev, config)
    if config is not None:
        raise ValueError("config= applies to single-file checkpoints only; a folder carries its own configs")
    return _load_folder_pipeline(root, dtype, vdtype, dev, variant)


def _load_folder_pipeline(
    root: Path, dtype: torch.dtype, vae_dtype: torch.dtype, device: torch.device, variant: str | None
) -> SDXLComponents:
    index = read_model_index(root)
    subs = {
        name: component_folder(root, name, index, required=name in REQUIRED_COMPONENTS)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    }
    notes = []
    models: dict[str, nn.Module | None] = {}
    for kind in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sub = subs[kind]
        if sub is None:
            models[kind] = None
            continue
        models[kind], files = load_component_folder(
            sub, kind, dtype=vae_dtype if kind == "vae" else dtype, device=device, variant=variant
        )
        notes.append(f"{kind}: {files}")
    tokenizer = _tokenizer_from(subs["tokenizer"], "tokenizer") if subs["tokenizer"] is not None else None
    if (models["text_encoder"] is None) != (tokenizer is None):
        raise CheckpointError(f"{root}: text_encoder and tokenizer must both be present or both be absent")
    refiner = models["text_encoder"] is None or bool(index.get("requires_aesthetics_score", False))
    return SDXLComponents(
        unet=models["unet"],  # type: ignore[arg-type]
        vae=models["vae"],  # type: ignore[arg-type]
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],  # type: ignore[arg-type]
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer_from(subs["tokenizer_2"], "tokenizer_2"),
        scheduler_config=load_scheduler_config_folder(subs["scheduler"]),  # type: ignore[arg-type]
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        source=f"diffusers folder {root} (" + "; ".join(notes) + ")",
        architecture="sdxl_refiner" if refiner else "sdxl_base",
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )


def _load_single_file_pipeline(
    file: Path, dtype: torch.dtype, vae_dtype: torch.dtype, device: torch.device, config: PathLike | None
) -> SDXLComponents:
    reader = CheckpointReader([file], str(file))
    arch = detect_architecture(reader)
    prefixes = SINGLE_FILE_PREFIXES[arch]
    defaults = SINGLE_FILE_DEFAULTS[arch]
    cfg_root = resolve_pretrained_path(config) if config is not None else None
    index = read_model_index(cfg_root) if cfg_root is not None else {}

    def cfg(kind: str) -> Mapping:
        if cfg_root is None:
            return copy.deepcopy(defaults[kind])
        return read_json(cfg_root / kind / "config.json", f"{kind} config")

    models: dict[str, nn.Module | None] = {"text_encoder": None}
    for kind, prefix in prefixes.items():
        naming = "openclip" if kind == "text_encoder_2" else ("diffusers" if kind == "text_encoder" else "sgm")
        try:
            models[kind] = load_single_file_component(
                reader, kind, cfg(kind), dtype=vae_dtype if kind == "vae" else dtype, device=device,
                prefix=prefix, naming=naming,
            )
        except CheckpointError as exc:
            where = f"{cfg_root / kind / 'config.json'}" if cfg_root else f"the built-in {arch} default config"
            raise CheckpointError(
                f"{exc}\n  (single file read as {arch}, {kind} under {prefix}*, config from {where}; a file of "
                "another size needs config=<diffusers folder with matching configs>)"
            ) from None
    ignored = unclaimed_keys(reader, prefixes)
    if ignored:
        warnings.warn(f"{file}: ignored {len(ignored)} key(s) outside the SDXL components: {describe_unclaimed(ignored)}")
    has_te1 = models["text_encoder"] is not None
    if cfg_root is not None:
        tok = _tokenizer_from(cfg_root / "tokenizer", "tokenizer") if has_te1 else None
        tok2 = _tokenizer_from(cfg_root / "tokenizer_2", "tokenizer_2")
        scheduler = load_scheduler_config_folder(cfg_root / "scheduler")
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    else:
        tok = _tokenizer_from(None, "tokenizer") if has_te1 else None
        tok2 = _tokenizer_from(None, "tokenizer_2")
        scheduler = copy.deepcopy(defaults["scheduler"])
        force_zeros = bool(defaults["force_zeros_for_empty_prompt"])
    source = f"single file {file} ({arch}; configs from {cfg_root or 'built-in SDXL defaults'})"
    return SDXLComponents(
        unet=models["unet"],  # type: ignore[arg-type]
        vae=models["vae"],  # type: ignore[arg-type]
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],  # type: ignore[arg-type]
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler_config=scheduler,
        force_zeros_for_empty_prompt=force_zeros,
        source=source,
        architecture=arch,
        requires_aesthetics_score=arch == "sdxl_refiner",
        ignored_keys=ignored,
    )


# ---------------------------------------------------------------------------------------------------- components


def _component_config(kind: str, config: PathLike | Mapping | None, file: Path | None, reader) -> dict:
    """Config dict for a component: given dict; given folder (pipeline or component); ``config.json`` beside a
    diffusers-named file; else the SDXL default (base or refiner UNet by its embedding width)."""
    if isinstance(config, Mapping):
        return dict(config)
    if config is not None:
        folder = resolve_pretrained_path(config)
        if (folder / "model_index.json").exists():
            folder = folder / kind
        return read_json(folder / "config.json", f"{kind} config")
    if file is not None and (file.parent / "config.json").exists():
        return read_json(file.parent / "config.json", f"{kind} config")
    if kind == "unet":
        arch = unet_architecture(reader)
        if arch is None:
            raise CheckpointError(
                f"{reader.description}: the UNet has no SDXL text-time embedding of a known width "
                "(label_emb.0.0.weight / add_embedding.linear_1.weight with 2816 or 2560 inputs), so no built-in "
                "config fits (an SD1.x/2.x UNet?); pass config=<UNet config dict or folder>"
            )
        return copy.deepcopy(SINGLE_FILE_DEFAULTS[arch]["unet"])
    return copy.deepcopy(SINGLE_FILE_DEFAULTS["sdxl_base"][kind])


def _load_one(
    kind: str,
    path: PathLike,
    dtype: DtypeLike,
    device: torch.device | str,
    variant: str | None,
    config: PathLike | Mapping | None,
) -> nn.Module:
    dtype = as_dtype(dtype)
    dev = torch.device(device)
    p = resolve_pretrained_path(path)
    if p.is_file():
        reader = CheckpointReader([p], str(p))
        prefix, naming = find_component(reader, kind)
        cfg = _component_config(kind, config, p if naming == "diffusers" else None, reader)
        return load_single_file_component(reader, kind, cfg, dtype=dtype, device=dev, prefix=prefix, naming=naming)
    if (p / "model_index.json").exists():
        index = read_model_index(p)
        sub = component_folder(p, kind, index, required=True)
        assert sub is not None
        p = sub
    if not (p / "config.json").exists() and config is None:
        raise CheckpointError(f"{p}: not a {kind} folder (config.json missing) nor a pipeline folder (model_index.json)")
    cfg = _component_config(kind, config, None, None) if config is not None else None
    module, _ = load_component_folder(p, kind, dtype=dtype, device=dev, variant=variant, config=cfg)
    return module


def load_unet(
    path: PathLike, dtype: DtypeLike = torch.float32, device: torch.device | str = "cpu",
    variant: str | None = None, config: PathLike | Mapping | None = None,
) -> nn.Module:
    """UNet from a pipeline folder, its ``unet/`` folder, or a single file (SGM ``model.diffusion_model.*`` or
    diffusers-named). ``config``: a UNet config dict or folder; default ``config.json`` beside a diffusers-named
    file, else the SDXL base/refiner default."""
    return _load_one("unet", path, dtype, device, variant, config)


def load_vae(
    path: PathLike, dtype: DtypeLike = torch.float32, device: torch.device | str = "cpu",
    variant: str | None = None, config: PathLike | Mapping | None = None,
) -> nn.Module:
    """VAE from a pipeline folder, its ``vae/`` folder, or a single file (LDM ``first_stage_model.*``, unprefixed
    LDM names, or diffusers names such as ``sdxl_vae.safetensors``)."""
    return _load_one("vae", path, dtype, device, variant, config)


def load_text_encoder(
    path: PathLike, dtype: DtypeLike = torch.float32, device: torch.device | str = "cpu",
    variant: str | None = None, config: PathLike | Mapping | None = None,
) -> nn.Module:
    """CLIP ViT-L/14 text encoder (``text_encoder``) from a folder or a single file."""
    return _load_one("text_encoder", path, dtype, device, variant, config)


def load_text_encoder_2(
    path: PathLike, dtype: DtypeLike = torch.float32, device: torch.device | str = "cpu",
    variant: str | None = None, config: PathLike | Mapping | None = None,
) -> nn.Module:
    """OpenCLIP ViT-bigG/14 text encoder with projection (``text_encoder_2``) from a folder or a single file."""
    return _load_one("text_encoder_2", path, dtype, device, variant, config)


def _load_tok(path: PathLike | None, which: str):
    if path is None:
        return _tokenizer_from(None, which)
    p = resolve_pretrained_path(path)
    if p.is_file():
        return _tokenizer_from(None, which)
    if (p / "model_index.json").exists():
        sub = component_folder(p, which, read_model_index(p), required=True)
        assert sub is not None
        p = sub
    return _tokenizer_from(p, which)


def load_tokenizer(path: PathLike | None = None):
    """Tokenizer 1 from a pipeline or tokenizer folder; the bundled vocab (pad ``<|endoftext|>``) for a single
    file or ``None``."""
    return _load_tok(path, "tokenizer")


def load_tokenizer_2(path: PathLike | None = None):
    """Tokenizer 2 from a pipeline or tokenizer folder; the bundled vocab (pad ``!``) for a single file or
    ``None``."""
    return _load_tok(path, "tokenizer_2")


def load_scheduler_config(path: PathLike | None = None) -> dict[str, Any]:
    """``scheduler_config.json`` of a pipeline (or scheduler) folder; SDXL's default for a file or ``None``."""
    if path is None:
        return copy.deepcopy(SINGLE_FILE_DEFAULTS["sdxl_base"]["scheduler"])
    p = resolve_pretrained_path(path)
    if p.is_file():
        return copy.deepcopy(SINGLE_FILE_DEFAULTS["sdxl_base"]["scheduler"])
    if (p / "model_index.json").exists():
        sub = component_folder(p, "scheduler", read_model_index(p), required=True)
        assert sub is not None
        p = sub
    return load_scheduler_config_folder(p)
