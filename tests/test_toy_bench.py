"""The toy benchmark: the quick preset end to end (its conclusions must hold) and the pieces it is built from.

Oracles: exact analytic Gaussian mixtures (toy.gmm, float64); scipy.stats.ttest_rel for the paired interval
(scipy version printed in the assertion messages); seeds are fixed in the suite (base seed 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import scipy
import torch
from scipy import stats

from toy import gmm as G
from toy.bench import cases as C
from toy.bench.methods import budget, method_set, plan
from toy.bench.report import W2SD_DEFAULT, W2SD_REFERENCE
from toy.bench.stats import LOSS, TIE, WIN, paired_interval
from w2sd.cli import main

CI_TOL = 1e-10              # paired interval vs scipy's ttest_rel confidence interval (same formula, float64)
EXPANSION_REL_TOL = 1e-11   # full-covariance fast path vs the einsum path (float64; measured ~3e-15)
MAX_PNG_BYTES = 200_000     # figures committed with the report must stay small
ALIGNED = ("1d_aligned", "2d_four_modes", "2d_ring8")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One run of `w2sd toy-bench --quick` (analytic cases; the learned pair is covered by test_learned.py)."""
    out = tmp_path_factory.mktemp("bench")
    torch_threads = torch.get_num_threads()
    try:
        rc = main(["toy-bench", "--quick", "--no-learned", "--out", str(out)])
    finally:
        torch.set_num_threads(torch_threads)
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    return {"out": out, "cases": {c["name"]: c for c in data["cases"]}, "settings": data["settings"]}


def _method(case: dict, key: str) -> dict:
    return next(m for m in case["methods"] if m["key"] == key)


def test_quick_writes_report_and_small_figures(quick):
    out: Path = quick["out"]
    text = (out / "report.md").read_text()
    assert "## Headline" in text and "wins on:" in text and "loses on:" in text
    pngs = sorted((out / "report_figures").glob("*.png"))
    assert {p.stem for p in pngs} >= set(quick["cases"]) | {"summary"}
    for p in pngs:
        assert p.stat().st_size < MAX_PNG_BYTES, p


@pytest.mark.parametrize("name", ALIGNED)
def test_w2sd_beats_strong_at_equal_nfe_on_aligned_cases(quick, name):
    case = quick["cases"][name]
    for key in (W2SD_DEFAULT, W2SD_REFERENCE):
        d = _method(case, key)["vs_strong"][case["primary"]]
        assert d["verdict"] == WIN and d["hi"] < 0, (name, key, d)


def test_every_improve_case_improves(quick):
    for case in quick["cases"].values():
        if case["expect"] == C.IMPROVE:
            assert _method(case, W2SD_DEFAULT)["vs_strong"][case["primary"]]["verdict"] == WIN, case["name"]


def test_negative_controls_do_not_improve(quick):
    controls = [c for c in quick["cases"].values() if c["control"]]
    assert len(controls) >= 4
    for case in controls:
        for m in case["methods"]:
            if m["family"] == "w2sd":
                assert m["vs_strong"][case["primary"]]["verdict"] in (TIE, LOSS), (case["name"], m["key"])


def test_equal_nfe_and_split(quick):
    for case in quick["cases"].values():
        for m in case["methods"]:
            assert m["nfe"] == m["nfe_strong"] + m["nfe_weak"] + m["nfe_real"]
            if m["equal_nfe"]:
                # rounding of steps: at most one step's worth away from the budget
                assert abs(m["nfe"] - case["budget"]) <= case["cost_strong"] + case["cost_weak"], (case["name"], m)
            if m["family"] == "strong":
                assert m["nfe_weak"] == 0


def test_refuses_to_overwrite_and_bad_case(quick, capsys):
    rc = main(["toy-bench", "--quick", "--no-learned", "--cases", "1d_aligned", "--out", str(quick["out"])])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["toy-bench", "--quick", "--cases", "no_such_case", "--out", str(quick["out"] / "x")])
    assert rc == 2 and "no_such_case" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- units
def test_paired_interval_matches_scipy_ttest_rel():
    a = [0.31, 0.29, 0.35, 0.30, 0.33]
    b = [0.52, 0.47, 0.55, 0.49, 0.50]
    iv = paired_interval(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert math.isclose(iv.lo, ci.low, abs_tol=CI_TOL) and math.isclose(iv.hi, ci.high, abs_tol=CI_TOL), scipy.__version__
    assert iv.verdict("w2") == WIN and iv.verdict("loglik") == LOSS
    assert paired_interval([1.0, 2.0], [1.5, 1.0]).verdict("w2") == TIE
    assert paired_interval([1.0], [2.0]).verdict("w2") == TIE  # one seed: no interval


def test_plan_spends_the_budget():
    assert budget(1, 1) == 148 and budget(2, 1) == 247
    by_key = {m.key: m for m in method_set()}
    p = plan(by_key["w2sd_exact_K1_f1"], 1, 1, 148)
    assert (p.steps, p.lam, p.nfe) == (50, 49, 148)
    p = plan(by_key["w2sd_exact_K2_f1"], 1, 1, 148)
    assert (p.steps, p.lam, p.nfe) == (30, 29, 146)
    p = plan(by_key["ag_w1"], 1, 1, 148)
    assert (p.steps, p.nfe_strong, p.nfe_weak) == (74, 74, 74)
    p = plan(by_key["strong"], 2, 1, 247)
    assert (p.steps, p.nfe) == (124, 248)


def test_tree_is_deterministic_with_hundreds_of_components():
    a, b = C.tree(), C.tree()
    assert a.real.num_components >= 200
    assert torch.equal(a.real.means, b.real.means) and torch.equal(a.strong_gmm.weights, b.strong_gmm.weights)
    assert bool((a.weak_gmm.weights > 0).all())
    x = a.real.sample(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.std(0), torch.ones(2, dtype=torch.float64), atol=0.05)  # unit per-axis std by design


def test_full_covariance_fast_path_matches_einsum(monkeypatch):
    case = C.tree()
    x = case.real.sample(300, torch.Generator().manual_seed(1)) + 0.05 * torch.randn(300, 2, dtype=torch.float64)
    fast_s, fast_l = case.real.score(x, 0.7), case.real.log_prob(x, 0.7)
    monkeypatch.setattr(G, "FULL_COV_EXPANSION_MIN_K", 10**9)
    ref = G.GaussianMixture(case.real.weights, case.real.means, covs=case.real.covs)
    ref_s, ref_l = ref.score(x, 0.7), ref.log_prob(x, 0.7)
    assert torch.allclose(fast_s, ref_s, rtol=EXPANSION_REL_TOL, atol=EXPANSION_REL_TOL * float(ref_s.abs().max()))
    assert torch.allclose(fast_l, ref_l, rtol=EXPANSION_REL_TOL, atol=EXPANSION_REL_TOL)


def test_guidance_gap_strong_is_cfg_pair():
    from w2sd.denoiser import nfe_of
    from toy.bench.suite import bench_schedule

    pair = C.guidance_gap().make_pair(bench_schedule())
    assert (nfe_of(pair.strong), nfe_of(pair.weak)) == (2, 1)
