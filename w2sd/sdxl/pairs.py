"""Weak-to-strong model pairs for SDXL, as data (W2SD paper, Sec. 4 and Table "kinds of difference").

A :class:`Member` says how one denoiser differs from the main step's denoiser: which loaded model, which LoRA
scale, which CFG scale, which prompt. Fields left ``None`` inherit the main step's setting, so a pair only names
what it changes, and pairs of different kinds combine field by field (the paper's cumulative setting):

    lora_pair(1.5, -1.5, strong_guidance=5.5, weak_guidance=1.0)   # the published demo
    full_model_pair()                                               # e.g. Juggernaut-XL vs SDXL (--weak_model)
    guidance_pair(5.5, 0.0)                                         # = Z-Sampling
    prompt_pair(refined="...", raw="...")
    combine(full_model_pair(), guidance_pair(5.5, 0.0))             # cumulative: the paper's 90% win rate

:func:`resolve` turns a member into a concrete :class:`Setting` against the main setting; the pipeline
(``w2sd.sdxl.pipeline``) builds one denoiser per distinct setting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = [
    "Member", "Pair", "Setting", "lora_pair", "full_model_pair", "guidance_pair", "prompt_pair", "combine",
    "resolve", "OFF", "MAIN_MODEL", "WEAK_MODEL",
]

MAIN_MODEL = "main"
WEAK_MODEL = "weak"
OFF = 0.0  # LoRA scale meaning "LoRA disabled" (the branch is skipped, the base model runs)


@dataclass(frozen=True)
class Member:
    """One side of a pair; ``None`` fields inherit the main step's value."""

    model: str | None = None            # "main" or "weak": which loaded checkpoint
    lora_scale: float | None = None     # LoRA scale (0 = LoRA off)
    guidance_scale: float | None = None  # CFG scale (1 = conditional only, 0 = unconditional only)
    prompt: str | None = None           # prompt (the negative prompt is the run's)

    def __post_init__(self) -> None:
        for name in ("lora_scale", "guidance_scale"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        if self.model not in (None, MAIN_MODEL, WEAK_MODEL):
            raise ValueError(f"model must be {MAIN_MODEL!r} or {WEAK_MODEL!r}, got {self.model!r}")


@dataclass(frozen=True)
class Pair:
    """A weak-to-strong pair: the strong member denoises, the weak member inverts (Algorithm 1)."""

    strong: Member
    weak: Member
    kind: str = "custom"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "strong": asdict(self.strong), "weak": asdict(self.weak)}


@dataclass(frozen=True)
class Setting:
    """A fully specified denoiser: model, LoRA scale (None = no LoRA loaded), CFG scale, prompt."""

    model: str
    lora_scale: float | None
    guidance_scale: float
    prompt: str

    def as_dict(self) -> dict:
        return asdict(self)


def lora_pair(strong_scale: float = 1.5, weak_scale: float = -1.5, *, strong_guidance: float | None = None,
              weak_guidance: float | None = None) -> Pair:
    """One model with one LoRA at two scales (the published demo: +1.5 / CFG 5.5 vs -1.5 / CFG 1.0; the
    paper's LoRA table: +0.8 vs -1.5, CFG 1.0 for both)."""
    return Pair(Member(lora_scale=strong_scale, guidance_scale=strong_guidance),
                Member(lora_scale=weak_scale, guidance_scale=weak_guidance), kind="lora")


def full_model_pair(*, strong_guidance: float | None = None, weak_guidance: float | None = None) -> Pair:
    """Two checkpoints: the main model is strong, the ``weak`` model (``--weak_model``) weak, LoRA off there."""
    return Pair(Member(model=MAIN_MODEL, guidance_scale=strong_guidance),
                Member(model=WEAK_MODEL, lora_scale=OFF, guidance_scale=weak_guidance), kind="full_model")


def guidance_pair(strong_guidance: float = 5.5, weak_guidance: float = 0.0) -> Pair:
    """CFG difference (= Z-Sampling): strong CFG s vs weak CFG 0 (the unconditional model)."""
    return Pair(Member(guidance_scale=strong_guidance), Member(guidance_scale=weak_guidance), kind="guidance")


def prompt_pair(refined: str | None = None, raw: str | None = None) -> Pair:
    """Prompt-semantics difference: the strong member sees the refined prompt, the weak one the raw prompt
    (``None`` = the run's prompt)."""
    if refined is None and raw is None:
        raise ValueError("prompt_pair needs a refined (strong) or a raw (weak) prompt")
    return Pair(Member(prompt=refined), Member(prompt=raw), kind="prompt")


def _merge(a: Member, b: Member, side: str) -> Member:
    values = {}
    for f in fields(Member):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va is not None and vb is not None and va != vb:
            raise ValueError(f"cannot combine pairs: the {side} member's {f.name} is {va!r} in one and {vb!r} "
                             "in the other")
        values[f.name] = va if va is not None else vb
    return Member(**values)


def combine(*pairs: Pair) -> Pair:
    """Combine differences of several kinds into one pair (the paper's cumulative setting); a field set by two
    pairs to different values is an error."""
    if not pairs:
        raise ValueError("combine needs at least one pair")
    strong, weak = pairs[0].strong, pairs[0].weak
    for p in pairs[1:]:
        strong, weak = _merge(strong, p.strong, "strong"), _merge(weak, p.weak, "weak")
    return Pair(strong, weak, kind="+".join(p.kind for p in pairs))


def resolve(member: Member, main: Setting) -> Setting:
    """The concrete setting of ``member``: its own fields, the main setting's where it says ``None``.

    ``main.lora_scale is None`` means no LoRA is loaded; then every member's LoRA scale is None too. The LoRA is
    attached to the main checkpoint only, so a member on the weak checkpoint runs without it (scale 0).
    """
    model = member.model or main.model
    if main.lora_scale is None:
        if member.lora_scale not in (None, OFF):
            raise ValueError(f"a LoRA scale ({member.lora_scale}) is set but no LoRA is loaded (--lora_path)")
        lora = None
    elif model != MAIN_MODEL:
        if member.lora_scale not in (None, OFF):
            raise ValueError(f"the LoRA is attached to the {MAIN_MODEL!r} model only; the {model!r} member asks "
                             f"for LoRA scale {member.lora_scale}")
        lora = OFF
    else:
        lora = float(member.lora_scale if member.lora_scale is not None else
                     (main.lora_scale if main.model == MAIN_MODEL else OFF))
    return Setting(
        model=model,
        lora_scale=lora,
        guidance_scale=float(member.guidance_scale if member.guidance_scale is not None else main.guidance_scale),
        prompt=member.prompt if member.prompt is not None else main.prompt,
    )
