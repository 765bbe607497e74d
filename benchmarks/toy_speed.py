"""W2SD vs plain DDIM on a large analytic toy: 1,000,000 2-D samples from a 4-component GMM, 50 steps.

Prints samples*steps per second of both samplers and their time ratio, measured in the same process.
Targets (issue 2): W2SD under 10 s, and within 3.2x of plain DDIM (its NFE ratio is 148/50 = 2.96).

    python benchmarks/toy_speed.py [--n 1000000] [--steps 50] [--threads 2] [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toy.cases import four_modes_2d
from w2sd import ModelPair, NoiseSchedule, ddim_sample, w2sd_sample
from w2sd.table import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (the median is reported)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    case = four_modes_2d()
    s = NoiseSchedule.sdxl()
    ts = s.timesteps(args.steps)
    strong, weak = case.strong.denoiser(s), case.weak.denoiser(s)
    x = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ddim_sample(strong, x[:1000], ts, s)  # warm-up
    times: dict[str, list[float]] = {"plain DDIM": [], "W2SD": []}
    nfe = {}
    for _ in range(args.repeats):
        for name, fn in (("plain DDIM", lambda: ddim_sample(strong, x, ts, s)),
                         ("W2SD", lambda: w2sd_sample(ModelPair(strong, weak), x, ts, s))):
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            nfe[name] = res.nfe.total
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"sampler": k, "NFE": nfe[k], "seconds": med[k], "samples*steps/s": args.n * args.steps / med[k],
             "ratio vs plain": med[k] / med["plain DDIM"]} for k in med]
    print(f"N={args.n:,} 2-D samples, 4-component GMM, T={args.steps}, {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(format_table(rows, digits=3))
    print(f"NFE ratio {nfe['W2SD'] / nfe['plain DDIM']:.2f}; targets: W2SD < 10 s, time ratio <= 3.2")


if __name__ == "__main__":
    main()
