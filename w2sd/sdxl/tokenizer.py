"""CLIP byte-level BPE tokenizer for SDXL's two text encoders, without transformers at run time.

Parity target: transformers 5.x ``CLIPTokenizer`` as diffusers' SDXL pipeline calls it
(``padding="max_length", max_length=77, truncation=True``). See ``docs/research/sdxl.md`` section 4 and
:mod:`w2sd.sdxl.tokenizer_text` for the text pipeline. Sources of the vocabulary:

- a diffusers ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``added_tokens.json``), or a folder with ``tokenizer.json``;
- the OpenAI CLIP BPE file shipped with this package (``bpe_simple_vocab_16e6.txt.gz``), for single-file
  checkpoints that carry no tokenizer.

SDXL's tokenizer 1 pads with ``<|endoftext|>`` (49407); tokenizer_2 pads with ``!`` (id 0) and, because ``!`` is
then a registered added token, turns every ``!`` in a prompt into id 0.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from importlib import resources
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from w2sd.errors import CheckpointError
from w2sd.sdxl.tokenizer_text import (
    BYTE_TO_UNICODE,
    UNICODE_TO_BYTE,
    AddedToken,
    AddedTokenSplitter,
    pre_tokenize,
)

__all__ = ["CLIPTokenizer", "TokenBatch", "BUNDLED_VOCAB", "CLIP_MAX_LENGTH", "load_bundled_vocab"]

BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77  # CLIP text encoders have 77 position embeddings
CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894 merges are used (openai/CLIP simple_tokenizer.py)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_UNSET_MAX_LENGTH = 10**6  # transformers writes 1e30 for "no limit"; anything above this means unset
_END_OF_WORD = "</w>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_SPECIAL_DEFAULTS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
_CACHE_LIMIT = 200_000


class TokenBatch(NamedTuple):
    """Result of :meth:`CLIPTokenizer.encode_batch`.

    Attributes:
        input_ids: ``(B, max_length)`` int64, ``[bos] + tokens + [eos] + [pad]*``.
        eos_positions: ``(B,)`` int64, index of the eos token that ends each prompt (where CLIP pools).
        num_truncated: per prompt, how many tokens were dropped to fit ``max_length``.
    """

    input_ids: torch.Tensor
    eos_positions: torch.Tensor
    num_truncated: list[int]


def _read_json(path: str) -> Any:
    """Read a JSON file; a malformed file raises CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from e


def _read_json_object(path: str) -> dict[str, Any]:
    """Read a JSON file that must hold an object."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_merges(items: Iterable[tuple[Any, str]]) -> list[tuple[str, str]]:
    """Merges from ``(item, where)`` pairs; an item is a ``"a b"`` line or an ``["a", "b"]`` pair."""
    merges = []
    for item, where in items:
        if type(item) is str:
            a, sep, b = item.partition(" ")
            if sep and a and b and " " not in b:
                merges.append((a, b))
                continue
        elif type(item) in (list, tuple) and len(item) == 2:
            a, b = item
            if type(a) is str and type(b) is str and a and b:
                merges.append((a, b))
                continue
        raise CheckpointError(f"{where}: a merge must be two symbols separated by one space, got {item!r}")
    return merges


def _read_merges_txt(path: str) -> list[tuple[str, str]]:
    """Read ``merges.txt``: ``#version`` header lines and blank lines skipped, one ``a b`` pair per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from e
    return _parse_merges(
        (line, f"{path} line {n}") for n, line in enumerate(lines, start=1) if line and not line.startswith("#version")
    )


def _token_entry(value: Any) -> tuple[str | None, dict[str, bool]]:
    """A special token as written in config files: a string or an AddedToken dict. Returns (content, flags)."""
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("normalized", "lstrip", "rstrip", "single_word") if k in value}
        return value["content"], flags
    raise CheckpointError(f"special token entry must be a string or a dict with 'content', got {value!r}")


def load_bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from the OpenAI CLIP BPE file shipped with the package (section 4.1 of sdxl.md).

    Vocab order: the 256 byte characters, the same with ``</w>``, the first 48,894 merges joined, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    ref = resources.files("w2sd.sdxl").joinpath(BUNDLED_VOCAB)
    try:
        with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as e:
        raise CheckpointError(f"bundled BPE vocabulary w2sd/sdxl/{BUNDLED_VOCAB} is missing or corrupt ({e})") from e
    # Line 0 is a header; the file holds far more merges than CLIP uses.
    merges = _parse_merges((line, f"{BUNDLED_VOCAB} line {i + 2}") for i, line in enumerate(lines[1 : CLIP_NUM_MERGES + 1]))
    chars = list(BYTE_TO_UNICODE.values())
    tokens = chars + [c + _END_OF_WORD for c in chars] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer (transformers ``CLIPTokenizer`` parity).

    Calling it on a prompt or a list of prompts returns ``(B, model_max_length)`` int64 ids:
    ``[bos] + tokens + [eos]`` padded with ``pad_token_id``; longer prompts keep bos, the first
    ``model_max_length - 2`` tokens and eos, and a warning says how many tokens were dropped.

    Args:
        vocab: token -> id.
        merges: BPE merges, highest priority first.
        bos_token / eos_token / unk_token / pad_token: the special tokens (each in ``vocab`` or ``added_tokens``).
        added_tokens: tokens cut out of the text before BPE. bos, eos, unk and pad are added (raw-text match)
            when missing, as transformers does.
        model_max_length: padded length (77 for CLIP).
        source: where the vocabulary came from, for error messages.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        added_tokens: Iterable[AddedToken] = (),
        model_max_length: int = CLIP_MAX_LENGTH,
        source: str = "vocab",
    ):
        self.source = source
        self.encoder: dict[str, int] = dict(vocab)
        if len(set(self.encoder.values())) != len(self.encoder):
            raise CheckpointError(f"{source}: vocabulary maps several tokens to the same id")
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            if a + b not in self.encoder:
                raise CheckpointError(f"{source}: merge {a!r} {b!r} (rank {rank}) gives {a + b!r}, not in the vocabulary")
            self.bpe_ranks.setdefault((a, b), rank)
        if int(model_max_length) < 2:
            raise ValueError(f"model_max_length must be >= 2 (room for bos and eos), got {model_max_length}")
        self.model_max_length = int(model_max_length)

        names = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        added = {t.content: t for t in added_tokens}
        for field, content in names.items():
            if content not in self.encoder and content not in added:
                raise CheckpointError(f"{source}: {field}_token {content!r} is not in the vocabulary")
            if content not in added:
                added[content] = AddedToken(content, self.encoder[content], normalized=False, special=True)
        for tok in added.values():
            known = self.encoder.get(tok.content)
            if known is not None and known != tok.id:
                raise CheckpointError(
                    f"{source}: added token {tok.content!r} has id {tok.id} but the vocabulary says {known}"
                )
            self.encoder.setdefault(tok.content, tok.id)
            self.decoder.setdefault(tok.id, tok.content)
        self.added_tokens: list[AddedToken] = sorted(added.values(), key=lambda t: t.id)
        self._splitter = AddedTokenSplitter(self.added_tokens)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id = self.encoder[bos_token]
        self.eos_token_id = self.encoder[eos_token]
        self.unk_token_id = self.encoder[unk_token]
        self.pad_token_id = self.encoder[pad_token]
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundled(cls, pad_token: str = EOS_TOKEN, max_length: int = CLIP_MAX_LENGTH) -> "CLIPTokenizer":
        """Tokenizer from the BPE file shipped with w2sd (for single-file checkpoints).

        ``pad_token="<|endoftext|>"`` gives SDXL's tokenizer 1, ``pad_token="!"`` tokenizer_2. The added-token
        flags follow the SDXL diffusers folders (``<|startoftext|>`` matched after normalization, the others on the
        raw text), so the result equals :meth:`from_folder` on those folders.
        """
        vocab, merges = load_bundled_vocab()
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not in the bundled CLIP vocabulary")
        added = [
            AddedToken(BOS_TOKEN, vocab[BOS_TOKEN], normalized=True, special=False),
            AddedToken(EOS_TOKEN, vocab[EOS_TOKEN], normalized=False, special=False),
        ]
        if pad_token not in (BOS_TOKEN, EOS_TOKEN):
            added.append(AddedToken(pad_token, vocab[pad_token], normalized=False))
        return cls(
            vocab, merges, pad_token=pad_token, added_tokens=added, model_max_length=max_length,
            source=f"w2sd/sdxl/{BUNDLED_VOCAB}",
        )

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, *, pad_token: str | None = None, max_length: int | None = None
    ) -> "CLIPTokenizer":
        """Tokenizer from a transformers/diffusers tokenizer folder.

        Reads ``tokenizer.json`` when present, else ``vocab.json`` + ``merges.txt``; then, as transformers 5 does,
        ``tokenizer_config.json`` (special tokens, ``model_max_length``, ``added_tokens_decoder``) and, only when
        that has no ``added_tokens_decoder``, the legacy ``special_tokens_map.json`` and ``added_tokens.json``.
        Without config files the pad token is ``<|endoftext|>`` (``tokenizer.json``'s padding entry is ignored, as in
        transformers). ``pad_token`` and ``max_length`` override the files; a missing or "unlimited"
        ``model_max_length`` (transformers writes 1e30) means 77.
        """
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
        p = lambda name: os.path.join(folder, name)  # noqa: E731
        added: dict[int, AddedToken] = {}
        if os.path.isfile(p("tokenizer.json")):
            source = p("tokenizer.json")
            vocab, merges, added = _read_tokenizer_json(source)
        elif os.path.isfile(p("vocab.json")) or os.path.isfile(p("merges.txt")):
            for name in ("vocab.json", "merges.txt"):
                if not os.path.isfile(p(name)):
                    raise CheckpointError(f"{p(name)} is missing (needed next to the other of vocab.json/merges.txt)")
            source = p("vocab.json")
            vocab = _read_json(source)
            if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
                raise CheckpointError(f"{source}: expected a JSON object token -> integer id")
            merges = _read_merges_txt(p("merges.txt"))
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json and no vocab.json + merges.txt")

        config: dict[str, Any] = {}
        if os.path.isfile(p("tokenizer_config.json")):
            config = _read_json_object(p("tokenizer_config.json"))
        special: dict[str, Any] = {k: config.get(k) for k in _SPECIAL_KEYS}
        decoder = config.get("added_tokens_decoder")
        if decoder is not None:
            # transformers 5: with an added_tokens_decoder the config is authoritative; special_tokens_map.json and
            # added_tokens.json are not read.
            if not isinstance(decoder, dict):
                raise CheckpointError(f"{p('tokenizer_config.json')}: added_tokens_decoder must be an object")
            for idx, entry in decoder.items():
                try:
                    i = int(idx)
                except ValueError:
                    raise CheckpointError(f"{p('tokenizer_config.json')}: added token id {idx!r} is not an integer") from None
                added[i] = _added_token_from_dict(entry, i, p("tokenizer_config.json"))
        else:
            # Legacy layout: special_tokens_map.json overrides the config; added_tokens.json lists extra tokens,
            # normalized unless they are special (tokenizer.json's added tokens win on the same id).
            if os.path.isfile(p("special_tokens_map.json")):
                smap = _read_json_object(p("special_tokens_map.json"))
                special.update({k: smap[k] for k in _SPECIAL_KEYS if smap.get(k) is not None})
            if os.path.isfile(p("added_tokens.json")):
                extra = _read_json_object(p("added_tokens.json"))
                special_contents = {_token_entry(v)[0] for v in special.values() if v is not None}
                if pad_token is not None:
                    special_contents.add(pad_token)
                for content, idx in extra.items():
                    if not isinstance(idx, int):
                        raise CheckpointError(f"{p('added_tokens.json')}: id of {content!r} must be an integer")
                    is_special = content in special_contents
                    added.setdefault(idx, AddedToken(content, idx, normalized=not is_special, special=is_special))
        if pad_token is not None:
            special["pad_token"] = pad_token

        # bos/eos/unk/pad that are not added tokens yet become special raw-text added tokens, as in transformers.
        by_content = {t.content: t for t in added.values()}
        names: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content, flags = _token_entry(special[key])
            content = _SPECIAL_DEFAULTS[key] if content is None else content
            names[key] = content
            if content in by_content:
                continue
            if content not in vocab:
                raise CheckpointError(f"{folder}: {key} {content!r} is not in the vocabulary")
            by_content[content] = AddedToken(
                content, vocab[content], normalized=flags.get("normalized", False),
                lstrip=flags.get("lstrip", False), rstrip=flags.get("rstrip", False),
            )
        if max_length is None:
            configured = config.get("model_max_length")
            max_length = (
                int(configured)
                if isinstance(configured, (int, float)) and 2 <= configured <= _UNSET_MAX_LENGTH
                else CLIP_MAX_LENGTH
            )
        return cls(
            vocab, merges, added_tokens=by_content.values(), model_max_length=max_length, source=source, **names
        )

    # ------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids (vocabulary plus added tokens)."""
        return len(self.decoder)

    def _bpe(self, piece: str) -> list[int]:
        """BPE ids of one pre-tokenized piece (cached)."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        chars = "".join([BYTE_TO_UNICODE[b] for b in piece.encode("utf-8")])
        word = list(chars[:-1]) + [chars[-1] + _END_OF_WORD]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = None
            best_rank = None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:  # merge every occurrence, left to right
                if i < n - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        enc = self.encoder
        ids = [enc.get(sym, self.unk_token_id) for sym in word]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for part in self._splitter(text):
            if isinstance(part, int):
                ids.append(part)
                continue
            for piece in pre_tokenize(part):
                ids.extend(self._bpe(piece))
        return ids

    def encode_batch(self, prompts: str | Sequence[str], *, warn: bool = True) -> TokenBatch:
        """Encode, add bos/eos, truncate and pad to ``model_max_length``; also return the eos positions.

        A prompt longer than ``model_max_length - 2`` tokens keeps its first tokens; a ``UserWarning`` (when
        ``warn``) names the prompt, the number of dropped tokens and the dropped text.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        L = self.model_max_length
        rows: list[list[int]] = []
        eos_pos: list[int] = []
        dropped_counts: list[int] = []
        for b, prompt in enumerate(prompts):
            toks = self.encode(prompt)
            dropped = toks[L - 2 :]
            toks = toks[: L - 2]
            row = [self.bos_token_id] + toks + [self.eos_token_id]
            eos_pos.append(len(row) - 1)
            rows.append(row + [self.pad_token_id] * (L - len(row)))
            dropped_counts.append(len(dropped))
            if dropped and warn:
                warnings.warn(
                    f"prompt {b} is {len(toks) + len(dropped) + 2} tokens long, CLIP takes {L} (with start/end): "
                    f"{len(dropped)} tokens dropped: {self.decode(dropped)!r}",
                    stacklevel=3,
                )
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), L)  # (B, L)
        return TokenBatch(ids, torch.tensor(eos_pos, dtype=torch.long), dropped_counts)

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, model_max_length)`` int64 ids for one prompt or a list of prompts (see :meth:`encode_batch`)."""
        return self.encode_batch(prompts).input_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (byte-level decode; each end of word becomes a space). For messages and debugging."""
        added = {t.id: t for t in self.added_tokens}
        # like transformers: bos/eos/unk/pad count as special whatever their added-token flag says
        specials = {t.id for t in self.added_tokens if t.special}
        specials |= {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id}
        parts: list[str] = []
        buf: list[str] = []

        def flush() -> None:
            text = "".join(buf).replace(_END_OF_WORD, " ")
            data = b"".join(bytes([UNICODE_TO_BYTE[c]]) if c in UNICODE_TO_BYTE else c.encode() for c in text)
            parts.append(data.decode("utf-8", errors="replace"))
            buf.clear()

        for i in ids:
            i = int(i)
            if i not in self.decoder:
                raise ValueError(f"id {i} is not in the vocabulary")
            tok = added.get(i)
            if tok is None:
                buf.append(self.decoder[i])
            elif not (i in specials and skip_special_tokens):
                flush()
                parts.append(tok.content + " ")
        flush()
        return "".join(parts).strip()

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"pad_token={self.pad_token!r}, source={self.source!r})"
        )


def _added_token_from_dict(entry: Any, idx: int, where: str) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise CheckpointError(f"{where}: added token {idx} must be an object with a 'content' string, got {entry!r}")
    tok = AddedToken(
        entry["content"], idx, normalized=bool(entry.get("normalized", not entry.get("special", False))),
        lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
        special=bool(entry.get("special", False)),
    )
    if entry.get("single_word"):
        raise CheckpointError(f"{where}: added token {entry['content']!r} has single_word=true, which is not supported")
    return tok


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, AddedToken]]:
    """Vocab, merges and added tokens from a tokenizers ``tokenizer.json``.

    Its ``padding`` entry is ignored, as transformers does: the pad token comes from the config files.
    """
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no 'model' object")
    if model.get("type", "BPE") != "BPE":
        raise CheckpointError(f"{path}: model.type is {model.get('type')!r}, expected 'BPE'")
    if model.get("end_of_word_suffix") not in (None, _END_OF_WORD):
        raise CheckpointError(f"{path}: model.end_of_word_suffix is {model.get('end_of_word_suffix')!r}, expected '</w>'")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{path}: model.vocab must be an object token -> integer id")
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise CheckpointError(f"{path}: model.merges must be a list")
    merges = _parse_merges((m, f"{path} model.merges[{i}]") for i, m in enumerate(raw_merges))
    added: dict[int, AddedToken] = {}
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise CheckpointError(f"{path}: added_tokens entry without an integer 'id': {entry!r}")
        added[entry["id"]] = _added_token_from_dict(entry, entry["id"], path)
    return vocab, merges, added
