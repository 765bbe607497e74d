"""``w2sd toy-bench``: every sampler at equal NFE on the analytic and learned toy cases; writes a markdown
report with tables, PNG figures and the raw numbers (JSON)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_PARENT = "w2sd_toy_out"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("full", "quick"), default="full",
                   help="full: every method sweep, 5 seeds (a few minutes); quick: reduced set, 3 seeds (< 1 min)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: a new run folder under ./{DEFAULT_PARENT}/)")
    p.add_argument("--name", default="report",
                   help="file stem of the results: NAME.md, NAME.json, NAME_figures/ (default: report)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--seeds", type=int, default=None, help="seeds per case (default: the preset's)")
    p.add_argument("--n", type=int, default=None, help="samples per seed (default: the preset's, scaled per case)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all of the preset)")
    p.add_argument("--no-learned", action="store_true", help="skip the learned MLP pair")
    p.add_argument("--learned-dir", type=Path, default=None,
                   help="where the learned pair is cached (default: OUT/learned_pair); trained when missing")
    p.add_argument("--retrain", action="store_true", help="train the learned pair even if cached")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: toy tensors are small and the machine may be shared)")


def run(args: argparse.Namespace) -> int:
    import torch

    from w2sd.outputs import atomic_save_figure, atomic_write, new_run_dir, prepare_output_dir

    from .. import learned as L
    from .report import forest_rows, render
    from .suite import PRESETS, BenchConfig, bench_schedule, run_suite

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not args.name or any(c in args.name for c in "/\\") or args.name.startswith("."):
        raise ValueError(f"--name must be a plain file stem, got {args.name!r}")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    config = BenchConfig(preset=args.preset, n=args.n, seeds=args.seeds, seed=args.seed, cases=cases,
                         learned=not args.no_learned)
    torch.set_num_threads(args.threads)
    fig_dir = f"{args.name}_figures"
    expected = [f"{args.name}.md", f"{args.name}.json", fig_dir]
    out = (prepare_output_dir(args.out, expected, overwrite=args.overwrite) if args.out is not None
           else new_run_dir(DEFAULT_PARENT, prefix="bench"))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    schedule = bench_schedule()
    learned_factory = None
    want_learned = config.learned and (cases is None or "learned_ring8" in cases)
    if want_learned:
        quick = args.preset == "quick"
        folder = args.learned_dir if args.learned_dir is not None else out / "learned_pair"
        log(f"learned pair: loading or training in {folder}")
        cached = [folder / f"{role}.safetensors" for role in ("strong", "weak")]
        if args.learned_dir is not None and not args.retrain and all(p.is_file() for p in cached):
            # an explicitly given pair is used whatever its training config (reported in the case description)
            t1 = time.perf_counter()
            pair = L.LearnedPair(L.load(cached[0]), L.load(cached[1]), False, time.perf_counter() - t1)
        else:
            pair = L.load_or_train_pair(folder, L.ring_data(), schedule,
                                        strong=L.STRONG_QUICK if quick else L.STRONG,
                                        weak=L.WEAK_QUICK if quick else L.WEAK, retrain=args.retrain, log=log)
        log(f"learned pair: {'trained' if pair.trained else 'loaded'} in {pair.seconds:.1f} s")
        learned_factory = lambda: L.learned_case(pair)  # noqa: E731
    results = run_suite(config, log=log, learned_case=learned_factory)
    seconds = time.perf_counter() - t0
    argv = " ".join(sys.argv[1:]) if sys.argv[1:2] == ["toy-bench"] else None
    settings = {
        "command": "w2sd " + (argv or f"toy-bench --preset {args.preset}"),
        "preset": args.preset, "seconds": seconds, "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "seeds": config.setting("seeds"), "n": config.setting("n"),
        "schedule": "DDPM linear betas 1e-4..0.02, 1000 train steps, trailing timesteps, final alpha_bar 1",
        "preset_settings": PRESETS[args.preset],
    }
    summaries = [r.summary for r in results]
    if not args.no_plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .figures import case_figure, forest_figure

        (out / fig_dir).mkdir(exist_ok=True)
        for r in results:
            fig = case_figure(r.case, r.samples, title=f"{r.case.name} (seed 0): real floor / strong / AG w=1 / W2SD")
            atomic_save_figure(fig, out / fig_dir / f"{r.case.name}.png", dpi=60)
            plt.close(fig)
        fig = forest_figure(forest_rows(summaries))
        atomic_save_figure(fig, out / fig_dir / "summary.png", dpi=80)
        plt.close(fig)
    settings["seconds"] = time.perf_counter() - t0
    text = render(summaries, settings, None if args.no_plots else fig_dir)
    atomic_write(out / f"{args.name}.md", lambda f: f.write(text.encode("utf-8")))
    payload = json.dumps(_rounded({"settings": settings, "cases": summaries}), separators=(",", ":")).encode("utf-8")
    atomic_write(out / f"{args.name}.json", lambda f: f.write(payload))
    log(f"wrote {args.name}.md, {args.name}.json{'' if args.no_plots else f' and {fig_dir}/'} to {out} "
        f"({settings['seconds']:.1f} s)")
    return 0


def _rounded(obj, digits: int = 6):
    """Floats rounded to ``digits`` significant digits (keeps the JSON small; the CIs are far wider)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj
