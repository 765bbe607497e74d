"""Diffusers-format SDXL folders, read offline as they are on disk.

Layout (``save_pretrained`` of ``StableDiffusionXLPipeline``)::

    model_index.json                      {"_class_name": ..., "unet": ["diffusers", "UNet2DConditionModel"], ...,
                                           "force_zeros_for_empty_prompt": true}
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors (or a *.safetensors.index[.fp16].json + shards)
    vae/config.json  + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/config.json, text_encoder_2/config.json + model[.fp16].safetensors
    tokenizer/, tokenizer_2/              vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json

A refiner folder lists ``text_encoder`` / ``tokenizer`` as ``[null, null]``. A Hugging Face cache entry
(``models--org--name/snapshots/<hash>/...``, files symlinked into ``../../blobs``) is such a folder; the
``models--org--name`` root is resolved through ``refs/main``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.sdxl.loading.keymap_text import hf_clip_recipes
from w2sd.sdxl.loading.keymap_vae import rename_deprecated_vae_attention
from w2sd.sdxl.loading.models import load_component
from w2sd.sdxl.loading.safetensors_io import ensure_readable_file, open_weights
from w2sd.sdxl.loading.strict import TensorRecipe

__all__ = [
    "PIPELINE_COMPONENTS",
    "REQUIRED_COMPONENTS",
    "WEIGHT_BASES",
    "resolve_pretrained_path",
    "read_json",
    "read_model_index",
    "component_folder",
    "load_component_folder",
    "load_scheduler_config_folder",
]

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# The refiner has no text_encoder / tokenizer; everything else is needed by the SDXL pipeline.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
# Weight-file base names per component kind (diffusers models vs transformers models).
WEIGHT_BASES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model",),
    "text_encoder_2": ("model",),
}


def _hf_cache_dirs() -> list[Path]:
    env = os.environ
    dirs = []
    if env.get("HF_HUB_CACHE"):
        dirs.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]) / "hub")
    dirs.append(Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return dirs


def _snapshot_of_repo_root(root: Path, revision: str) -> Path:
    snapshots = root / "snapshots"
    ref = root / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        snap = snapshots / commit
        if not snap.is_dir():
            raise CheckpointError(f"{ref} points to commit {commit}, but {snap} does not exist")
        return snap
    if (snapshots / revision).is_dir():  # revision given as a commit hash
        return snapshots / revision
    found = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return snapshots / found[0]
    raise CheckpointError(
        f"{root}: Hugging Face cache entry without refs/{revision}; snapshots present: {found or 'none'}. "
        "Pass the snapshot folder itself."
    )


def resolve_pretrained_path(path: str | os.PathLike, revision: str = "main") -> Path:
    """Turn ``path`` into a file or folder on disk, offline.

    - an existing file or folder is returned as is, except a Hugging Face cache repo root
      (``models--org--name`` with ``snapshots/``), which resolves to ``snapshots/<refs/main>``;
    - ``"org/name"`` that is not a path is looked up as ``models--org--name`` in the local HF cache
      (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
    """
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and (p / "snapshots").is_dir() and not (p / "model_index.json").exists():
            return _snapshot_of_repo_root(p, revision)
        return p
    text = os.fspath(path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        name = "models--" + text.replace("/", "--")
        for cache in _hf_cache_dirs():
            if (cache / name).is_dir():
                return _snapshot_of_repo_root(cache / name, revision)
        raise FileNotFoundError(
            f"{text!r} is neither a path nor a repo in the local Hugging Face cache "
            f"(looked for {name} in {', '.join(map(str, _hf_cache_dirs()))}; w2sd never downloads)"
        )
    raise FileNotFoundError(f"checkpoint path not found: {p}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object, raising ``CheckpointError`` / ``FileNotFoundError`` naming ``path``."""
    ensure_readable_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON in {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def read_model_index(folder: Path) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder."""
    path = folder / "model_index.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(
            f"{folder} is not a diffusers pipeline folder: model_index.json is missing "
            "(for one component, use load_unet/load_vae/... on the component folder)"
        )
    return read_json(path, "model_index.json")


def component_folder(folder: Path, name: str, model_index: Mapping[str, Any], required: bool) -> Path | None:
    """The sub-folder of component ``name``; ``None`` when model_index lists it as ``[null, null]`` or omits an
    optional one. Raises ``CheckpointError`` naming the component and path when a needed folder is absent."""
    entry = model_index.get(name)
    listed_null = isinstance(entry, (list, tuple)) and all(e is None for e in entry)
    sub = folder / name
    if listed_null or entry is None:
        if required:
            why = "listed as [null, null]" if listed_null else "not listed"
            raise CheckpointError(
                f"{folder}: required component {name!r} is {why} in model_index.json "
                f"(pipeline class {model_index.get('_class_name')!r}; SDXL needs {', '.join(REQUIRED_COMPONENTS)})"
            )
        return None
    if not sub.is_dir():
        raise CheckpointError(f"{folder}: component {name!r} is listed in model_index.json but {sub} is missing")
    return sub


def _identity_recipes(keys: list[str], kind: str) -> dict[str, TensorRecipe]:
    if kind in ("text_encoder", "text_encoder_2"):
        return hf_clip_recipes(keys)
    if kind == "vae":
        return {rename_deprecated_vae_attention(k): TensorRecipe(k) for k in keys}
    return {k: TensorRecipe(k) for k in keys}


def load_component_folder(
    sub: str | os.PathLike,
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
    config: Mapping | None = None,
) -> tuple[nn.Module, str]:
    """Load a diffusers/transformers component folder (``config.json`` + safetensors). Returns
    ``(module, description of the files read)``."""
    sub = Path(sub)
    cfg = dict(config) if config is not None else read_json(sub / "config.json", f"{kind} config")
    reader = open_weights(sub, WEIGHT_BASES[kind], variant)
    module = load_component(
        kind, cfg, reader, _identity_recipes(reader.keys(), kind), dtype=dtype, device=device
    )
    return module, reader.description


def load_scheduler_config_folder(sub: str | os.PathLike) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` as a dict (the scheduler is built elsewhere)."""
    return read_json(Path(sub) / "scheduler_config.json", "scheduler config")
