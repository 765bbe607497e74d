"""`w2sd toy`: the main job, user cases, outputs and the one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from w2sd.cli import main

CASE = {
    "real": {"weights": [0.5, 0.5], "means": [[-4.0], [4.0]], "stds": [0.8, 0.8]},
    "strong": {"weights": [0.4, 0.6], "means": [[-4.0], [4.0]], "stds": [0.8, 0.8]},
    "weak": {"weights": [0.3, 0.7], "means": [[-4.0], [4.0]], "stds": [0.8, 0.8]},
}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_builtin_cases_write_metrics_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["toy", "--n", "1500", "--steps", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1d_two_peaks" in printed and "autoguidance" in printed and str(out) in printed
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["cases"]) == {"1d_two_peaks", "2d_four_modes", "1d_opposed_control", "2d_opposed_control"}
    methods = [m["method"] for m in report["cases"]["2d_four_modes"]["methods"]]
    assert methods[:4] == ["real", "strong", "weak", "w2sd"]
    nfe = {m["method"]: m["nfe"] for m in report["cases"]["1d_two_peaks"]["methods"]}
    assert nfe["w2sd"] == 20 + 2 * 19 and nfe["strong (equal NFE)"] == nfe["w2sd"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "2d_four_modes_scatter.png" in pngs and "1d_two_peaks_densities.png" in pngs and len(pngs) == 8
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_output_is_a_new_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "--n", "200", "--steps", "5", "--no-plots"]) == 0
    assert main(["toy", "--n", "200", "--steps", "5", "--no-plots"]) == 0
    runs = sorted((tmp_path / "w2sd_toy_out").iterdir())
    assert len(runs) == 2 and all((r / "metrics.json").exists() for r in runs)


def test_user_case_writes_samples(tmp_path):
    cfg = _write(tmp_path / "case.json", CASE)
    out = tmp_path / "out"
    assert main(["toy", "--config", str(cfg), "--n", "800", "--steps", "10", "--seed", "3", "--lam", "5",
                 "--inversion", "reference", "--out", str(out)]) == 0
    z = np.load(out / "samples.npz")
    assert sorted(z.files) == ["real", "strong", "w2sd", "weak"]
    assert all(z[k].shape == (800, 1) and z[k].dtype.kind == "f" for k in z.files)
    settings = json.loads((out / "metrics.json").read_text())["cases"]["case"]["settings"]
    assert settings["lam"] == 5 and settings["inversion"] == "reference" and settings["nfe_w2sd"] == 20


def test_existing_results_are_refused_without_overwrite(tmp_path, capsys):
    cfg = _write(tmp_path / "case.json", CASE)
    out = tmp_path / "out"
    args = ["toy", "--config", str(cfg), "--n", "100", "--steps", "3", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    before = (out / "samples.npz").read_bytes()
    assert main(args) == 2
    assert "already holds results" in capsys.readouterr().err
    assert (out / "samples.npz").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c["real"].update(weights=[0.6, 0.6]), "real.weights must sum to 1"),
    (lambda c: c["strong"].update(weights=[-0.5, 1.5]), "strong.weights must all be positive"),
    (lambda c: c["weak"].update(means=[[-4.0, 0.0], [4.0, 0.0]]), "different dimensions"),
    (lambda c: c["weak"].update(stds=[0.0, 1.0]), "weak.stds must all be positive"),
    (lambda c: c["real"].update(bogus=1), "unknown key(s) ['bogus'] in real"),
    (lambda c: c.update(extra={}), "unknown key(s) ['extra'] in case"),
    (lambda c: c["real"].pop("stds") and c["real"].update(covs=[[[1.0]], [[-1.0]]]), "real.covs[1] is not positive definite"),
    (lambda c: c["strong"].pop("weights"), "strong.weights is missing"),
    (lambda c: c["real"].update(means=[[-4.0], [4.0], [0.0]]), "real.means must be K=2"),
])
def test_invalid_case_json_names_the_field(tmp_path, capsys, mutate, field):
    case = json.loads(json.dumps(CASE))
    mutate(case)
    cfg = _write(tmp_path / "case.json", case)
    assert main(["toy", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1


def test_full_covariance_case_runs(tmp_path):
    case = {
        "real": {"weights": [0.5, 0.5], "means": [[-3, 0], [3, 0]], "covs": [[[1, 0.3], [0.3, 0.5]]] * 2},
        "strong": {"weights": [0.4, 0.6], "means": [[-3, 0], [3, 0]], "covs": [[[1, 0.3], [0.3, 0.5]]] * 2},
        "weak": {"weights": [0.3, 0.7], "means": [[-3, 0], [3, 0]], "covs": [[[1, 0.3], [0.3, 0.5]]] * 2},
    }
    out = tmp_path / "o"
    assert main(["toy", "--config", str(_write(tmp_path / "c.json", case)), "--n", "500", "--steps", "8",
                 "--out", str(out)]) == 0
    assert (out / "c_scatter.png").exists() and np.load(out / "samples.npz")["w2sd"].shape == (500, 2)


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    bad = _write(tmp_path / "bad.json", {"real": {}})
    for args, needle in [
        (["toy", "--config", str(bad)], "missing"),
        (["toy", "--config", str(tmp_path / "missing.json")], "case file not found"),
        (["toy", "--lam", "60", "--out", str(tmp_path / "x")], "lambda"),
        (["toy", "--steps", "0", "--out", str(tmp_path / "y")], "T must be an integer >= 1"),
    ]:
        p = subprocess.run([sys.executable, "-m", "w2sd.cli", *args], capture_output=True, text=True, env=env)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("w2sd: error:") and needle in p.stderr and "Traceback" not in p.stderr
        assert p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing created on bad input


def test_non_writable_output_folder(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/w2sd_cannot_write_here"  # root ignores mode bits; /proc refuses new folders
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    assert main(["toy", "--n", "100", "--steps", "3", "--out", target]) == 2
    assert "cannot create output folder" in capsys.readouterr().err or "not writable" in capsys.readouterr().err
