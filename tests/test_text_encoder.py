"""Parity of w2sd.sdxl.text_encoder with transformers' CLIPTextModel / CLIPTextModelWithProjection.

Oracle: transformers (version printed by ``test_oracle_versions``), tiny config of research note sdxl.md §8.2, weights
from transformers' init under ``torch.manual_seed(SEED)`` plus seeded N(0, WEIGHT_NOISE) perturbation (so layer-norm
weights and biases are not 1/0), saved with ``save_pretrained`` (safetensors), CPU, float32.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers  # noqa: E402  (test extra; a missing oracle must fail, not skip)

from w2sd.errors import CheckpointError, ConfigError  # noqa: E402
from w2sd.sdxl.text_encoder import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    normalize_text_encoder_keys,
)

SEED = 0
WEIGHT_NOISE = 0.1
ATOL_FP32 = 1e-5  # max abs error, float32 on CPU (sdpa in both implementations)
TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=32,
    vocab_size=49408,
    bos_token_id=0,
    pad_token_id=1,
    max_position_embeddings=77,
)
SEQ = 77
EOT = 49407


@functools.lru_cache(maxsize=None)
def _hf_model(with_projection: bool, hidden_act: str, eos_token_id: int, seed: int = SEED):
    """Tiny transformers model, cached per configuration (never mutated by the tests)."""
    cfg = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WEIGHT_NOISE)
    return model


def _ids(eos_positions: list[int], eos_id: int, pad_id: int, seed: int = SEED + 1, high: int = EOT - 1) -> torch.Tensor:
    """Rows [bos, random tokens, eos at the given position, pad...]; random ids avoid eos_id."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for pos in eos_positions:
        row = torch.randint(3, high, (SEQ,), generator=g)
        row[row == eos_id] = 3
        row[0] = TINY["bos_token_id"]
        row[pos] = eos_id
        row[pos + 1 :] = pad_id
        rows.append(row)
    return torch.stack(rows)  # (B, 77)


def _save_and_reload(hf_model, tmp_path, prefix: str) -> dict[str, torch.Tensor]:
    """save_pretrained, then rewrite the file so keys have ('add') / lack ('strip') the text_model. prefix."""
    hf_model.save_pretrained(tmp_path / "te")
    path = tmp_path / "te" / "model.safetensors"
    sd = load_file(str(path))
    if prefix == "add":
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
        # older SDXL files also carry the position_ids buffer
        sd["text_model.embeddings.position_ids"] = torch.arange(SEQ).unsqueeze(0)
    elif prefix == "strip":
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        sd["embeddings.position_ids"] = torch.arange(SEQ).unsqueeze(0)
    rewritten = tmp_path / "rewritten.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(rewritten))
    return load_file(str(rewritten))


def _ours(hf_model, sd: dict[str, torch.Tensor], with_projection: bool):
    cfg = CLIPTextConfig.from_dict(json.loads(hf_model.config.to_json_string()))
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()
    model.load_state_dict(normalize_text_encoder_keys(sd), strict=True)
    return model


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_oracle_versions():
    print(f"oracle: transformers {transformers.__version__}, torch {torch.__version__}")
    assert transformers.__version__


CASES = [
    # (with_projection, hidden_act, eos_token_id, pad_id, prefix rewrite) ; SDXL: TE1 pads with EOT, TE2 with 0
    (False, "quick_gelu", 2, EOT, "none"),  # transformers 5 file without prefix
    (False, "quick_gelu", 2, EOT, "add"),  # real SDXL TE1 naming, with position_ids buffer
    (True, "gelu", 2, 0, "none"),
    (True, "gelu", 2, 0, "strip"),
    (False, "gelu", EOT, EOT, "none"),  # non-legacy: first position equal to eos_token_id
    (True, "quick_gelu", EOT, 0, "add"),
]


@pytest.mark.parametrize("with_projection,act,eos_id,pad_id,prefix", CASES)
def test_parity_with_transformers(tmp_path, with_projection, act, eos_id, pad_id, prefix):
    hf = _hf_model(with_projection, act, eos_id)
    ours = _ours(hf, _save_and_reload(hf, tmp_path, prefix), with_projection)
    ids = _ids([5, 17, 76, 1], EOT, pad_id)  # prompts of different lengths, batch 4
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1 == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert _max_err(a, b) <= ATOL_FP32, f"hidden_states[{i}]"
    assert _max_err(out.last_hidden_state, ref.last_hidden_state) <= ATOL_FP32
    assert _max_err(out.hidden_states[-2], ref.hidden_states[-2]) <= ATOL_FP32
    if with_projection:
        assert _max_err(out.text_embeds, ref.text_embeds) <= ATOL_FP32
        # pooled is not exposed by transformers' WithProjection output; check it through the inner model
        with torch.no_grad():
            ref_pooled = hf.text_model(input_ids=ids).pooler_output
    else:
        assert out.text_embeds is None
        ref_pooled = ref.pooler_output
    assert _max_err(out.pooled, ref_pooled) <= ATOL_FP32


@pytest.mark.parametrize("eos_id", [2, 7])
def test_pooling_index_rule(tmp_path, eos_id):
    """Legacy eos 2 -> argmax of ids; otherwise the first position equal to eos (here 7, smaller than other ids)."""
    hf = _hf_model(True, "gelu", eos_id)
    ours = _ours(hf, _save_and_reload(hf, tmp_path, "none"), True)
    ids = _ids([9, 30, 50], 7, 7, high=EOT + 1)  # eos 7 at 9/30/50, larger ids (up to EOT) elsewhere
    ids[:, 3] = EOT  # argmax lands at 3, first-eos lands at the eos position
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
        ref_pooled = hf.text_model(input_ids=ids).pooler_output
    expected_idx = torch.full((3,), 3) if eos_id == 2 else torch.tensor([9, 30, 50])
    assert torch.equal(ours.text_model.eos_index(ids), expected_idx)
    assert _max_err(out.pooled, ref_pooled) <= ATOL_FP32
    assert _max_err(out.text_embeds, ref.text_embeds) <= ATOL_FP32


def test_output_hidden_states_off_and_short_sequence(tmp_path):
    hf = _hf_model(False, "quick_gelu", 2)
    ours = _ours(hf, _save_and_reload(hf, tmp_path, "none"), False)
    ids = _ids([4, 9], EOT, EOT)[:, :12]  # T=12 < 77 also works (positions 0..11)
    with torch.no_grad():
        out = ours(ids)
        ref = hf(input_ids=ids)
    assert out.hidden_states is None
    assert _max_err(out.last_hidden_state, ref.last_hidden_state) <= ATOL_FP32
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_parameter_names_match_real_sdxl_layout():
    cfg = CLIPTextConfig(**{k: v for k, v in TINY.items()}, eos_token_id=2)
    names = set(CLIPTextModelWithProjection(cfg).state_dict())
    assert "text_model.embeddings.token_embedding.weight" in names
    assert "text_model.encoder.layers.2.self_attn.q_proj.bias" in names
    assert "text_model.encoder.layers.0.mlp.fc2.weight" in names
    assert "text_model.final_layer_norm.weight" in names
    assert "text_projection.weight" in names and "text_projection.bias" not in names
    assert not any("position_ids" in n for n in names)
    assert "text_projection.weight" not in CLIPTextModel(cfg).state_dict()


def test_mismatched_keys_are_named(tmp_path):
    hf = _hf_model(True, "gelu", 2)
    sd = normalize_text_encoder_keys(_save_and_reload(hf, tmp_path, "none"))
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(json.loads(hf.config.to_json_string())))
    bad = dict(sd)
    bad["text_model.final_layernorm.weight"] = bad.pop("text_model.final_layer_norm.weight")
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(bad, strict=True)
    assert "text_model.final_layer_norm.weight" in str(err.value)  # missing
    assert "text_model.final_layernorm.weight" in str(err.value)  # unexpected
    bad = dict(sd)
    bad["text_projection.weight"] = bad["text_projection.weight"][:, :16]
    with pytest.raises(RuntimeError, match="text_projection.weight"):
        model.load_state_dict(bad, strict=True)
    # a projection file does not load into the model without projection
    with pytest.raises(RuntimeError, match="text_projection.weight"):
        CLIPTextModel(model.config).load_state_dict(sd, strict=True)


def test_normalize_keys_rules():
    t = torch.zeros(1)
    out = normalize_text_encoder_keys(
        {
            "embeddings.token_embedding.weight": t,
            "text_model.final_layer_norm.bias": t,
            "text_projection.weight": t,
            "text_model.embeddings.position_ids": t,
            "embeddings.position_ids": t,
            "logit_scale": t,
        }
    )
    assert set(out) == {
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.bias",
        "text_projection.weight",
        "text_model.logit_scale",  # passed through, so a strict load names it
    }
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        normalize_text_encoder_keys({"final_layer_norm.bias": t, "text_model.final_layer_norm.bias": t})


def test_config_from_dict_errors_and_defaults():
    base = dict(TINY, hidden_act="gelu", eos_token_id=2, architectures=["CLIPTextModel"], model_type="x", dtype="f32")
    cfg = CLIPTextConfig.from_dict(base)
    assert (cfg.hidden_size, cfg.hidden_act, cfg.eos_token_id, cfg.layer_norm_eps) == (32, "gelu", 2, 1e-5)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
        with pytest.raises(ConfigError, match=key):
            CLIPTextConfig.from_dict({k: v for k, v in base.items() if k != key})
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_dict(dict(base, hidden_act="relu"))
    with pytest.raises(ConfigError, match="hidden_size"):
        CLIPTextConfig.from_dict(dict(base, hidden_size=30))
    # defaults follow transformers' CLIPTextConfig
    hf_default = transformers.CLIPTextConfig()
    ours_default = CLIPTextConfig.from_dict({k: getattr(hf_default, k) for k in CLIPTextConfig._REQUIRED})
    for name in ("max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps", "projection_dim",
                 "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours_default, name) == getattr(hf_default, name), name
