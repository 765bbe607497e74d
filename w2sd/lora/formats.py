"""Parse kohya-ss, PEFT/diffusers and old diffusers LoRA state dicts into one normalized form.

Formats (research/sdxl.md §6), detected per key, so no format flag is needed:
- kohya-ss: ``lora_unet_<sgm path>`` / ``lora_te1_`` / ``lora_te2_`` (+ SD1.x ``lora_te_``) module names with
  ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and an optional scalar ``.alpha``
  (missing or 0 -> alpha = r, i.e. scale 1).
- PEFT / current diffusers: ``unet.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r), also
  ``text_encoder.`` / ``text_encoder_2.``; alphas from the ``lora_adapter_metadata`` safetensors metadata
  (``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``), else alpha = r. Raw PEFT state dicts with
  ``base_model.model.`` or an adapter name (``lora_A.default.weight``) are accepted too.
- old diffusers: ``unet.<path>.attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` -> ``to_out.0``),
  ``text_encoder.<path>.self_attn.to_q_lora.down.weight`` (-> ``q_proj``), ``<path>.lora_linear_layer.down.weight``
  and ``<path>.lora.down.weight``.

Unsupported variants (DoRA, LyCORIS LoHa / LoKr / Tucker ``lora_mid``, LoRA biases) raise ``LoRAError`` rather than
being ignored, since ignoring them would silently change the result.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from w2sd.errors import LoRAError
from w2sd.lora.kohya_names import KOHYA_PREFIXES

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key holding the LoraConfig as JSON
_MAX_LISTED = 20

# key pattern -> (style, which of the pair); "mod" is the module key (the part a ".alpha" key would share).
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>down|up)\.weight$"), "kohya"),
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "peft"),
    (re.compile(r"^(?P<mod>.+)\.(?P<proc>to_q|to_k|to_v|to_out)_lora\.(?P<ab>down|up)\.weight$"), "diffusers_old"),
    (re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<ab>down|up)\.weight$"), "diffusers_old"),
    (re.compile(r"^(?P<mod>.+)\.lora\.(?P<ab>down|up)\.weight$"), "diffusers_old"),
]
_ALPHA_RE = re.compile(r"^(?P<mod>.+)\.alpha$")
_UNSUPPORTED = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS/LoCon Tucker (lora_mid)",
    "lora_B.bias": "PEFT lora_bias",
    "lora_up.bias": "LoRA bias",
}
_OLD_PROC_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_PROC_TARGET_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DOWN = {"down", "A"}


@dataclass(frozen=True)
class LoRAModule:
    """One LoRA pair in normalized form. Branch: ``y = base(x) + scale * (alpha / rank) * up(down(x))``.

    key: the module key as spelled in the file (for error messages).
    component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``.
    naming: ``"kohya"`` (``target`` is a full kohya name, resolved via ``kohya_names``) or ``"path"`` (``target`` is
        a dotted module path inside the component).
    down: (r, in) for Linear, (r, in, kh, kw) for Conv2d. up: (out, r) or (out, r, 1, 1).
    alpha: effective alpha, so the per-module multiplier is ``alpha / rank`` (rsLoRA is folded in).
    """

    key: str
    component: str
    naming: str
    target: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def multiplier(self) -> float:
        """``alpha / rank``, the factor the user scale is multiplied with."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoRA:
    """A parsed LoRA file: its modules, the detected format(s) and where it came from."""

    modules: tuple[LoRAModule, ...]
    format: str
    source: str = "<state dict>"

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _split_component(mod: str) -> tuple[str, str]:
    """``"text_encoder_2.text_model.x"`` -> ``("text_encoder_2", "text_model.x")``; no prefix means the UNet."""
    head, _, rest = mod.partition(".")
    comp, path = (head, rest) if head in COMPONENTS and rest else ("unet", mod)
    if path.startswith("base_model.model."):
        path = path[len("base_model.model.") :]
    return comp, path


def _kohya_component(mod: str) -> str | None:
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):  # lora_te1_ before lora_te_
        if mod.startswith(prefix + "_"):
            return KOHYA_PREFIXES[prefix]
    return None


def _scalar(t: torch.Tensor, key: str) -> float:
    if t.numel() != 1:
        raise LoRAError(f"LoRA alpha {key!r} must be a scalar, got shape {tuple(t.shape)}")
    value = float(t.detach().float().reshape(()).item())
    if not math.isfinite(value):
        raise LoRAError(f"LoRA alpha {key!r} is not finite: {value}")
    return value


def _peft_pattern_value(patterns: Mapping[str, float], path: str) -> float | None:
    """PEFT's ``get_pattern_key`` rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", path)``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(value)
    return None


def parse_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = "<state dict>"
) -> LoRA:
    """Normalize a LoRA state dict (any supported format) into a ``LoRA``.

    ``metadata`` is the safetensors header metadata (only ``lora_adapter_metadata`` is read). Raises ``LoRAError``
    for unknown or unsupported keys, a down without its up (or vice versa), inconsistent shapes, or orphan alphas.
    """
    if not state_dict:
        raise LoRAError(f"LoRA {source}: the state dict is empty")
    config: dict = {}
    if metadata and metadata.get(METADATA_KEY):
        try:
            config = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LoRAError(f"LoRA {source}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None

    pairs: dict[str, dict] = {}  # module key -> {"down", "up", "style", "component", "naming", "target", "alpha_keys"}
    alphas: dict[str, tuple[str, float]] = {}  # module key of the alpha -> (alpha key, value)
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for key, tensor in state_dict.items():
        kind = next((name for marker, name in _UNSUPPORTED.items() if marker in key), None)
        if kind is not None:
            unsupported.setdefault(kind, []).append(key)
            continue
        m_alpha = _ALPHA_RE.match(key)
        if m_alpha:
            alphas[m_alpha.group("mod")] = (key, _scalar(tensor, key))
            continue
        for pattern, style in _PATTERNS:
            m = pattern.match(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        mod = m.group("mod")
        proc = m.groupdict().get("proc")
        raw = f"{mod}.{proc}_lora" if proc else mod  # the key every tensor of this pair shares
        entry = pairs.setdefault(raw, {"style": style, "alpha_keys": [raw]})
        if style == "kohya" and _kohya_component(mod) is not None:
            entry.update(component=_kohya_component(mod), naming="kohya", target=mod)
        else:
            comp, path = _split_component(mod)
            if proc:
                path = path.removesuffix(".processor")
                is_te = comp != "unet" or path.endswith("self_attn")
                path = f"{path}.{(_OLD_PROC_TARGET_TE if is_te else _OLD_PROC_TARGET)[proc]}"
            entry.update(component=comp, naming="path", target=path)
            if proc:
                entry["alpha_keys"].append(mod.removesuffix(".processor") + f".{proc}")
        side = "down" if m.group("ab") in _DOWN else "up"
        if side in entry:
            raise LoRAError(f"LoRA {source}: module {raw!r} has two {side} tensors (second: {key!r})")
        entry[side] = (key, tensor)

    if unsupported:
        parts = "; ".join(f"{kind}: {_listing(keys)}" for kind, keys in unsupported.items())
        raise LoRAError(f"LoRA {source}: unsupported LoRA variant keys ({parts})")
    if unknown:
        raise LoRAError(f"LoRA {source}: {len(unknown)} keys of an unknown format: {_listing(unknown)}")

    modules: list[LoRAModule] = []
    used_alphas: set[str] = set()
    styles: set[str] = set()
    for raw, entry in pairs.items():
        for side in ("down", "up"):
            if side not in entry:
                other = entry["up" if side == "down" else "down"][0]
                raise LoRAError(f"LoRA {source}: module {raw!r} has no {side} tensor (found only {other!r})")
        (down_key, down), (up_key, up) = entry["down"], entry["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
            raise LoRAError(
                f"LoRA {source}: module {raw!r} has inconsistent shapes {down_key!r} {tuple(down.shape)} and "
                f"{up_key!r} {tuple(up.shape)} (expected down (r, in[, kh, kw]) and up (out, r[, 1, 1]))"
            )
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoRAError(f"LoRA {source}: {up_key!r} has shape {tuple(up.shape)}; only 1x1 up convs are supported")
        rank = int(down.shape[0])
        alpha_key = next((k for k in entry["alpha_keys"] if k in alphas), None)
        if alpha_key is not None:
            used_alphas.add(alpha_key)
            alpha = alphas[alpha_key][1]
        else:
            alpha = _metadata_alpha(config, entry["component"], entry["target"], rank)
        if alpha == 0.0:  # kohya: alpha None or 0 means alpha = rank
            alpha = float(rank)
        styles.add(entry["style"])
        modules.append(
            LoRAModule(raw, entry["component"], entry["naming"], entry["target"], down, up, float(alpha))
        )
    orphans = [alphas[k][0] for k in alphas if k not in used_alphas]
    if orphans:
        raise LoRAError(f"LoRA {source}: {len(orphans)} alpha keys belong to no LoRA module: {_listing(orphans)}")
    if not modules:
        raise LoRAError(f"LoRA {source}: no LoRA weight pairs found")
    return LoRA(tuple(modules), "+".join(sorted(styles)), source)


def _metadata_alpha(config: Mapping, component: str, path: str, rank: int) -> float:
    """Alpha from diffusers' packed LoraConfig metadata (``<component>.lora_alpha`` etc.); alpha = rank without it."""
    if not config or f"{component}.lora_alpha" not in config:
        return float(rank)
    if config.get(f"{component}.use_dora"):
        raise LoRAError(f"LoRA metadata says {component!r} uses DoRA, which is not supported")
    alpha = _peft_pattern_value(config.get(f"{component}.alpha_pattern") or {}, path)
    if alpha is None:
        alpha = float(config[f"{component}.lora_alpha"])
    if config.get(f"{component}.use_rslora"):  # scaling alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha = alpha * math.sqrt(rank)
    return alpha


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoRA:
    """Load a LoRA from a ``.safetensors`` file (or take a state dict) and normalize it (see module docstring).

    Tensors stay on the CPU in the file's dtype; ``attach_lora`` casts them to each base weight's dtype/device.
    """
    if isinstance(path_or_state_dict, Mapping):
        return parse_lora_state_dict(path_or_state_dict)
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA file {path} is not a .safetensors file (pickled checkpoints are not loaded)")
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    return parse_lora_state_dict(state_dict, metadata, source=path)
