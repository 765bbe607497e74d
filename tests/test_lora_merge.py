"""LoRA side branches vs kohya's merge formula, scale switching, several LoRAs, detach, and errors.

Oracle: kohya-ss sd-scripts' merge formula applied to the weights by hand (``tests/test_lora_models.kohya_merge``,
research/sdxl.md §6.1: ``W += scale * (alpha / r) * up @ down``, 3x3 LoCon via flattened kernels, alpha missing ->
alpha = r), in float64 on a copy. diffusers/peft are not the oracle here because they ignore per-module alphas of
attention modules (§6.3). Models: our tiny UNet + both text encoders (``test_lora_models``), seeds given per test,
float32 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from test_lora_models import (
    kohya_targets,
    make_kohya_state_dict,
    max_rel_err,
    merge_all,
    run_ours,
    single_thread,  # noqa: F401  (autouse fixture)
    text_ids,
    tiny_models,
    unet_inputs,
)
from w2sd.errors import LoRAError
from w2sd.lora import (
    attach_lora,
    attached_loras,
    bind_lora_scale,
    detach_lora,
    load_lora,
    lora_scale,
    set_lora_scale,
    set_lora_scales,
)

# Branch (fp32) vs merged weights (fp64 merge, cast to fp32): only float32 rounding of two different evaluation
# orders separates them; measured <= 3.3e-6 (UNet) and <= 3e-7 (text encoders), bound 1e-5 relative to the output's max.
MERGE_RTOL = 1e-5
W2SD_SCALES = (1.5, -1.5, 0.8)  # strong, weak, main (W2SD's LoRA experiments)
SEED_MODELS, SEED_LORA_A, SEED_LORA_B = 0, 11, 12


@pytest.fixture(scope="module")
def setup():
    models = tiny_models(SEED_MODELS)
    inputs, ids = unet_inputs(), text_ids()
    base = run_ours(models, inputs, ids)
    mods, where = kohya_targets(models)
    # mixed per-module alphas: 1, 2, 4, 0.5, missing (-> r), cycling over the modules; LoCon convs at another rank
    choices = [1.0, 2.0, 4.0, 0.5, None]
    sd = make_kohya_state_dict(mods, 4, lambda n, i: choices[i % len(choices)], seed=SEED_LORA_A, conv_rank=3)
    return models, inputs, ids, base, mods, where, sd


@pytest.fixture(scope="module")
def merged_refs(setup):
    """Outputs of the kohya-merged models at each W2SD scale (the oracle)."""
    models, inputs, ids, base, mods, where, sd = setup
    return {s: run_ours(merge_all(models, where, sd, s), inputs, ids) for s in W2SD_SCALES}


def _assert_close(out: dict, ref: dict, rtol: float = MERGE_RTOL) -> None:
    for k in ref:
        err = max_rel_err(out[k], ref[k])
        assert err <= rtol, f"{k}: max rel err {err:.3e} > {rtol}"


def test_mixed_alphas_and_locon_match_kohya_merge_at_every_w2sd_scale(setup, merged_refs):
    models, inputs, ids, base, mods, where, sd = setup
    lora = load_lora(sd)
    assert lora.format == "kohya" and len(lora) == len(where)
    handle = attach_lora(models, lora, name="a", scale=W2SD_SCALES[0])
    try:
        assert len(handle.branches) == len(where)
        for s in W2SD_SCALES:
            handle.scale = s
            out = run_ours(models, inputs, ids)
            _assert_close(out, merged_refs[s])
            assert max_rel_err(out["unet"], base["unet"]) > 1e-3  # the LoRA really does something
    finally:
        handle.detach()


def test_conv3x3_locon_alone_without_alpha_is_scale_one(setup):
    models, inputs, ids, base, mods, where, _ = setup
    conv3 = {n: m for n, m in mods.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert len(conv3) >= 10
    sd = make_kohya_state_dict(conv3, rank=2, alpha=lambda n, i: None, seed=SEED_LORA_B)
    lora = load_lora(sd)
    assert all(m.alpha == m.rank == 2 and m.multiplier == 1.0 for m in lora.modules)
    handle = attach_lora({"unet": models["unet"]}, lora, name="conv", scale=-1.5)
    try:
        out = run_ours({"unet": models["unet"]}, inputs, ids)
        ref = run_ours(merge_all({"unet": models["unet"]}, {n: where[n] for n in conv3}, sd, -1.5), inputs, ids)
        _assert_close(out, ref)
    finally:
        detach_lora(handle)


def test_switching_scales_between_calls_and_zero_is_base(setup, merged_refs):
    models, inputs, ids, base, mods, where, sd = setup
    handle = attach_lora(models, load_lora(sd), name="a", scale=0.0)
    refs = merged_refs
    try:
        # W2SD order within a step: strong, weak, main; three steps; scale 0 = base model in between
        for _ in range(3):
            for s in (*W2SD_SCALES, 0.0):
                set_lora_scale(handle, "a", s)
                out = run_ours(models, inputs, ids)
                if s == 0.0:
                    for k in base:
                        assert torch.equal(out[k], base[k]), k  # branch skipped entirely: bit-exact base
                else:
                    _assert_close(out, refs[s])
        # the same through the models dict, the context manager and a bound denoiser
        set_lora_scale(models, "a", 0.8)
        with lora_scale(handle, -1.5):
            _assert_close(run_ours(models, inputs, ids), refs[-1.5])
        assert handle.scale == 0.8
        with lora_scale(models, 1.5, name="a"):
            assert handle.scale == 1.5
        weak_unet = bind_lora_scale(models["unet"], handle, -1.5)
        with torch.no_grad():
            assert max_rel_err(weak_unet(**inputs), refs[-1.5]["unet"]) <= MERGE_RTOL
        assert handle.scale == 0.8
    finally:
        handle.detach()


def test_two_loras_each_with_its_own_scale(setup, merged_refs):
    models, inputs, ids, base, mods, where, sd_a = setup
    # LoRA "b": attention/TE modules only (no LoCon), uniform alpha 8, rank 8
    mods_b = {n: m for n, m in mods.items() if isinstance(m, nn.Linear)}
    sd_b = make_kohya_state_dict(mods_b, rank=8, alpha=lambda n, i: 8.0, seed=SEED_LORA_B)
    ha = attach_lora(models, sd_a, name="a", scale=1.5)
    hb = attach_lora(models, sd_b, name="b", scale=-0.5)
    try:
        assert set(attached_loras(models)) == {"a", "b"}
        for sa, sb in ((-1.5, 0.7), (0.0, -0.5)):
            set_lora_scales(models, {"a": sa, "b": sb})
            assert (ha.scale, hb.scale) == (sa, sb)
            merged = merge_all(models, where, sd_a, sa)
            merged = merge_all(merged, {n: where[n] for n in mods_b}, sd_b, sb)
            _assert_close(run_ours(models, inputs, ids), run_ours(merged, inputs, ids))
        detach_lora(models, "b")
        assert set(attached_loras(models)) == {"a"}
        set_lora_scale(models, "a", 0.8)
        _assert_close(run_ours(models, inputs, ids), merged_refs[0.8])
    finally:
        detach_lora(models)
    assert attached_loras(models) == {}


def test_attach_never_touches_weights_and_detach_restores_base_exactly(setup):
    models, inputs, ids, base, mods, where, sd = setup
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    handle = attach_lora(models, sd, name="a", scale=1.5)
    for c, m in models.items():
        sd_now = m.state_dict()
        assert list(sd_now) == list(before[c])  # no new / renamed parameters or buffers
        assert all(torch.equal(sd_now[k], before[c][k]) for k in sd_now)
        m.load_state_dict(before[c], strict=True)  # strict loading still works with a LoRA attached
    handle.detach()
    handle.detach()  # idempotent
    out = run_ours(models, inputs, ids)
    for k in base:
        assert torch.equal(out[k], base[k]), k
    assert not handle.attached and handle.branches == {}


def test_branch_runs_in_the_base_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").to(torch.bfloat16)
    model = nn.ModuleDict({"lin": lin, "conv": conv})
    g = torch.Generator().manual_seed(1)
    sd = {
        "lora_unet_lin.lora_down.weight": torch.randn(2, 16, generator=g),
        "lora_unet_lin.lora_up.weight": torch.randn(8, 2, generator=g),
        "lora_unet_lin.alpha": torch.tensor(1.0, dtype=torch.float16),
        "lora_unet_conv.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
        "lora_unet_conv.lora_up.weight": torch.randn(6, 2, 1, 1, generator=g),
    }
    handle = attach_lora({"unet": model}, sd, name="x", scale=-1.5)
    x = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    xc = torch.randn(1, 4, 5, 5, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        y, yc = lin(x), conv(xc)
        down, up = (sd[f"lora_unet_lin.lora_{s}.weight"].to(torch.bfloat16) for s in ("down", "up"))
        handle.detach()
        expect = lin(x) + (x @ down.T * (-1.5 * 0.5)) @ up.T
        base_c = conv(xc)
    assert y.dtype == yc.dtype == torch.bfloat16
    assert torch.allclose(y.float(), expect.float(), rtol=2e-2, atol=2e-2)
    # reflect padding: the down conv pads like the base conv
    dc = sd["lora_unet_conv.lora_down.weight"].to(torch.bfloat16)
    uc = sd["lora_unet_conv.lora_up.weight"].to(torch.bfloat16)
    h = torch.nn.functional.conv2d(torch.nn.functional.pad(xc, (1, 1, 1, 1), mode="reflect"), dc)
    expect_c = base_c + torch.nn.functional.conv2d(h * -1.5, uc)
    assert torch.allclose(yc.float(), expect_c.float(), rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------------------------- errors


def test_no_match_lists_the_keys(setup):
    models, *_ = setup
    sd = make_kohya_state_dict({"lora_unet_input_blocks_99_1_proj_in": nn.Linear(64, 64)}, 2, lambda n, i: 1, 0)
    with pytest.raises(LoRAError, match=r"none of its 1 modules.*lora_unet_input_blocks_99_1_proj_in"):
        attach_lora(models, sd, name="bad")
    with pytest.raises(LoRAError, match="none of its 1 modules"):
        attach_lora(models, sd, name="bad", allow_partial=True)
    assert attached_loras(models) == {}


def test_partial_match_lists_keys_with_counts_and_allow_partial_warns(setup):
    models, inputs, ids, base, mods, where, _ = setup
    good = dict(list(mods.items())[:5])
    bad = {f"lora_unet_input_blocks_9{i}_0_in_layers_2": nn.Conv2d(4, 4, 3) for i in range(25)}
    sd = make_kohya_state_dict({**good, **bad}, 2, lambda n, i: 1.0, seed=5)
    with pytest.raises(LoRAError) as info:
        attach_lora(models, sd, name="p")
    msg = str(info.value)
    assert "25 of 30 LoRA modules match no module" in msg and "allow_partial=True" in msg
    assert "lora_unet_input_blocks_90_0_in_layers_2" in msg and "and 5 more" in msg  # capped at 20, with a count
    with pytest.warns(UserWarning, match="skipped 25 of 30"):
        handle = attach_lora(models, sd, name="p", scale=1.5, allow_partial=True)
    try:
        assert len(handle.branches) == 5
        ref = run_ours(merge_all(models, {n: where[n] for n in good}, sd, 1.5), inputs, ids)
        _assert_close(run_ours(models, inputs, ids), ref)
    finally:
        handle.detach()
    # a component that is not given counts as unmatched, with the reason
    te_only = make_kohya_state_dict({n: m for n, m in mods.items() if n.startswith("lora_te2")}, 2, lambda n, i: 1, 6)
    with pytest.raises(LoRAError, match="no model 'text_encoder_2' given"):
        attach_lora({"unet": models["unet"]}, te_only)


def test_shape_mismatch_names_module_and_shapes(setup):
    models, *_ = setup
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    sd = {f"{name}.lora_down.weight": torch.zeros(4, 65), f"{name}.lora_up.weight": torch.zeros(64, 4)}
    path = r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"
    with pytest.raises(LoRAError, match=path + r".*\(4, 65\)"):
        attach_lora(models, sd, name="s", allow_partial=True)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    sd = {f"{conv}.lora_down.weight": torch.zeros(4, 32, 1, 1), f"{conv}.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(LoRAError, match=r"kernel 3x3.*"):
        attach_lora(models, sd, name="s")
    assert attached_loras(models) == {}  # nothing half-attached


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", True, torch.tensor([1.0, 2.0])])
def test_invalid_scale_is_a_value_error(setup, bad):
    models, *_, sd = setup
    with pytest.raises(ValueError):
        attach_lora(models, sd, name="v", scale=bad)
    handle = attach_lora(models, sd, name="v", scale=torch.tensor(0.5))
    try:
        assert handle.scale == 0.5
        with pytest.raises(ValueError):
            set_lora_scale(handle, None, bad)
        with pytest.raises(ValueError):
            with lora_scale(handle, bad):
                pass
        assert handle.scale == 0.5
    finally:
        handle.detach()


def test_duplicate_name_and_unknown_name(setup):
    models, *_, sd = setup
    handle = attach_lora(models, sd, name="dup")
    try:
        with pytest.raises(LoRAError, match="already attached"):
            attach_lora(models, sd, name="dup")
        with pytest.raises(LoRAError, match=r"no LoRA named 'other'.*\['dup'\]"):
            set_lora_scale(models, "other", 1.0)
        with pytest.raises(LoRAError, match="not 'other'"):
            set_lora_scale(handle, "other", 1.0)
    finally:
        handle.detach()
