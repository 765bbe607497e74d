"""Prefix-table key maps shared by the UNet and VAE conversions.

A map is a list of ``BlockRule``: a block prefix in the original (SGM/LDM) checkpoint, the matching prefix in
diffusers naming, and the renames of the names inside that block (``None``: the inner names are identical). Keys
are matched on whole dotted components (``input_blocks.1.`` never matches ``input_blocks.10.``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["Rename", "BlockRule", "PrefixKeyMap"]


@dataclass(frozen=True)
class Rename:
    """Inner name ``src`` (original) <-> ``dst`` (diffusers); ``squeeze_1x1`` marks 1x1-conv vs Linear weights."""

    src: str
    dst: str
    squeeze_1x1: bool = False


@dataclass(frozen=True)
class BlockRule:
    """Block prefix ``src`` (original) <-> ``dst`` (diffusers), both ending in ``.``."""

    src: str
    dst: str
    renames: tuple[Rename, ...] | None = None


class PrefixKeyMap:
    """Bijective key map built from ``BlockRule``s; ``forward`` is original -> diffusers."""

    def __init__(self, rules: Iterable[BlockRule]) -> None:
        self.rules = list(rules)
        self._by_src = {r.src: r for r in self.rules}
        self._by_dst = {r.dst: r for r in self.rules}
        if len(self._by_src) != len(self.rules) or len(self._by_dst) != len(self.rules):
            raise AssertionError("duplicate block prefixes in a key map")

    @staticmethod
    def _find(key: str, table: dict[str, BlockRule]) -> tuple[BlockRule, str] | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):  # longest block prefix first
            prefix = ".".join(parts[:n]) + "."
            if prefix in table:
                return table[prefix], key[len(prefix) :]
        return None

    def _translate(self, key: str, reverse: bool) -> tuple[str, bool] | None:
        """Map ``key`` through the longest matching block rule, original -> diffusers or (``reverse``) back."""
        found = self._find(key, self._by_dst if reverse else self._by_src)
        if found is None:
            return None
        rule, rest = found
        src, dst = (rule.dst, rule.src) if reverse else (rule.src, rule.dst)
        if rule.renames is None:
            return dst + rest, False
        for r in rule.renames:
            r_src, r_dst = (r.dst, r.src) if reverse else (r.src, r.dst)
            if rest.startswith(r_src):
                return dst + r_dst + rest[len(r_src) :], r.squeeze_1x1
        return None

    def forward(self, key: str) -> tuple[str, bool] | None:
        """Original key -> ``(diffusers key, squeeze_1x1)``, or ``None`` when no rule places it."""
        return self._translate(key, reverse=False)

    def inverse(self, key: str) -> tuple[str, bool] | None:
        """Diffusers key -> ``(original key, squeeze_1x1)``, or ``None``."""
        return self._translate(key, reverse=True)
        rule, rest = found
        if rule.renames is None:
            return rule.src + rest, False
        for r in rule.renames:
            if rest.startswith(r.dst):
                return rule.src + r.src + rest[len(r.dst) :], r.squeeze_1x1
        return None
