"""``w2sd toy``: run the built-in toy cases (no arguments) or a user case (``--config CASE.json``)."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from w2sd.outputs import atomic_save_figure, atomic_write, atomic_write_json, new_run_dir, prepare_output_dir
from w2sd.table import format_table

DEFAULT_PARENT = "w2sd_toy_out"
COLUMNS = ["method", "nfe", "steps", "mode_tv", "w1", "w2", "sliced_w2", "loglik", "off_manifold"]
HEADERS = {"mode_tv": "mode TV", "sliced_w2": "sliced W2", "loglik": "mean loglik", "off_manifold": "off-manifold",
           "w1": "W1", "w2": "W2", "nfe": "NFE"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help='a CASE.json {"real": M, "strong": M, "weak": M}; without it the built-in cases run')
    p.add_argument("--n", type=int, default=20_000, help="samples per method (default 20000)")
    p.add_argument("--steps", "--T", dest="steps", type=int, default=50, help="DDIM steps T (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial noise (default 0)")
    p.add_argument("--lam", type=int, default=None, help="reflect on the first LAM steps (default T-1)")
    p.add_argument("--rounds", type=int, default=1, help="reflections per reflecting step K (default 1)")
    p.add_argument("--inversion", choices=("exact", "reference"), default="exact",
                   help="exact (paper, default) or reference (published code's inversion levels)")
    p.add_argument("--ag-weight", type=float, default=1.0,
                   help="autoguidance weight w of the equal-NFE baseline (default 1, the first-order match)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: a new run folder under ./{DEFAULT_PARENT}/)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: toy tensors are too small to gain from more)")


def _result_names(case_names: list[str], dims: list[int], config_mode: bool) -> list[str]:
    names = ["metrics.json"] + (["samples.npz"] if config_mode else [])
    for name, d in zip(case_names, dims):
        names += [f"{name}_densities.png", f"{name}_trajectories.png"] if d == 1 else \
                 [f"{name}_scatter.png", f"{name}_trajectories.png"]
    return names


def run(args: argparse.Namespace) -> int:
    from .case_config import load_case
    from .cases import builtin_cases
    from .run import run_case

    import torch

    if args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    # Validate everything before any folder is created.
    from w2sd.sampler import resolve_reflect_steps
    from w2sd.schedule import NoiseSchedule

    NoiseSchedule.sdxl().timesteps(args.steps)
    resolve_reflect_steps(args.steps, args.lam)
    if args.rounds < 1:
        raise ValueError(f"--rounds (reflections per step, K) must be >= 1, got {args.rounds}")
    cases = [load_case(args.config)] if args.config is not None else builtin_cases()
    expected = _result_names([c.name for c in cases], [c.dim for c in cases], args.config is not None)
    out = (prepare_output_dir(args.out, expected, overwrite=args.overwrite) if args.out is not None
           else new_run_dir(DEFAULT_PARENT, prefix="toy"))
    report: dict = {"cases": {}}
    t0 = time.perf_counter()
    for case in cases:
        result = run_case(case, n=args.n, steps=args.steps, seed=args.seed, lam=args.lam, inversion=args.inversion,
                          rounds=args.rounds, autoguidance_weight=args.ag_weight)
        rows = result.table_rows()
        flag = "  [negative control: W2SD should not help]" if case.control else ""
        print(f"\n{case.name}: {case.description}{flag}")
        print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)], HEADERS))
        report["cases"][case.name] = {"description": case.description, "control": case.control,
                                      "settings": result.settings, "methods": rows,
                                      "models": {k: getattr(case, k).to_dict() for k in ("real", "strong", "weak")}}
        if args.config is not None:
            arrays = {k: result.runs[k].samples.numpy() for k in ("real", "strong", "weak", "w2sd")}

            def write_npz(f, arrays=arrays):
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                f.write(buf.getvalue())

            atomic_write(out / "samples.npz", write_npz)
        if not args.no_plots:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from .plots import figures_for_case

            for fname, fig in figures_for_case(result).items():
                atomic_save_figure(fig, out / fname)
                plt.close(fig)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / "metrics.json", report)
    print(f"\nwrote metrics.json{'' if args.no_plots else ' and PNG figures'} to {out}  ({report['seconds']} s)")
    return 0
