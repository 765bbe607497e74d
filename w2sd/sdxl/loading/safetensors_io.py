"""Lazy, validating reader for safetensors files, shards and diffusers/transformers weight-file names.

The safetensors layout (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian u64 ``N``,
then ``N`` bytes of JSON header ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer; offsets are relative to the start of the data buffer.

We parse the header ourselves and read each tensor with ``readinto`` into a fresh buffer, so

- a truncated or corrupt file is reported by name before any tensor is read (``CheckpointError``);
- no file-backed mmap stays resident: peak memory while loading is the model in its target dtype plus one
  tensor in the file dtype (see ``benchmarks/load_memory.py``);
- a slice of rows (OpenCLIP's packed ``in_proj_weight``) is read without reading the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from w2sd.errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "TensorInfo",
    "CheckpointReader",
    "read_safetensors_header",
    "find_weight_files",
    "open_weights",
    "ensure_readable_file",
]

# safetensors dtype strings -> torch dtypes (little-endian storage).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

# A header larger than this is not a real checkpoint (SDXL's largest single file has a ~200 kB header).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range ``[start, end)``."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def ensure_readable_file(path: Path, what: str = "checkpoint file") -> None:
    """Raise ``FileNotFoundError`` naming ``path``; a dangling symlink (HF cache blob missing) is said so."""
    if path.is_file():
        return
    if path.is_symlink():
        raise FileNotFoundError(
            f"{what} {path} is a symlink to {os.readlink(path)!r}, which does not exist "
            "(a Hugging Face cache snapshot whose blob is missing or was only partly downloaded?)"
        )
    raise FileNotFoundError(f"{what} not found: {path}")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns ``(infos, metadata)``. Raises ``CheckpointError`` naming the file when it is truncated, when its
    header is not valid JSON, or when an entry's dtype, shape or byte range is inconsistent.
    """
    path = Path(path)
    ensure_readable_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: not a safetensors file or truncated: {size} bytes, need at least 8 for the header length"
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file: header length {header_len} does not fit in the "
                f"file's {size} bytes"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {entry!r} ({exc!r})") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {key!r}: shape {list(shape)} {entry['dtype']} needs "
                f"{nbytes} bytes but data_offsets give {end - begin}"
            )
        data_end = max(data_end, end)
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header needs {data_start + data_end} bytes but the file has "
            f"{size} (cut off during download or copy?)"
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


class CheckpointReader:
    """Read-only, lazy view on the tensors of one safetensors file or of a sharded checkpoint.

    ``read`` returns a fresh tensor (no mmap), converted per tensor to ``dtype`` (floating tensors only) and
    moved to ``device``.
    """

    def __init__(self, files: Iterable[str | os.PathLike], description: str | None = None) -> None:
        self.files = [Path(p) for p in files]
        if not self.files:
            raise CheckpointError(f"no safetensors files given ({description})")
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            infos, metadata = read_safetensors_header(file)
            for key in infos:
                if key in self.infos:
                    raise CheckpointError(
                        f"tensor {key!r} appears in two shards: {self.infos[key].file} and {file}"
                    )
            self.infos.update(infos)
            self.metadata.update(metadata)
        self.description = description or ", ".join(str(f) for f in self.files)
        self._scratch: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"CheckpointReader({self.description!r}, {len(self.infos)} tensors)"

    def __contains__(self, key: object) -> bool:
        return key in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.infos)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` as stored."""
        return self.infos[key].shape

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Total bytes of all tensors, as stored or (floating tensors) in ``dtype``."""
        total = 0
        for info in self.infos.values():
            d = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            total += math.prod(info.shape) * torch.empty((), dtype=d).element_size()
        return total

    def read(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Read tensor ``key`` (optionally only rows ``[a, b)`` of dim 0) as ``dtype`` on ``device``."""
        if key not in self.infos:
            raise CheckpointError(f"tensor {key!r} not found in {self.description}")
        info = self.infos[key]
        shape = info.shape
        start, nbytes = info.start, info.end - info.start
        if rows is not None:
            a, b = rows
            if not shape or not 0 <= a <= b <= shape[0]:
                raise CheckpointError(f"{info.file}: cannot take rows {a}:{b} of tensor {key!r} with shape {shape}")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, nbytes = start + a * row_bytes, (b - a) * row_bytes
            shape = (b - a, *shape[1:])
        target = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        convert = target != info.dtype or torch.device(device).type != "cpu"
        if convert:
            # Read into a reused scratch buffer; ``.to`` below makes the only new allocation (the result). Fresh
            # per-tensor staging buffers would fragment the heap (glibc's dynamic mmap threshold) and raise the
            # peak RSS of an fp32 -> fp16 load by ~25 % (benchmarks/load_memory.py).
            if self._scratch is None or self._scratch.numel() < nbytes:
                self._scratch = None
                self._scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            buf = self._scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {key!r} ({got} of {nbytes} bytes)")
        tensor = buf.view(info.dtype).reshape(shape)
        return tensor.to(device=device, dtype=target, copy=True) if convert else tensor

    def release(self) -> None:
        """Free the scratch buffer used for dtype/device conversion (reading again re-creates it)."""
        self._scratch = None

    def read_all(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor (for small files and tests)."""
        return {k: self.read(k, dtype, device) for k in self.infos}


# --------------------------------------------------------------------------------------------------------------
# diffusers / transformers weight-file names inside a component folder
# --------------------------------------------------------------------------------------------------------------

_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def _add_variant(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors`` (diffusers rule:
    the variant goes before the last suffix; ``x.safetensors.index.json`` -> ``x.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _variants_present(folder: Path, base: str) -> list[str]:
    """Variant names for which ``base`` has a single file or an index in ``folder``."""
    found = set()
    for p in folder.iterdir():
        name = p.name
        m = re.fullmatch(re.escape(base) + r"\.([^.]+)\.safetensors", name)
        if m and not _SHARD_RE.search(m.group(1)):
            found.add(m.group(1))
        m = re.fullmatch(re.escape(base) + r"\.safetensors\.index\.([^.]+)\.json", name)
        if m:
            found.add(m.group(1))
    return sorted(found)


def _files_for(folder: Path, base: str, variant: str | None) -> list[Path] | None:
    single = folder / _add_variant(f"{base}.safetensors", variant)
    index = folder / _add_variant(f"{base}.safetensors.index.json", variant)
    if single.exists() or single.is_symlink():
        ensure_readable_file(single)
        return [single]
    if index.exists() or index.is_symlink():
        ensure_readable_file(index, "shard index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid sharded-checkpoint index ({exc!r})") from None
        shards = []
        for shard in dict.fromkeys(weight_map.values()):
            path = folder / shard
            ensure_readable_file(path, f"shard listed in {index.name}")
            shards.append(path)
        return shards
    return None


def find_weight_files(
    folder: str | os.PathLike,
    bases: tuple[str, ...] = ("diffusion_pytorch_model", "model"),
    variant: str | None = None,
) -> tuple[list[Path], str]:
    """Locate a component's safetensors weights in ``folder``: single file or shards, with optional variant.

    Order: the requested ``variant``; then the plain files (a requested variant that is missing falls back to them,
    as diffusers does for components without a variant); with no variant requested and no plain file, the only
    variant present is picked. Returns ``(files, note)`` where ``note`` says what was chosen.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder not found: {folder}")
    for base in bases:
        if variant:
            files = _files_for(folder, base, variant)
            if files is not None:
                return files, f"{files[0].name}" + (f" (+{len(files) - 1} shards)" if len(files) > 1 else "")
    for base in bases:
        files = _files_for(folder, base, None)
        if files is not None:
            note = files[0].name + (f" (+{len(files) - 1} shards)" if len(files) > 1 else "")
            if variant:
                note += f" (variant {variant!r} not present, used the plain weights)"
            return files, note
    for base in bases:
        variants = _variants_present(folder, base)
        if len(variants) == 1:
            files = _files_for(folder, base, variants[0])
            assert files is not None
            return files, files[0].name + f" (only variant {variants[0]!r} present)"
        if len(variants) > 1:
            raise CheckpointError(
                f"{folder}: several weight variants {variants} and no plain {base}.safetensors; pass variant=..."
            )
    names = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickled weights {pickles}; w2sd loads safetensors only (pickles can run code). "
            "Convert them to .safetensors first."
        )
    expected = " or ".join(f"{b}.safetensors / {b}.safetensors.index.json" for b in bases)
    raise CheckpointError(f"{folder}: no weights file ({expected}) found; folder holds {names}")


def open_weights(
    folder: str | os.PathLike, bases: tuple[str, ...] = ("diffusion_pytorch_model", "model"), variant: str | None = None
) -> CheckpointReader:
    """``CheckpointReader`` over the weights that ``find_weight_files`` picks in ``folder``."""
    files, note = find_weight_files(folder, bases, variant)
    return CheckpointReader(files, f"{Path(folder)}/{note}")
