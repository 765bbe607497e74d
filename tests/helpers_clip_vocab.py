"""Test helper: the real CLIP BPE vocabulary and reference tokenizers, built offline from the BPE merges file.

The vocab follows openai/CLIP ``simple_tokenizer.py`` (research note sdxl.md §4.1): 256 byte-chars, the same with
``</w>``, one token per merge for merges[1 : 49152-256-2+1], then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407). transformers' ``CLIPTokenizer(vocab=..., merges=...)`` built from it is the reference
tokenizer of the diffusers SDXL pipeline (``tokenizer`` pads with ``<|endoftext|>``, ``tokenizer_2`` with ``!``).
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clip_bpe" / BPE_FILE_NAME,
    Path("/work/shared/data/clip_bpe") / BPE_FILE_NAME,
    Path(__file__).resolve().parents[1] / "w2sd" / "sdxl" / BPE_FILE_NAME,
)
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges after the header line
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bpe_path() -> Path:
    """Path of the gzipped BPE merges file (shared data dir, else the copy shipped in w2sd/sdxl)."""
    for p in _CANDIDATES:
        if p.is_file():
            return p
    raise FileNotFoundError(f"{BPE_FILE_NAME} not found in any of: {', '.join(map(str, _CANDIDATES))}")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> visible unicode char table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab token -> id with 49408 entries, merges as pairs in rank order)."""
    lines = gzip.open(bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header) into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def hf_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """transformers ``CLIPTokenizer`` on the real vocab; ``pad_token="!"`` gives SDXL's ``tokenizer_2``."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)


class HFTokenizerCallable:
    """Wrap a transformers tokenizer in the ``tok(list_of_prompts) -> LongTensor (B, 77)`` interface of w2sd."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, prompts: list[str]):
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
