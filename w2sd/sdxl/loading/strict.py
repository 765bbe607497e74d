"""Strict loading: build a module with its parameters on the ``meta`` device, check every key and shape against
a checkpoint, then read each tensor once, straight into the target dtype/device, and ``assign`` it.

Missing, unexpected and mis-shaped keys are listed by name in one ``CheckpointError`` (long lists are cut to
``MAX_LISTED`` names, with the full count).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import torch
from torch import nn

from w2sd.errors import CheckpointError
from w2sd.sdxl.loading.safetensors_io import CheckpointReader

__all__ = [
    "MAX_LISTED",
    "TensorRecipe",
    "recipe_shape",
    "params_on_meta",
    "format_key_report",
    "check_keys",
    "load_strict",
    "state_dict_nbytes",
]

MAX_LISTED = 20  # names listed per category in a key report

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class TensorRecipe:
    """How one model tensor is made from one checkpoint tensor.

    ``rows``: take rows ``[a, b)`` of dim 0 (OpenCLIP's packed ``in_proj``); ``transpose``: 2-D transpose
    (OpenCLIP ``text_projection``, stored as ``x @ P``); ``squeeze_1x1``: drop trailing ``(1, 1)`` dims of a 1x1
    conv weight (LDM VAE attention) -- a no-op for tensors that are already 2-D.
    """

    source: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    squeeze_1x1: bool = False


def recipe_shape(recipe: TensorRecipe, source_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape the recipe produces from a source tensor of ``source_shape`` (without reading it)."""
    shape = source_shape
    if recipe.rows is not None and shape:
        a, b = recipe.rows
        shape = (max(0, min(b, shape[0]) - a), *shape[1:])
    if recipe.squeeze_1x1 and len(shape) == 4 and shape[2:] == (1, 1):
        shape = shape[:2]
    if recipe.transpose and len(shape) == 2:
        shape = (shape[1], shape[0])
    return shape


def _make(recipe: TensorRecipe, reader: CheckpointReader, dtype: torch.dtype | None, device) -> torch.Tensor:
    tensor = reader.read(recipe.source, dtype=dtype, device=device, rows=recipe.rows)
    if recipe.squeeze_1x1 and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        tensor = tensor[:, :, 0, 0]
    if recipe.transpose and tensor.dim() == 2:
        tensor = tensor.t()
    return tensor.contiguous()


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Within the block, every ``nn.Parameter`` registered on a module is moved to the ``meta`` device.

    Buffers stay real, so non-persistent buffers computed in ``__init__`` (position ids, frequency tables) survive;
    ``torch.nn.init`` functions skip meta tensors. (Patches ``nn.Module.register_parameter`` and ``torch.nn.init``
    for the duration; not thread-safe.)
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    # Random init of meta tensors is pointless, and the first one imports torch._dynamo (seconds): skip it.
    init_fns = {
        name: fn for name, fn in vars(nn.init).items() if name.endswith("_") and not name.startswith("_") and callable(fn)
    }

    def skip_on_meta(fn):
        def init(tensor, *args, **kwargs):
            return tensor if getattr(tensor, "is_meta", False) else fn(tensor, *args, **kwargs)

        return init

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    for name, fn in init_fns.items():
        setattr(nn.init, name, skip_on_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, fn in init_fns.items():
            setattr(nn.init, name, fn)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def format_key_report(
    what: str,
    source: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    """The text of a strict-load error: counts plus the first ``MAX_LISTED`` names per category."""
    parts = [f"{what}: checkpoint {source} does not match the model"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listing("mis-shaped keys (key: checkpoint shape vs model shape)", mismatched))
    return "\n".join(parts)


def check_keys(
    what: str,
    expected: Mapping[str, tuple[int, ...]],
    recipes: Mapping[str, TensorRecipe],
    reader: CheckpointReader,
    unexpected_sources: Iterable[str] = (),
) -> None:
    """Raise ``CheckpointError`` listing every expected key without a tensor, every extra key and every shape
    mismatch. ``unexpected_sources`` are checkpoint keys the key map could not place."""
    missing, unexpected, mismatched = [], list(unexpected_sources), []
    for key, shape in expected.items():
        recipe = recipes.get(key)
        if recipe is None:
            missing.append(key)
        elif recipe.source not in reader:
            missing.append(key if recipe.source == key else f"{key} (from {recipe.source})")
        else:
            got = recipe_shape(recipe, reader.shape(recipe.source))
            if tuple(got) != tuple(shape):
                src = "" if recipe.source == key else f" (from {recipe.source})"
                mismatched.append(f"{key}{src}: {list(got)} vs {list(shape)}")
    for key, recipe in recipes.items():
        if key not in expected:
            unexpected.append(key if recipe.source == key else f"{recipe.source} (-> {key})")
    if missing or unexpected or mismatched:
        raise CheckpointError(format_key_report(what, reader.description, missing, unexpected, mismatched))


def load_strict(
    build: Callable[[], M],
    recipes: Mapping[str, TensorRecipe],
    reader: CheckpointReader,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    what: str = "model",
    unexpected_sources: Iterable[str] = (),
) -> M:
    """Build ``build()`` with meta parameters, check keys/shapes (``check_keys``), read and assign every tensor.

    Each tensor is read once from disk into ``dtype`` on ``device`` (floating tensors; integer buffers keep their
    dtype); no second full copy of the weights exists at any time. Returns the module in eval mode with
    ``requires_grad`` off.
    """
    with params_on_meta():
        module = build()
    state = module.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    check_keys(what, expected, recipes, reader, unexpected_sources)
    try:
        tensors = {key: _make(recipes[key], reader, dtype, device) for key in expected}
    finally:
        reader.release()
    module.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    module.to(device=device, dtype=dtype)  # only non-persistent buffers still need it; loaded tensors are no-ops
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{what}: tensors left on the meta device after loading: {leftover[:MAX_LISTED]}")
    module.eval()
    module.requires_grad_(False)
    return module


def state_dict_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's state dict (for reports and benchmarks)."""
    return sum(math.prod(t.shape) * t.element_size() for t in module.state_dict().values())
