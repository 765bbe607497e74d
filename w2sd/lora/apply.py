"""Attach / detach LoRAs to model components and switch their scales at run time.

    handle = attach_lora({"unet": unet, "text_encoder": te1, "text_encoder_2": te2}, load_lora(path), name="dpo")
    set_lora_scale(handle, "dpo", 1.5)         # or handle.scale = 1.5, or set_lora_scale(models, "dpo", 1.5)
    with lora_scale(handle, -1.5): eps = unet(...)
    detach_lora(handle)

Several LoRAs can be attached at once (distinct names), each with its own scale. Scales are plain floats read at
forward time (``w2sd.lora.layers``), so W2SD's strong / weak / main switching costs a few attribute writes.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from w2sd.errors import LoRAError
from w2sd.lora.formats import LoRA, LoRAModule, _listing, load_lora
from w2sd.lora.kohya_names import kohya_name_table
from w2sd.lora.layers import LoRABranch, LoRAScale, check_scale

Models = Mapping[str, nn.Module]

# model root -> {lora name: handle}; weak so that attaching never keeps a model alive.
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, dict[str, LoRAHandle]]" = weakref.WeakKeyDictionary()


class LoRAHandle:
    """One LoRA attached to one or more model components under ``name``; owns its branches and its scale."""

    def __init__(self, name: str, lora: LoRA, models: dict[str, nn.Module], scale: float) -> None:
        self.name = name
        self.lora = lora
        # weak, so that the registry (weak keys -> handles) never keeps a model alive
        self._models = {comp: weakref.ref(m) for comp, m in models.items()}
        self._scale = LoRAScale(scale)
        self.branches: dict[str, LoRABranch] = {}  # "component:module.path" -> branch
        self.attached = False

    @property
    def models(self) -> dict[str, nn.Module]:
        """The component models this LoRA is attached to (those still alive)."""
        return {comp: m for comp, ref in self._models.items() if (m := ref()) is not None}

    @property
    def scale(self) -> float:
        """The current scale (multiplies every module's ``alpha / rank``)."""
        return self._scale.value

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale.value = check_scale(value)

    def set_scale(self, value: float) -> None:
        """Set the scale; 0 turns the LoRA off without detaching it."""
        self.scale = value

    @contextmanager
    def scaled(self, value: float) -> Iterator[LoRAHandle]:
        """Temporarily set the scale, restoring the previous one on exit."""
        previous = self.scale
        self.scale = value
        try:
            yield self
        finally:
            self._scale.value = previous

    def detach(self) -> None:
        """Remove every branch; the models compute exactly their base outputs again. Idempotent."""
        for branch in self.branches.values():
            branch.remove()
        self.branches.clear()
        for model in self.models.values():
            attached = _REGISTRY.get(model)
            if attached is not None and attached.get(self.name) is self:
                del attached[self.name]
        self.attached = False

    def __repr__(self) -> str:
        state = f"{len(self.branches)} modules" if self.attached else "detached"
        return f"LoRAHandle(name={self.name!r}, scale={self.scale}, {state}, source={self.lora.source!r})"


def _as_models(models: Models | nn.Module, lora: LoRA | None = None) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        comps = sorted(lora.components) if lora is not None else []
        if len(comps) != 1:
            raise ValueError(
                "pass models as a dict like {'unet': unet, 'text_encoder': te1, 'text_encoder_2': te2}"
                + (f"; this LoRA targets {comps}" if comps else "")
            )
        return {comps[0]: models}
    if not isinstance(models, Mapping) or not all(isinstance(m, nn.Module) for m in models.values()):
        raise ValueError("models must be a dict of component name -> nn.Module")
    return dict(models)


class _Resolver:
    """Looks up LoRA module targets in one model component (exact names, built from the module tree)."""

    def __init__(self, component: str, model: nn.Module) -> None:
        self.component = component
        self.modules = dict(model.named_modules())
        self._kohya: dict[str, str] | None = None
        self.paths: dict[str, str] = {}
        for path in self.modules:
            if not path:
                continue
            self.paths.setdefault(path, path)
            # transformers 5 CLIPTextModel has no `text_model.` wrapper; files usually spell it.
            alias = path[len("text_model.") :] if path.startswith("text_model.") else "text_model." + path
            self.paths.setdefault(alias, path)

    def resolve(self, mod: LoRAModule) -> str | None:
        if mod.naming == "kohya":
            if self._kohya is None:
                self._kohya = kohya_name_table(self.component, list(self.modules))
            return self._kohya.get(mod.target)
        return self.paths.get(mod.target)


def attach_lora(
    models: Models | nn.Module,
    lora: LoRA | str | os.PathLike | Mapping[str, torch.Tensor],
    name: str = "lora",
    scale: float = 1.0,
    allow_partial: bool = False,
) -> LoRAHandle:
    """Attach ``lora`` as runtime-scaled side branches to the matching Linear / Conv2d modules of ``models``.

    models: component name -> module, e.g. ``{"unet": unet, "text_encoder": te1, "text_encoder_2": te2}``
        (kohya ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_``, diffusers ``unet.`` / ``text_encoder.`` /
        ``text_encoder_2.``). A single module is accepted when the LoRA targets a single component.
    lora: a parsed ``LoRA`` or anything ``load_lora`` takes.
    name: unique per model; used by ``set_lora_scale`` / ``detach_lora``.
    scale: the initial user scale (W2SD: strong +1.5, weak -1.5, main 0.8).
    allow_partial: if False (default), LoRA modules that match no module raise ``LoRAError`` listing them; if True
        they are skipped with a warning giving the count. A LoRA that matches nothing always raises.
    Shape mismatches and non-Linear/Conv2d targets always raise ``LoRAError`` naming the module and shapes.
    """
    if not isinstance(lora, LoRA):
        lora = load_lora(lora)
    models = _as_models(models, lora)
    if not isinstance(name, str) or not name:
        raise ValueError(f"LoRA name must be a non-empty string, got {name!r}")
    scale = check_scale(scale)
    for comp, model in models.items():
        if name in _REGISTRY.get(model, {}):
            raise LoRAError(f"a LoRA named {name!r} is already attached to {comp!r}; detach it or pick another name")

    resolvers = {comp: _Resolver(comp, model) for comp, model in models.items()}
    matched: list[tuple[LoRAModule, str, str]] = []  # (module, component, path)
    unmatched: dict[str, list[str]] = {}  # reason -> keys
    for mod in lora.modules:
        resolver = resolvers.get(mod.component)
        if resolver is None:
            unmatched.setdefault(f"no model {mod.component!r} given", []).append(mod.key)
            continue
        path = resolver.resolve(mod)
        if path is None:
            unmatched.setdefault(f"no such module in {mod.component!r}", []).append(mod.key)
            continue
        matched.append((mod, mod.component, path))

    n_unmatched = sum(len(v) for v in unmatched.values())
    where = f"LoRA {name!r} ({lora.source})"
    if not matched:
        raise LoRAError(
            f"{where}: none of its {len(lora)} modules matches a module of {sorted(models)}: " + _reasons(unmatched)
        )
    if n_unmatched and not allow_partial:
        raise LoRAError(
            f"{where}: {n_unmatched} of {len(lora)} LoRA modules match no module (pass allow_partial=True to skip "
            "them): " + _reasons(unmatched)
        )
    if n_unmatched:
        warnings.warn(f"{where}: skipped {n_unmatched} of {len(lora)} LoRA modules that match no module", stacklevel=2)

    handle = LoRAHandle(name, lora, models, scale)
    seen: dict[str, str] = {}
    try:
        for mod, comp, path in matched:
            slot = f"{comp}:{path}"
            if slot in seen:
                raise LoRAError(f"{where}: LoRA modules {seen[slot]!r} and {mod.key!r} both target {slot}")
            seen[slot] = mod.key
            base = resolvers[comp].modules[path]
            label = f"{slot} ({mod.key!r})"
            handle.branches[slot] = LoRABranch(base, mod.down, mod.up, mod.multiplier, handle._scale, label)
    except Exception:
        handle.detach()
        raise
    for model in models.values():
        _REGISTRY.setdefault(model, {})[name] = handle
    handle.attached = True
    return handle


def _reasons(unmatched: dict[str, list[str]]) -> str:
    return "; ".join(f"{reason} ({len(keys)}): {_listing(keys)}" for reason, keys in unmatched.items())


def attached_loras(target: LoRAHandle | Models | nn.Module) -> dict[str, LoRAHandle]:
    """The LoRAs attached to a model / dict of models (name -> handle)."""
    if isinstance(target, LoRAHandle):
        return {target.name: target} if target.attached else {}
    models = [target] if isinstance(target, nn.Module) else list(target.values())
    out: dict[str, LoRAHandle] = {}
    for model in models:
        out.update(_REGISTRY.get(model, {}))
    return out


def _find(target: LoRAHandle | Models | nn.Module, name: str | None) -> LoRAHandle:
    if isinstance(target, LoRAHandle):
        if name is not None and name != target.name:
            raise LoRAError(f"handle is LoRA {target.name!r}, not {name!r}")
        return target
    attached = attached_loras(target)
    if name is None:
        raise ValueError(f"name the LoRA to use; attached: {sorted(attached)}")
    if name not in attached:
        raise LoRAError(f"no LoRA named {name!r} is attached; attached: {sorted(attached)}")
    return attached[name]


def set_lora_scale(target: LoRAHandle | Models | nn.Module, name: str | None, scale: float) -> None:
    """Set the scale of LoRA ``name`` (``None`` allowed when ``target`` is its handle). Costs one float write."""
    _find(target, name).scale = scale


def set_lora_scales(target: Models | nn.Module, scales: Mapping[str, float]) -> None:
    """Set several LoRAs' scales at once, e.g. ``{"dpo": 1.5, "style": 0.5}`` (all validated before any is set)."""
    handles = {n: _find(target, n) for n in scales}
    values = {n: check_scale(s) for n, s in scales.items()}
    for n, handle in handles.items():
        handle.scale = values[n]


@contextmanager
def lora_scale(target: LoRAHandle | Models | nn.Module, scale: float, name: str | None = None) -> Iterator[LoRAHandle]:
    """Context manager: use ``scale`` for LoRA ``name`` (or the handle given) inside the block, then restore."""
    with _find(target, name).scaled(scale) as handle:
        yield handle


def detach_lora(target: LoRAHandle | Models | nn.Module, name: str | None = None) -> None:
    """Detach one LoRA (a handle, or ``name`` on the models); ``name=None`` with models detaches all of them."""
    if isinstance(target, LoRAHandle) or name is not None:
        _find(target, name).detach()
        return
    for handle in list(attached_loras(target).values()):
        handle.detach()


def bind_lora_scale(
    fn: Callable[..., torch.Tensor], target: LoRAHandle | Models | nn.Module, scale: float, name: str | None = None
) -> Callable[..., torch.Tensor]:
    """Wrap a denoiser ``fn`` so each call runs with LoRA ``name`` at ``scale`` (restored afterwards)."""
    handle = _find(target, name)
    scale = check_scale(scale)

    def scaled(*args, **kwargs):
        with handle.scaled(scale):
            return fn(*args, **kwargs)

    return scaled
