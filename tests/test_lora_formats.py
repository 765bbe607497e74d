"""LoRA file parsing (w2sd.lora.formats) and branch details on small hand-built modules.

Oracle: the formulas of research/sdxl.md §6.1-6.2 written out in the test (kohya: ``alpha / r`` with alpha missing or
0 -> r; PEFT: ``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``, ``alpha_pattern`` matched like peft's
``get_pattern_key``), random tensors from ``torch.Generator().manual_seed`` (seeds inline), float32/float64 on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from w2sd.errors import LoRAError
from w2sd.lora import attach_lora, detach_lora, load_lora, parse_lora_state_dict

ATOL = 1e-6  # float32 single-layer results, a handful of roundings apart


def _pair(g: torch.Generator, r: int, i: int, o: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if k is None:
        return torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
    return torch.randn(r, i, k, k, generator=g), torch.randn(o, r, 1, 1, generator=g)


def test_kohya_alpha_missing_zero_and_half_precision():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("lora_unet_a", "lora_unet_b", "lora_unet_c", "lora_te_text_model_x", "lora_te2_y"):
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = _pair(g, 4, 8, 6)
    sd["lora_unet_b.alpha"] = torch.tensor(0.0)  # 0 -> r
    sd["lora_unet_c.alpha"] = torch.tensor(3.0, dtype=torch.bfloat16)
    sd["lora_te2_y.alpha"] = torch.tensor([2.0], dtype=torch.float16)  # a 1-element tensor is fine
    lora = parse_lora_state_dict(sd)
    by = {m.key: m for m in lora.modules}
    assert lora.format == "kohya"
    assert by["lora_unet_a"].multiplier == 1.0 and by["lora_unet_b"].multiplier == 1.0
    assert by["lora_unet_c"].alpha == 3.0 and by["lora_unet_c"].multiplier == 0.75
    assert by["lora_te2_y"].multiplier == 0.5
    assert {m.key: m.component for m in lora.modules} == {
        "lora_unet_a": "unet", "lora_unet_b": "unet", "lora_unet_c": "unet",
        "lora_te_text_model_x": "text_encoder", "lora_te2_y": "text_encoder_2"}
    assert all(m.naming == "kohya" and m.target == m.key for m in lora.modules)


def test_peft_key_variants_and_alpha_tensor():
    g = torch.Generator().manual_seed(1)
    sd = {}
    sd["unet.x.lora_A.weight"], sd["unet.x.lora_B.weight"] = _pair(g, 2, 8, 6)
    sd["unet.x.alpha"] = torch.tensor(1.0)  # explicit alpha wins over metadata / default
    raw = "text_encoder.base_model.model.y"  # a raw PEFT state dict with an adapter name
    sd[f"{raw}.lora_A.default.weight"], sd[f"{raw}.lora_B.default.weight"] = _pair(g, 2, 8, 6)
    sd["z.w.lora_A.weight"], sd["z.w.lora_B.weight"] = _pair(g, 2, 8, 6)  # no component prefix -> unet
    lora = parse_lora_state_dict(sd)
    got = {(m.component, m.target, m.multiplier) for m in lora.modules}
    assert got == {("unet", "x", 0.5), ("text_encoder", "y", 1.0), ("unet", "z.w", 1.0)}


def test_peft_metadata_alpha_pattern_and_rslora(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for key in ("unet.blk.attn1.to_q", "unet.blk.attn1.to_k", "unet.blk.not_to_q", "text_encoder_2.l.fc1"):
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = _pair(g, 4, 8, 6)
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}, "unet.use_rslora": False,
            "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 8, "text_encoder_2.use_rslora": True}
    path = tmp_path / "p.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    by = {m.target: m.multiplier for m in load_lora(path).modules}
    assert by["blk.attn1.to_q"] == 0.5  # pattern "(.*\.)?(attn1.to_q)$"
    assert by["blk.attn1.to_k"] == 2.0 and by["blk.not_to_q"] == 2.0  # pattern must match at a "." boundary
    assert math.isclose(by["l.fc1"], 8 / math.sqrt(4))  # rsLoRA
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoRAError, match="not valid JSON"):
        load_lora(bad)
    dora = tmp_path / "dora.safetensors"
    save_file(sd, str(dora), metadata={"lora_adapter_metadata": json.dumps({**meta, "unet.use_dora": True})})
    with pytest.raises(LoRAError, match="DoRA"):
        load_lora(dora)


def test_old_diffusers_keys():
    g = torch.Generator().manual_seed(3)
    sd = {}
    for key in ("unet.b.attn1.processor.to_q_lora", "unet.b.attn1.processor.to_out_lora",
                "text_encoder.l.self_attn.to_v_lora"):
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = _pair(g, 2, 8, 8)
    fc1 = "text_encoder_2.l.mlp.fc1.lora_linear_layer"
    sd[f"{fc1}.down.weight"], sd[f"{fc1}.up.weight"] = _pair(g, 2, 8, 8)
    sd["unet.c.proj_in.lora.down.weight"], sd["unet.c.proj_in.lora.up.weight"] = _pair(g, 2, 8, 8)
    sd["unet.c.proj_in.alpha"] = torch.tensor(1.0)
    lora = parse_lora_state_dict(sd)
    got = {(m.component, m.target, m.multiplier) for m in lora.modules}
    assert got == {("unet", "b.attn1.to_q", 1.0), ("unet", "b.attn1.to_out.0", 1.0),
                   ("text_encoder", "l.self_attn.v_proj", 1.0), ("text_encoder_2", "l.mlp.fc1", 1.0),
                   ("unet", "c.proj_in", 0.5)}
    assert lora.format == "diffusers_old"


@pytest.mark.parametrize("extra,match", [
    ({"lora_unet_a.dora_scale": torch.ones(6, 1)}, "DoRA"),
    ({"lora_unet_h.hada_w1_a": torch.ones(2, 2)}, "LoHa"),
    ({"lora_unet_k.lokr_w1": torch.ones(2, 2)}, "LoKr"),
    ({"lora_unet_a.lora_mid.weight": torch.ones(2, 2, 3, 3)}, "lora_mid"),
    ({"lora_unet_a.something.weight": torch.ones(1)}, r"1 keys of an unknown format: 'lora_unet_a.something.weight'"),
    ({"lora_unet_q.alpha": torch.tensor(1.0)}, "alpha keys belong to no LoRA module: 'lora_unet_q.alpha'"),
    ({"lora_unet_b.lora_down.weight": torch.ones(2, 8)}, "'lora_unet_b' has no up tensor"),
    ({"lora_unet_b.lora_down.weight": torch.ones(3, 8), "lora_unet_b.lora_up.weight": torch.ones(6, 2)},
     r"inconsistent shapes.*\(3, 8\).*\(6, 2\)"),
    ({"lora_unet_b.lora_down.weight": torch.ones(2, 8, 3, 3), "lora_unet_b.lora_up.weight": torch.ones(6, 2, 3, 3)},
     "only 1x1 up convs"),
    ({"lora_unet_a.alpha": torch.tensor(float("nan"))}, "not finite"),
])
def test_bad_files_raise_naming_the_key(extra, match):
    g = torch.Generator().manual_seed(4)
    sd = dict(zip(("lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"), _pair(g, 2, 8, 6)))
    sd.update(extra)
    with pytest.raises(LoRAError, match=match):
        parse_lora_state_dict(sd)


def test_load_lora_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a .safetensors"):
        load_lora(tmp_path / "x.ckpt")
    with pytest.raises(LoRAError, match="empty"):
        parse_lora_state_dict({})


# ------------------------------------------------------------------------------------------ branches


def _toy() -> nn.Module:
    torch.manual_seed(5)
    m = nn.Module()
    m.lin = nn.Linear(8, 6)
    m.conv1x1 = nn.Conv2d(8, 6, 1)
    m.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
    m.norm = nn.LayerNorm(8)
    return m.eval()


def test_linear_conv1x1_and_strided_conv_branches_follow_the_formula():
    m = _toy()
    g = torch.Generator().manual_seed(6)
    d_lin, u_lin = _pair(g, 3, 8, 6, 1)  # a 1x1-conv-shaped LoRA (SD1.x proj_in) on a Linear
    d_c1, u_c1 = _pair(g, 3, 8, 6)  # a linear-shaped LoRA on a 1x1 conv
    d_c3, u_c3 = _pair(g, 2, 8, 6, 3)
    sd = {"unet.lin.lora_A.weight": d_lin, "unet.lin.lora_B.weight": u_lin,
          "unet.conv1x1.lora_A.weight": d_c1, "unet.conv1x1.lora_B.weight": u_c1,
          "unet.conv3.lora_A.weight": d_c3, "unet.conv3.lora_B.weight": u_c3, "unet.conv3.alpha": torch.tensor(1.0)}
    x = torch.randn(4, 8, generator=g)
    xc = torch.randn(2, 8, 7, 7, generator=g)
    with torch.no_grad():
        base = (m.lin(x), m.conv1x1(xc), m.conv3(xc))
        handle = attach_lora(m, sd, name="t", scale=-1.5)  # single module: the LoRA has one component
        out = (m.lin(x), m.conv1x1(xc), m.conv3(xc))
    s = -1.5
    exp_lin = base[0] + s * x @ (u_lin.flatten(1) @ d_lin.flatten(1)).T
    exp_c1 = base[1] + s * torch.einsum("oi,bihw->bohw", u_c1 @ d_c1, xc)
    w3 = (u_c3.flatten(1) @ d_c3.flatten(1)).reshape(6, 8, 3, 3)
    exp_c3 = base[2] + s * 0.5 * torch.nn.functional.conv2d(xc, w3, stride=2, padding=1)
    for got, exp in zip(out, (exp_lin, exp_c1, exp_c3)):
        assert (got - exp).abs().max().item() <= ATOL * max(1.0, exp.abs().max().item())
    detach_lora(m, "t")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip((m.lin(x), m.conv1x1(xc), m.conv3(xc)), base))


def test_scale_zero_skips_the_branch_and_casts_follow_the_model():
    m = _toy()
    g = torch.Generator().manual_seed(7)
    d, u = _pair(g, 2, 8, 6)
    handle = attach_lora(m, {"lora_unet_lin.lora_down.weight": d, "lora_unet_lin.lora_up.weight": u}, name="z")
    branch = handle.branches["unet:lin"]
    branch._cast = (torch.full_like(d, float("nan")), torch.full_like(u, float("nan")))  # poison the cached cast
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        base = nn.functional.linear(x, m.lin.weight, m.lin.bias)
        handle.scale = 0.0
        assert torch.equal(m.lin(x), base)  # branch not computed at all
        handle.scale = 1.0
        assert torch.isnan(m.lin(x)).all()
        m.double()  # a new dtype: the branch re-casts from the file tensors
        y = m.lin(x.double())
    assert y.dtype == torch.float64
    exp = nn.functional.linear(x.double(), m.lin.weight, m.lin.bias) + x.double() @ (u.double() @ d.double()).T
    assert torch.allclose(y, exp, atol=1e-12)
    handle.detach()


def test_target_that_is_not_linear_or_conv_and_double_targets():
    m = _toy()
    g = torch.Generator().manual_seed(8)
    d, u = _pair(g, 2, 8, 8)
    with pytest.raises(LoRAError, match=r"unet:norm.*LayerNorm, not an nn.Linear"):
        attach_lora(m, {"unet.norm.lora_A.weight": d, "unet.norm.lora_B.weight": u}, name="n")
    d6, u6 = _pair(g, 2, 8, 6)
    both = {"lora_unet_lin.lora_down.weight": d6, "lora_unet_lin.lora_up.weight": u6,
            "unet.lin.lora_A.weight": d6, "unet.lin.lora_B.weight": u6}
    with pytest.raises(LoRAError, match=r"both target unet:lin"):
        attach_lora(m, both, name="d")
    with pytest.raises(ValueError, match="pass models as a dict"):
        attach_lora(m, {**both, "text_encoder.x.lora_A.weight": d6, "text_encoder.x.lora_B.weight": u6})
    with torch.no_grad():  # nothing is left attached after the errors
        x = torch.randn(2, 8, generator=g)
        assert torch.equal(m.lin(x), nn.functional.linear(x, m.lin.weight, m.lin.bias))


def test_keyword_input_deepcopy_and_no_leak():
    import copy
    import gc
    import weakref

    m = _toy()
    g = torch.Generator().manual_seed(9)
    d, u = _pair(g, 2, 8, 6)
    handle = attach_lora(m, {"lora_unet_lin.lora_down.weight": d, "lora_unet_lin.lora_up.weight": u}, name="k")
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        exp = nn.functional.linear(x, m.lin.weight, m.lin.bias) + x @ (u @ d).T
        assert torch.allclose(m.lin(input=x), exp, atol=ATOL)  # called with a keyword argument
        # a deep copy does not carry the LoRA (no handle could switch or detach it): it computes the base output
        clone = copy.deepcopy(m)
        assert torch.equal(clone.lin(x), nn.functional.linear(x, m.lin.weight, m.lin.bias))
    assert handle.models == {"unet": m}
    ref = weakref.ref(m)
    del m, clone
    gc.collect()
    assert ref() is None  # attaching a LoRA never keeps a model alive
    assert handle.models == {}
