"""Peak memory of loading a UNet in float16 from a float32 and from a float16 safetensors file.

Each measurement runs in a fresh subprocess and reads the kernel's peak resident set size (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the imports where the kernel allows it).
Reported: weights bytes (the model in float16), peak RSS growth during the load, and their ratio. The target
for w2sd's loader (meta-device build + per-tensor reads straight to float16 + ``assign=True``) is < 1.3x.
Baseline in the same run: the naive path (build the model with random fp32 init, ``safetensors.torch.load_file``,
``load_state_dict``, ``.half()``).

Usage: ``python benchmarks/load_memory.py [--channels 128 256 512] [--depth 1 2 4] [--workdir DIR]``.
The default mid-size config (SDXL topology, 218 M parameters) writes an 871 MB fp32 and a 435 MB fp16 file.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_RATIO = 1.3


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def unet_config(channels: list[int], depth: list[int]) -> dict:
    from w2sd.sdxl.loading.configs import SDXL_BASE_UNET_CONFIG

    cfg = copy.deepcopy(SDXL_BASE_UNET_CONFIG)
    cfg.update(
        block_out_channels=channels,
        transformer_layers_per_block=depth,
        attention_head_dim=[c // 64 for c in channels],  # = heads, 64 channels each
        cross_attention_dim=1024,
    )
    return cfg


def write_files(workdir: Path, channels: list[int], depth: list[int]) -> None:
    """Random weights for the config, as unet_fp32.safetensors and unet_fp16.safetensors (+ config.json)."""
    from safetensors.torch import save_file

    from w2sd.sdxl.loading.models import builder
    from w2sd.sdxl.loading.strict import params_on_meta

    cfg = unet_config(channels, depth)
    (workdir / "config.json").write_text(json.dumps(cfg))
    with params_on_meta():
        shapes = {k: tuple(v.shape) for k, v in builder("unet", cfg)().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    save_file(sd, str(workdir / "unet_fp32.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(workdir / "unet_fp16.safetensors"))


def measure(method: str, file: Path, config_file: Path) -> dict:
    """Runs inside the fresh subprocess: load ``file`` to float16 with ``method``; peak RSS numbers in bytes."""
    cfg = json.loads(config_file.read_text())
    from safetensors.torch import load_file

    from w2sd.sdxl.loading import load_unet
    from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig

    import torch.nn.init  # noqa: F401  (all imports done before the baseline)

    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if method == "w2sd":
        model = load_unet(file, dtype=torch.float16, config=cfg)
    elif method == "naive":
        model = UNet2DConditionModel(UNetConfig.from_dict(cfg))
        model.load_state_dict(load_file(str(file)))
        model = model.half()
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert all(t.dtype == torch.float16 for t in model.state_dict().values())
    return {"weights": weights, "peak_delta": (hwm - rss0) * 1024, "seconds": seconds, "reset": reset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs=3, default=[128, 256, 512])
    parser.add_argument("--depth", type=int, nargs=3, default=[1, 2, 4])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=["w2sd", "naive"])
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        method, file, cfg = args._measure
        print(json.dumps(measure(method, Path(file), Path(cfg))))
        return

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="w2sd_load_memory_")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "unet_fp16.safetensors").exists():
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
                        "from benchmarks.load_memory import write_files; from pathlib import Path; "
                        "write_files(Path(%r), %r, %r)" % (str(REPO), str(workdir), args.channels, args.depth)],
                       check=True, cwd=REPO)
    sizes = {n: (workdir / f"unet_{n}.safetensors").stat().st_size for n in ("fp32", "fp16")}
    print(f"UNet channels {args.channels}, transformer depth {args.depth}; files: fp32 {sizes['fp32'] / 2**20:.0f} MiB, "
          f"fp16 {sizes['fp16'] / 2**20:.0f} MiB; target dtype float16; torch {torch.__version__}")
    header = f"{'method':<8} {'file':<6} {'weights MiB':>12} {'peak RSS +MiB':>14} {'ratio':>7} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    rows = {}
    for method in args.methods:
        for name in ("fp32", "fp16"):
            out = subprocess.run(
                [sys.executable, __file__, "--_measure", method, str(workdir / f"unet_{name}.safetensors"),
                 str(workdir / "config.json")],
                check=True, capture_output=True, text=True, cwd=REPO,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = r["peak_delta"] / r["weights"]
            rows[(method, name)] = ratio
            print(f"{method:<8} {name:<6} {r['weights'] / 2**20:>12.1f} {r['peak_delta'] / 2**20:>14.1f} "
                  f"{ratio:>6.2f}x {r['seconds']:>8.2f}" + ("" if r["reset"] else "  (VmHWM not reset)"))
    for name in ("fp32", "fp16"):
        if ("w2sd", name) in rows:
            verdict = "OK" if rows[("w2sd", name)] < TARGET_RATIO else "ABOVE TARGET"
            vs = f", naive/w2sd = {rows[('naive', name)] / rows[('w2sd', name)]:.2f}" if ("naive", name) in rows else ""
            print(f"w2sd from {name}: {rows[('w2sd', name)]:.2f}x weights (target < {TARGET_RATIO}x) {verdict}{vs}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
