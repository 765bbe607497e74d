"""w2sd.sdxl.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer (the tokenizer diffusers' SDXL pipeline uses).

Oracle: transformers ``CLIPTokenizer`` (5.x, tokenizers-backed; version printed by ``test_oracle_versions``) built
from the REAL OpenAI CLIP BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``, turned into vocab.json / merges.txt as
in docs/research/sdxl.md section 4.1 by ``tests/helpers_clip_vocab.py``), loaded two ways:

- ``CLIPTokenizer.from_pretrained(folder)`` on folders laid out like SDXL's ``tokenizer/`` and ``tokenizer_2/``
  (``tokenizer_config.json`` with the ``added_tokens_decoder`` of the SDXL diffusers repo; tokenizer_2 pads with
  ``!`` and registers it as an added token);
- ``CLIPTokenizer(vocab=..., merges=..., pad_token=...)`` (the constructor path other tests use).

Token ids are integers, so every comparison is exact (no tolerance). No randomness is involved.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never ask the hub

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_clip_vocab import clip_vocab_and_merges, hf_clip_tokenizer, write_clip_tokenizer_files  # noqa: E402

from w2sd.errors import CheckpointError  # noqa: E402
from w2sd.sdxl.tokenizer import CLIPTokenizer, TokenBatch, load_bundled_vocab  # noqa: E402
from w2sd.sdxl.tokenizer_text import normalize, pre_tokenize  # noqa: E402

import transformers  # noqa: E402  (test extra; a missing oracle must fail, not skip)

MAX_LENGTH = 77  # SDXL tokenizer_config.json model_max_length
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID, BANG_ID = 49406, 49407, 0  # ids in the CLIP vocab (sdxl.md section 4.1)
# ../shared beside the checkout (as in CI), else the workplace's /work/shared
PROMPTS_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts",
                                Path("/work/shared/data/prompts")) if d.is_dir()),
                   Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts")
PAD_VARIANTS = {"tokenizer": EOS, "tokenizer_2": "!"}


def _sdxl_tokenizer_config(pad_token: str) -> dict:
    """tokenizer_config.json as in the SDXL diffusers repo (tokenizer/ and tokenizer_2/ differ only in pad and '!')."""
    decoder = {}
    if pad_token == "!":
        decoder["0"] = {"content": "!", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
    decoder[str(BOS_ID)] = {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False,
                            "single_word": False, "special": False}
    decoder[str(EOS_ID)] = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": False}
    return {
        "add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": [],
        "bos_token": BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOS,
        "errors": "replace", "model_max_length": MAX_LENGTH, "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer", "unk_token": EOS,
    }


def _write_sdxl_folder(folder: Path, pad_token: str) -> Path:
    write_clip_tokenizer_files(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(_sdxl_tokenizer_config(pad_token), indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS})
    )
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl_tokenizers")
    return {name: _write_sdxl_folder(root / name, pad) for name, pad in PAD_VARIANTS.items()}


@pytest.fixture(scope="module")
def refs(folders):
    """transformers tokenizers loaded from the SDXL-like folders."""
    return {name: transformers.CLIPTokenizer.from_pretrained(str(folders[name])) for name in PAD_VARIANTS}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: CLIPTokenizer.from_folder(folders[name]) for name in PAD_VARIANTS}


@pytest.fixture(scope="module")
def bundled():
    return {name: CLIPTokenizer.from_bundled(pad_token=pad) for name, pad in PAD_VARIANTS.items()}


def _ref_ids(ref, prompts: list[str]) -> torch.Tensor:
    """What diffusers' encode_prompt does: pad to max_length, truncate."""
    return ref(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def _corpus() -> list[str]:
    """Every prompt of the shared CSVs: DrawBench 'Prompts', Pick-a-Pic 'caption' and 'caption_zh'."""
    columns = {"drawbench.csv": ["Prompts"], "pick_a_pic_test_unique_captions.csv": ["caption", "caption_zh"]}
    prompts = []
    for name, cols in columns.items():
        with open(PROMPTS_DIR / name, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        for col in cols:
            prompts.extend(row[col] for row in rows)
    return prompts


EDGE_CASES = [
    "", " ", "   \t\n  ", "a photo of an astronaut riding a horse on mars",
    # accents: composed, decomposed (NFC composes), lone combining mark, marks on letters without a composed form
    "café crème brûlée", "cafe\u0301 cre\u0300me", "\u0301", "x\u0301y q\u0323",
    # case mapping: Greek final sigma (per-character lowercase), dotted I, sharp s, ligature, fullwidth
    "ΟΔΟΣ ΣΟΦΟΣ Σ", "İstanbul DİYARBAKIR", "STRAẞE straße", "ﬁsh ﬂower", "ＡＢＣ ｄｅｆ １２３",
    # CJK, Japanese, Korean, Thai, Arabic, Devanagari, Cyrillic
    "一只好奇的猫探索闹鬼的豪宅，细节丰富。", "東京タワーの夜景", "서울의 밤거리", "ภาพถ่ายแมว", "قطة جميلة",
    "एक सुंदर बिल्ली", "Красивая кошка в саду",
    # emoji: ZWJ sequences, skin tones, flags, variation selectors, keycaps
    "a cat 🐱 and a dog 🐶!", "👩‍👩‍👧‍👦 family", "👍🏽👍🏿", "🇫🇷🇯🇵 flags", "❤️ love", "#️⃣ 1️⃣",
    # HTML entities stay literal in transformers (openai/CLIP would unescape them)
    "rock &amp; roll &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;",
    # punctuation runs, quotes, contractions
    "...!!!???", "!!!", "! !! !!!", "wow!! nice!", "x!?y", "hello,world;foo:bar", "a--b__c~~d",
    "it's I'M we'll they'd you're we've I'd don't", "''s '''t ' s 'S 'RE", "’curly’ “quotes”",
    "(((masterpiece))), [best quality], {cinematic:1.2}", "<lora:foo:0.8> <<<>>>",
    # digits (one token each), decimals, superscripts/fractions (\p{N} but not \d), other numerals
    "1234567890", "3.14159 and 2,000,000", "x² y³ ½ ¼ Ⅻ", "٣ ٤ ٥ ၁၂",
    # whitespace kinds: NBSP, ideographic space, thin space, line separator; U+001C..1F (str.isspace, not \s)
    "a\u00a0b\u3000c\u2009d\u2028e\u0085f", "a\x1cb\x1dc\x1ed\x1ff", "zero\u200bwidth\u200djoin\ufeffbom",
    # control characters, private use, replacement char, lone surrogate-free astral symbols
    "tab\there\x00nul\x07bell", "\ue000\uf8ff", "\ufffd broken", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝟙𝟚𝟛",
    # code points unassigned in Python 3.11's Unicode 14 but known to the reference (CJK Ext H, Garay digits)
    "\U00031350\U00031351 \U00010d40\U00010d41 \ua7cb\ua7dc",
    # special-token strings: exact, mixed case (normalized vs raw matching), glued to punctuation
    BOS, EOS, f"a{EOS}!", f"A{BOS}B{EOS}C", "<|StartOfText|> <|EndOfText|>", f"..{EOS}x", f"{BOS}{BOS}",
    "<|startoftext|", "|endoftext|>", "<|unknown|>",
    # long single words (BPE on long pieces), repeated tokens
    "a" * 300, "supercalifragilisticexpialidocious " * 3, "pneumonoultramicroscopicsilicovolcanoconiosis",
    "hyper-detailed, 8k, octane render, trending on artstation, unreal engine 5, 4k uhd",
]


def test_oracle_versions(refs):
    """Record the oracle: transformers' CLIPTokenizer class and version."""
    print(f"oracle: transformers {transformers.__version__}, class {type(refs['tokenizer']).__mro__[1].__name__}")
    assert refs["tokenizer"].model_max_length == MAX_LENGTH


def test_known_ids(ours, bundled):
    """Ids from docs/research/sdxl.md section 4 (verified there on transformers 5.24 and openai/CLIP)."""
    for tok in list(ours.values()) + list(bundled.values()):
        assert tok.encode("a photo of an astronaut") == [320, 1125, 539, 550, 18376]
        assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (BOS_ID, EOS_ID, MAX_LENGTH)
        assert tok.vocab_size == 49408
    assert ours["tokenizer"].pad_token_id == EOS_ID and ours["tokenizer_2"].pad_token_id == BANG_ID
    assert ours["tokenizer"].encode("! !! !!!") == [256, 748, 995]
    assert ours["tokenizer_2"].encode("! !! !!!") == [BANG_ID] * 6
    assert ours["tokenizer_2"].encode("wow!! nice!") == [2781, 0, 0, 1805, 0]
    assert ours["tokenizer_2"].encode("x!?y") == [343, 0, 286, 344]
    assert ours["tokenizer"].encode("x!?y") == [343, 6004, 344]


@pytest.mark.parametrize("name", list(PAD_VARIANTS))
def test_corpus_parity(name, refs, ours, bundled):
    """Every DrawBench / Pick-a-Pic prompt (English and Chinese captions): padded ids equal, and the full
    (untruncated) token lists equal."""
    prompts = _corpus()
    assert len(prompts) == 1200
    ref_ids = _ref_ids(refs[name], prompts)
    with pytest.warns(UserWarning, match="tokens dropped"):  # the corpus holds prompts over 75 tokens
        got = ours[name](prompts)
    assert got.dtype == torch.long and got.shape == (len(prompts), MAX_LENGTH)
    mismatched = [prompts[i] for i in range(len(prompts)) if not torch.equal(got[i], ref_ids[i])]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[:3]!r}"
    ref_full = refs[name](prompts, add_special_tokens=False).input_ids
    assert [ours[name].encode(p) for p in prompts] == ref_full
    assert [bundled[name].encode(p) for p in prompts] == ref_full


@pytest.mark.parametrize("name", list(PAD_VARIANTS))
def test_edge_cases(name, refs, ours, bundled):
    """Hand-picked edge cases, against the folder-loaded oracle (padded, truncated) and untruncated."""
    ref_ids = _ref_ids(refs[name], EDGE_CASES)
    got = ours[name].encode_batch(EDGE_CASES, warn=False).input_ids
    bad = [(t, got[i].tolist(), ref_ids[i].tolist()) for i, t in enumerate(EDGE_CASES) if not torch.equal(got[i], ref_ids[i])]
    assert not bad, bad[:3]
    for text in EDGE_CASES:
        expected = refs[name](text, add_special_tokens=False).input_ids
        assert ours[name].encode(text) == expected, text
        assert bundled[name].encode(text) == expected, text


@pytest.mark.parametrize("pad", list(PAD_VARIANTS.values()))
def test_constructor_oracle(pad, bundled):
    """transformers' ``CLIPTokenizer(vocab=..., merges=..., pad_token=...)``: registers bos/eos as raw-text tokens,
    so it differs from the SDXL folders only on mixed-case ``<|StartOfText|>``; everything else matches."""
    ref = hf_clip_tokenizer(pad)
    ours = CLIPTokenizer(*clip_vocab_and_merges(), pad_token=pad)
    texts = [t for t in EDGE_CASES if "startoftext" not in t.lower()] + ["<|StartOfText|>", "x <|StartofText|>"]
    assert ours(texts).tolist() == _ref_ids(ref, texts).tolist()
    name = "tokenizer" if pad == EOS else "tokenizer_2"
    assert bundled[name].encode("<|StartOfText|>") == [BOS_ID]  # SDXL folders match bos after lowercasing
    assert ours.encode("<|StartOfText|>") == ref("<|StartOfText|>", add_special_tokens=False).input_ids != [BOS_ID]


def _sampled_code_points() -> list[int]:
    """Every code point below U+2100 (Latin, Greek, Cyrillic, ..., whitespace, controls, combining marks), a stride
    over the rest of Unicode, and the ranges Python 3.11 does not know (see tokenizer_text._LATER_*)."""
    from w2sd.sdxl import tokenizer_text as tt

    later = [c for lo, hi in tt._LATER_LETTERS + tt._LATER_NUMBERS for c in (lo, hi)] + list(tt._LATER_LOWER)
    cps = set(range(0x2100)) | set(range(0x2100, 0x110000, 331)) | set(later)
    return sorted(c for c in cps if not 0xD800 <= c < 0xE000)


def test_code_point_sweep(refs, ours):
    """Each sampled code point in letter/digit/quote/whitespace contexts (tokenizer_2, which has the '!' rule)."""
    texts = [f"a{c}b {c}{c}1{c}'{c}Σ{c}!" for c in map(chr, _sampled_code_points())]
    ref = refs["tokenizer_2"].backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    tok = ours["tokenizer_2"]
    bad = [(hex(ord(t[1])), unicodedata.category(t[1])) for t, r in zip(texts, ref) if tok.encode(t) != r.ids]
    assert not bad, f"{len(bad)} code points differ: {bad[:10]}"


def test_text_pipeline_units():
    """normalize / pre_tokenize on their own (expected pieces worked out from the reference regex, sdxl.md 4.2)."""
    assert normalize("  Café\u3000\tΟΔΟΣ  ") == " café οδοσ "  # NFC, one space per run, no strip, no final sigma
    assert pre_tokenize("it's 12 apples!!?") == ["it", "'s", "1", "2", "apples", "!!?"]
    assert pre_tokenize("a<|endoftext|>!") == ["a", "<|", "endoftext", "|>", "!"]
    assert pre_tokenize("..<|endoftext|>") == ["..<|", "endoftext", "|>"]
    assert pre_tokenize("x² ½") == ["x", "²", "½"]
    assert pre_tokenize("'''s 'dog") == ["'''", "s", "'d", "og"]


@pytest.mark.parametrize("name", list(PAD_VARIANTS))
def test_truncation_and_warning(name, refs, ours):
    """Over-long prompts keep bos + 75 tokens + eos, like transformers with truncation=True; a warning says how
    many tokens were dropped. Exactly 75 tokens: no warning."""
    tok = ours[name]
    word = "astronaut "  # one token
    assert len(tok.encode(word)) == 1
    long_prompt = word * 90 + "on a horse"
    n_tokens = len(tok.encode(long_prompt))
    assert n_tokens == 93
    with pytest.warns(UserWarning, match=rf"{n_tokens - (MAX_LENGTH - 2)} tokens dropped: 'astronaut .*on a horse'"):
        batch = tok.encode_batch(["short", long_prompt])
    assert isinstance(batch, TokenBatch)
    assert batch.num_truncated == [0, n_tokens - 75]
    assert torch.equal(batch.input_ids, _ref_ids(refs[name], ["short", long_prompt]))
    assert batch.input_ids[1, -1].item() == EOS_ID and batch.input_ids[1, 0].item() == BOS_ID
    exact = word * 75
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok(exact)
    assert torch.equal(ids, _ref_ids(refs[name], [exact]))
    with pytest.warns(UserWarning, match="1 tokens dropped"):
        tok(exact + word)


@pytest.mark.parametrize("name", list(PAD_VARIANTS))
def test_batch_shapes_and_eos_positions(name, ours):
    """The text encoder pools at argmax(ids) (sdxl.md 3.1); eos_positions must point at the same place."""
    tok = ours[name]
    prompts = ["", "a cat", "a very " * 50 + "long prompt", "wow!!!"]
    batch = tok.encode_batch(prompts, warn=False)
    assert batch.input_ids.shape == (4, MAX_LENGTH)
    assert torch.equal(batch.eos_positions, batch.input_ids.argmax(-1))
    assert batch.eos_positions.tolist()[:2] == [1, 3]
    assert tok("a cat").shape == (1, MAX_LENGTH)
    assert tok([]).shape == (0, MAX_LENGTH)
    with pytest.raises(TypeError, match="str"):
        tok([None])


def test_decode_round_trip(ours):
    tok = ours["tokenizer"]
    text = "a photo of an astronaut riding a horse, café 東京 🐱"
    assert tok.decode(tok(text)[0].tolist()) == "a photo of an astronaut riding a horse , café 東京 🐱"
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_bundled_equals_folder(ours, bundled):
    """``from_bundled`` builds the same vocab, merges and added tokens as the SDXL folders."""
    vocab, merges = load_bundled_vocab()
    ref_vocab, ref_merges = clip_vocab_and_merges()
    assert vocab == ref_vocab and merges == list(ref_merges)
    for name in PAD_VARIANTS:
        a, b = ours[name], bundled[name]
        assert a.encoder == b.encoder and a.bpe_ranks == b.bpe_ranks
        assert a.added_tokens == b.added_tokens
        assert (a.pad_token_id, a.model_max_length) == (b.pad_token_id, b.model_max_length)


@pytest.mark.parametrize("name", list(PAD_VARIANTS))
def test_tokenizer_json_folders(name, refs, ours, tmp_path):
    """transformers' save_pretrained writes tokenizer.json + tokenizer_config.json (no vocab.json): same tokenizer."""
    saved = tmp_path / "saved"
    refs[name].save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    from_json = CLIPTokenizer.from_folder(saved)
    assert from_json.encoder == ours[name].encoder and from_json.bpe_ranks == ours[name].bpe_ranks
    assert (from_json.pad_token_id, from_json.model_max_length) == (ours[name].pad_token_id, MAX_LENGTH)
    probe = EDGE_CASES[:40]
    assert torch.equal(from_json.encode_batch(probe, warn=False).input_ids, ours[name].encode_batch(probe, warn=False).input_ids)

    if name == "tokenizer_2":
        # Only tokenizer.json: transformers pads with <|endoftext|> (its class default) but keeps "!" an added
        # token; so do we.
        only = tmp_path / "only_json"
        only.mkdir()
        shutil.copy(saved / "tokenizer.json", only / "tokenizer.json")
        ref = transformers.CLIPTokenizer.from_pretrained(str(only))
        tok = CLIPTokenizer.from_folder(only)
        assert tok.pad_token_id == ref.pad_token_id == EOS_ID
        assert tok.model_max_length == MAX_LENGTH  # transformers says 1e30 here; CLIP has 77 positions
        assert torch.equal(tok.encode_batch(probe, warn=False).input_ids, _ref_ids(ref, probe))


def test_legacy_folder_layout(folders, tmp_path):
    """No added_tokens_decoder in tokenizer_config.json: transformers then reads special_tokens_map.json (which
    overrides the config) and added_tokens.json (extra tokens, normalized unless special)."""
    folder = tmp_path / "legacy"
    shutil.copytree(folders["tokenizer"], folder)
    config = _sdxl_tokenizer_config(EOS)
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS})
    )
    # "cat" is in the vocab; "DOG  HOUSE" is new (id 49408) and, being normalized, matches "dog house"
    (folder / "added_tokens.json").write_text(json.dumps({BOS: BOS_ID, EOS: EOS_ID, "cat": 1481, "DOG  HOUSE": 49408}))
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.pad_token_id == ref.pad_token_id == BANG_ID
    texts = ["a CAT concat cat!", "<|StartOfText|>x<|EndOfText|>", "wow!!", "dog house DOG\tHOUSE doghouse"]
    assert torch.equal(tok(texts), _ref_ids(ref, texts))
    assert tok.encode("dog house") == [49408]


def _tiny_folder(folder: Path, extra_merges: str = "") -> Path:
    """A small valid CLIP-style folder (byte tokens, one merge) for error tests that must not parse the full vocab."""
    from w2sd.sdxl.tokenizer_text import BYTE_TO_UNICODE

    chars = list(BYTE_TO_UNICODE.values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["ab", BOS, EOS])}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\na b\n" + extra_merges, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8, "pad_token": "!"}))
    return folder


def test_errors(folders, tmp_path):
    """Missing or malformed files raise errors that name the file."""
    tiny = CLIPTokenizer.from_folder(_tiny_folder(tmp_path / "tiny"))
    e = tiny.encoder  # merge ("a", "b") applies inside "abc" but not to "a", "b</w>"; "!" is the pad token (id 0)
    assert tiny.encode("abc ab!") == [e["ab"], e["c</w>"], e["a"], e["b</w>"], e["!"]]
    assert tiny(["ab"]).tolist() == [[tiny.bos_token_id, tiny.encoder["a"], tiny.encoder["b</w>"], tiny.eos_token_id, 0, 0, 0, 0]]

    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="vocab.json"):
        CLIPTokenizer.from_folder(empty)
    d = _tiny_folder(tmp_path / "no_merges")
    (d / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="merges.txt"):
        CLIPTokenizer.from_folder(d)
    d = _tiny_folder(tmp_path / "bad_vocab")
    (d / "vocab.json").write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match=r"vocab\.json.*malformed JSON"):
        CLIPTokenizer.from_folder(d)
    d = _tiny_folder(tmp_path / "bad_config")
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json"):
        CLIPTokenizer.from_folder(d)
    d = _tiny_folder(tmp_path / "bad_merge_line", extra_merges="abc\n")
    with pytest.raises(CheckpointError, match=r"merges\.txt line 3"):
        CLIPTokenizer.from_folder(d)
    d = _tiny_folder(tmp_path / "merge_out_of_vocab", extra_merges="ab c\n")
    with pytest.raises(CheckpointError, match="'abc', not in the vocabulary"):
        CLIPTokenizer.from_folder(d)
    assert CLIPTokenizer.from_folder(tmp_path / "tiny", pad_token=EOS, max_length=5)("ab").tolist() == [
        [tiny.bos_token_id, e["a"], e["b</w>"], tiny.eos_token_id, tiny.eos_token_id]
    ]
    with pytest.raises(CheckpointError, match="pad_token"):
        CLIPTokenizer.from_folder(tmp_path / "tiny", pad_token="<|not-a-token|>")
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.from_bundled(pad_token="<|not-a-token|>")
    d = tmp_path / "wordpiece"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*WordPiece"):
        CLIPTokenizer.from_folder(d)
