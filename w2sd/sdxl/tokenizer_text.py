"""Text cleanup, added-token splitting and pre-tokenization for the CLIP BPE tokenizer.

Parity target: transformers 5.x ``CLIPTokenizer`` (tokenizers-backed), which diffusers' SDXL pipeline uses. Its
pipeline, re-implemented here with the standard library only (no ``regex``, no ``ftfy``):

1. Added tokens (``<|startoftext|>``, ``<|endoftext|>``, SDXL tokenizer_2's ``!``) are cut out of the text first:
   tokens with ``normalized=False`` are matched on the raw text, the others on each remaining piece after
   normalization (leftmost, longest match).
2. Normalizer: NFC, every run of Unicode ``White_Space`` becomes one ``" "``, then a character-by-character
   lowercase (no Greek final-sigma rule, unlike ``str.lower``). No ftfy, no ``html.unescape``, no strip.
3. Pre-tokenizer: the CLIP split
   ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (whitespace between matches is dropped), followed by the byte-level pre-tokenizer's GPT-2 split. The latter only
   changes a literal special-token piece, which becomes ``"<|"``, the letters and ``"|>"``.
4. Every piece is UTF-8 encoded and each byte mapped to a printable character (``BYTE_TO_UNICODE``); BPE runs on
   that string.

Python's ``re`` has no ``\\p{L}`` / ``\\p{N}``, so the split is a hand-written scanner over
``unicodedata.category``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "AddedToken",
    "BYTE_TO_UNICODE",
    "UNICODE_TO_BYTE",
    "SPECIAL_LITERALS",
    "bytes_to_unicode",
    "normalize",
    "pre_tokenize",
    "split_added_tokens",
]


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable character (OpenAI CLIP / GPT-2 byte-level table).

    The printable bytes ``!``..``~``, ``¡``..``¬`` and ``®``..``ÿ`` map to themselves; the remaining 68 bytes map to
    ``chr(256 + n)`` in increasing byte order. Dict order: the printable bytes first, then the others, which is the
    order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}

# Literal special tokens that the CLIP split regex keeps as one piece (then re-split by the GPT-2 regex).
SPECIAL_LITERALS: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS: tuple[str, ...] = ("s", "t", "re", "ve", "m", "ll", "d")  # after "'", in regex alternation order

# Unicode White_Space property (what Oniguruma's ``\s`` and Rust's ``char::is_whitespace`` match). Python's
# ``str.isspace`` also accepts U+001C..U+001F, which the reference keeps as ordinary symbols.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITE_SPACE_SET = frozenset(_WHITE_SPACE)
_WHITE_SPACE_RUN = re.compile("[" + re.escape(_WHITE_SPACE) + "]+")

# Character classes used by the scanner.
_LETTER, _NUMBER, _SPACE, _OTHER = 0, 1, 2, 3

# Characters that Python 3.11's unicodedata (Unicode 14.0) calls unassigned (Cn) but the reference's Unicode tables
# (tokenizers 0.23: Oniguruma for \p{L}/\p{N}, Rust std for lowercase) know. Found by running every code point
# through tokenizers 0.23.3 and through this module. Consulted only for Cn characters, so a newer Python's own
# tables take precedence.
_LATER_LETTERS: tuple[tuple[int, int], ...] = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_LATER_NUMBERS: tuple[tuple[int, int], ...] = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
_LATER_LOWER: dict[int, int] = {
    0x1C89: 0x1C8A, 0xA7CB: 0x264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3, 0xA7D4: 0xA7D5,
    0xA7DA: 0xA7DB, 0xA7DC: 0x19B,
    **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},
    **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)},
}
# The part of the map this Python lacks (empty once its unicodedata covers Unicode 16).
_LATER_LOWER_TABLE: dict[int, int] = {c: m for c, m in _LATER_LOWER.items() if unicodedata.category(chr(c)) == "Cn"}
_LATER_LOWER_FIRST = chr(min(_LATER_LOWER_TABLE, default=0x10FFFF))


def _in_ranges(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


@lru_cache(maxsize=65536)
def _char_class(ch: str) -> int:
    """Return the scanner class of one character: letter (\\p{L}), number (\\p{N}), whitespace or other."""
    if ch in _WHITE_SPACE_SET:
        return _SPACE
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return _LETTER
    if cat[0] == "N":
        return _NUMBER
    if cat == "Cn":
        if _in_ranges(ord(ch), _LATER_LETTERS):
            return _LETTER
        if _in_ranges(ord(ch), _LATER_NUMBERS):
            return _NUMBER
    return _OTHER


def _lowercase(text: str) -> str:
    """Lowercase character by character (full Unicode mappings, no context rules).

    ``str.lower`` applies the Greek final-sigma rule to U+03A3; the reference maps each character on its own, so
    the per-character path is taken only when U+03A3 occurs.
    """
    lowered = text.lower() if "\u03a3" not in text else "".join([c.lower() for c in text])
    if _LATER_LOWER_TABLE and lowered and max(lowered) >= _LATER_LOWER_FIRST:
        lowered = lowered.translate(_LATER_LOWER_TABLE)
    return lowered


def normalize(text: str) -> str:
    """NFC, collapse each run of Unicode whitespace to a single space, lowercase per character. No strip."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITE_SPACE_RUN.sub(" ", text)
    return _lowercase(text)


def pre_tokenize(text: str) -> list[str]:
    """Split normalized text into the pieces BPE runs on (CLIP regex, then the GPT-2 re-split of special literals).

    Equivalent to ``regex.findall(CLIP_PATTERN, text)`` where each literal ``<|startoftext|>`` / ``<|endoftext|>``
    match is further cut into ``"<|"``, the letters, ``"|>"``.
    """
    pieces: list[str] = []
    n = len(text)
    i = 0
    cls = _char_class
    while i < n:
        ch = text[i]
        if ch == "<" and text.startswith(SPECIAL_LITERALS, i):
            word = SPECIAL_LITERALS[0] if text.startswith(SPECIAL_LITERALS[0], i) else SPECIAL_LITERALS[1]
            pieces.extend(("<|", word[2:-2], "|>"))
            i += len(word)
            continue
        if ch == "'":
            suffix = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if suffix is not None:  # 's 't 're 've 'm 'll 'd, even inside a word ("'dog" -> "'d", "og")
                pieces.append("'" + suffix)
                i += 1 + len(suffix)
                continue
        kind = cls(ch)
        if kind == _SPACE:
            i += 1
            continue
        if kind == _NUMBER:  # digits come out one per piece
            pieces.append(ch)
            i += 1
            continue
        j = i + 1
        if kind == _LETTER:
            while j < n and cls(text[j]) == _LETTER:
                j += 1
        else:  # [^\s\p{L}\p{N}]+
            while j < n and cls(text[j]) == _OTHER:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


@dataclass(frozen=True)
class AddedToken:
    """A token cut out of the text before BPE (transformers / tokenizers ``AddedToken``).

    Attributes:
        content: the literal text.
        id: its vocabulary id.
        normalized: match on the normalized text (True) or the raw text (False).
        lstrip / rstrip: the match also swallows whitespace on its left / right.
        special: a special token (bos, eos, pad, unk, ...); affects decoding only.
    """

    content: str
    id: int
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    special: bool = True


def _matcher(tokens: list[tuple[str, AddedToken]]) -> re.Pattern[str] | None:
    """Compile a leftmost-longest matcher for ``(text to match, token)`` pairs sorted longest first."""
    if not tokens:
        return None
    ws = "[" + re.escape(_WHITE_SPACE) + "]*"
    alts = []
    for text, tok in tokens:
        alts.append(
            ("(?:" + ws + ")" if tok.lstrip else "")
            + "(" + re.escape(text) + ")"
            + ("(?:" + ws + ")" if tok.rstrip else "")
        )
    return re.compile("|".join(alts))


class AddedTokenSplitter:
    """Cut added tokens out of raw text and normalize the rest, as tokenizers' ``AddedVocabulary`` does."""

    def __init__(self, tokens: list[AddedToken]):
        self.tokens = list(tokens)
        # Normalized tokens are matched in their normalized form ("DOG  HOUSE" matches "dog house").
        raw = [(t.content, t) for t in self.tokens if not t.normalized and t.content]
        norm = [(normalize(t.content), t) for t in self.tokens if t.normalized and t.content]
        raw.sort(key=lambda p: len(p[0]), reverse=True)
        norm.sort(key=lambda p: len(p[0]), reverse=True)
        # Group index (1-based) -> token id, in the order used by _matcher.
        self._raw_ids = [t.id for _, t in raw]
        self._norm_ids = [t.id for _, t in norm]
        self._raw = _matcher(raw)
        self._norm = _matcher([p for p in norm if p[0]])
        self._norm_ids = [t.id for text, t in norm if text]

    @staticmethod
    def _split(text: str, pattern: re.Pattern[str] | None, ids: list[int]) -> list[str | int]:
        if pattern is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.end() == m.start():
                continue
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(ids[m.lastindex - 1])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def __call__(self, text: str) -> list[str | int]:
        """Return normalized text pieces (str) and added-token ids (int), in order."""
        out: list[str | int] = []
        for part in self._split(text, self._raw, self._raw_ids):
            if isinstance(part, int):
                out.append(part)
            else:
                out.extend(self._split(normalize(part), self._norm, self._norm_ids))
        return out


def split_added_tokens(text: str, tokens: list[AddedToken]) -> list[str | int]:
    """One-shot form of :class:`AddedTokenSplitter` (normalized text pieces and added-token ids, in order)."""
    return AddedTokenSplitter(tokens)(text)
