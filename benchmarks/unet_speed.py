"""Speed of ``w2sd.sdxl.unet.UNet2DConditionModel`` vs diffusers' ``UNet2DConditionModel`` (same config, same
weights, one process).

Both models are built on the meta device and receive the *same* random weight tensors (``assign=True``), so
weights are stored once. Each timed call is one full forward under ``torch.inference_mode``; the two models
alternate call by call (fairer under a drifting machine load); we report the median over ``--iters`` calls after
``--warmup`` calls each (wall time; the process CPU time is printed too, as it is less disturbed by other
load on a shared host -- on CUDA it only measures the launching thread). On CUDA every call is bracketed by
``torch.cuda.synchronize()`` and the peak memory of one forward is ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, also shown minus what was allocated before the call (weights, inputs).

Configs:
  tiny  the SDXL-topology tiny test config (sdxl.md §8.2), latent 32x32, batch 2, text 77x64.
  mid   SDXL topology at 1/5 width (64-128-256 channels, head dim 64), latent 32x32, batch 2, text 77x256.
  full  SDXL base 1.0 (sdxl.md §2.1), latent 128x128 (1024 px), batch 2, text 77x2048, pooled 1280, 6 time ids;
        meant for CUDA fp16 (``--config full`` defaults to ``--device cuda --dtype float16``).

Examples::

    python benchmarks/unet_speed.py --config tiny
    python benchmarks/unet_speed.py --config mid --iters 10
    python benchmarks/unet_speed.py --config full            # CUDA, fp16
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from w2sd.sdxl.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

SDXL_TOPOLOGY = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=2, use_linear_projection=True,
    addition_embed_type="text_time", flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4,
)
CONFIGS = {
    "tiny": dict(
        unet=dict(SDXL_TOPOLOGY, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 2, 2],
                  attention_head_dim=[2, 4, 4], cross_attention_dim=64, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, sample_size=32),
        batch=2, latent=(32, 32), seq=77, pooled=32),
    "mid": dict(
        unet=dict(SDXL_TOPOLOGY, block_out_channels=[64, 128, 256], transformer_layers_per_block=[1, 2, 2],
                  attention_head_dim=[1, 2, 4], cross_attention_dim=256, addition_time_embed_dim=32,
                  projection_class_embeddings_input_dim=256 + 6 * 32, norm_num_groups=32, sample_size=32),
        batch=2, latent=(32, 32), seq=77, pooled=256),
    "full": dict(
        unet=dict(SDXL_TOPOLOGY, block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                  attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
                  sample_size=128, act_fn="silu", addition_embed_type_num_heads=64, upcast_attention=None),
        batch=2, latent=(128, 128), seq=77, pooled=1280),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_state_dict(shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-scaled random weights: N(0, 1/fan_in) matrices/kernels, unit norm scales, small biases."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        sd[name] = t.to(device=device, dtype=dtype)
    return sd


def build_pair(config: dict, device: torch.device, dtype: torch.dtype):
    """Our model and diffusers' model on ``device``/``dtype``, sharing one set of random weight tensors."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(config))
        theirs = DiffusersUNet(**config)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    sd = random_state_dict(shapes, device, dtype)
    ours.load_state_dict(sd, strict=True, assign=True)
    theirs.load_state_dict(sd, strict=True, assign=True)
    for m in (ours, theirs):
        left = [n for n, t in (*m.named_parameters(), *m.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{type(m).__module__}: tensors left on the meta device: {left[:5]}")
    return ours.eval(), theirs.eval()


def make_inputs(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 1) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = spec["unet"]
    b, (h, w) = spec["batch"], spec["latent"]
    return dict(
        sample=torch.randn(b, cfg["in_channels"], h, w, generator=g).to(device, dtype),
        timestep=torch.tensor([999 - 500 * (i % 2) for i in range(b)], device=device),
        encoder_hidden_states=torch.randn(b, spec["seq"], cfg["cross_attention_dim"], generator=g).to(device, dtype),
        text_embeds=torch.randn(b, spec["pooled"], generator=g).to(device, dtype),
        time_ids=torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]] * b).to(device, dtype),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less disturbed by other load on the host."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_memory(fn, device: torch.device) -> tuple[float, float] | None:
    """(peak allocated GiB during one call, weights and inputs included; the part above what was allocated
    before the call) -- CUDA only."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak / 2**30, (peak - before) / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--full", action="store_true", help="shorthand for --config full")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for full, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float16 for full, else float32")
    p.add_argument("--iters", type=int, default=None, help="timed calls per model (default 20 tiny, 10 mid, 10 full)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    p.add_argument("--latent", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="override the config's latent size (e.g. a quick CPU smoke run of --config full)")
    args = p.parse_args(argv)
    name = "full" if args.full else args.config
    device = torch.device(args.device or ("cuda" if name == "full" else "cpu"))
    dtype = DTYPES[args.dtype or ("float16" if name == "full" else "float32")]
    iters = args.iters or {"tiny": 20, "mid": 10, "full": 10}[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2

    import diffusers

    spec = dict(CONFIGS[name])
    if args.batch:
        spec["batch"] = args.batch
    if args.latent:
        spec["latent"] = tuple(args.latent)
    ours, theirs = build_pair(spec["unet"], device, dtype)
    inp = make_inputs(spec, device, dtype)
    added = dict(text_embeds=inp["text_embeds"], time_ids=inp["time_ids"])

    def run_ours():
        return ours(**inp)

    def run_theirs():
        return theirs(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], added_cond_kwargs=added,
                      return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_theirs()
        rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for _ in range(args.warmup):
            run_ours()
            run_theirs()
        mem_ours, mem_theirs = peak_memory(run_ours, device), peak_memory(run_theirs, device)
        r_ours, r_theirs = [], []
        for _ in range(iters):
            r_ours.append(time_call(run_ours, device))
            r_theirs.append(time_call(run_theirs, device))
    t_ours, t_theirs = [r[0] for r in r_ours], [r[0] for r in r_theirs]
    c_ours, c_theirs = [r[1] for r in r_ours], [r[1] for r in r_theirs]

    med_o, med_t = statistics.median(t_ours), statistics.median(t_theirs)
    n_params = sum(p.numel() for p in ours.parameters())
    b, (h, w) = spec["batch"], spec["latent"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"UNet forward: config={name} ({n_params / 1e6:.1f} M params), latent {b}x4x{h}x{w}, "
          f"text {b}x{spec['seq']}x{spec['unet']['cross_attention_dim']}, {dtype}, {dev_name}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, median of {iters} after {args.warmup} "
          f"warmup; max rel output diff ours vs diffusers {rel:.2e}")
    rows = [("model", "median ms", "min ms", "median CPU ms", "peak GiB", "peak-above-weights GiB")]
    for label, ts, cs, mem in (("w2sd", t_ours, c_ours, mem_ours), ("diffusers", t_theirs, c_theirs, mem_theirs)):
        rows.append((label, f"{1e3 * statistics.median(ts):.2f}", f"{1e3 * min(ts):.2f}",
                     f"{1e3 * statistics.median(cs):.2f}", "-" if mem is None else f"{mem[0]:.3f}",
                     "-" if mem is None else f"{mem[1]:.3f}"))
    ratio_mem = ("-", "-") if mem_ours is None else (f"{mem_ours[0] / mem_theirs[0]:.3f}",
                                                     f"{mem_ours[1] / mem_theirs[1]:.3f}")
    rows.append(("ratio w2sd/diffusers", f"{med_o / med_t:.3f}", f"{min(t_ours) / min(t_theirs):.3f}",
                 f"{statistics.median(c_ours) / statistics.median(c_theirs):.3f}", *ratio_mem))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
