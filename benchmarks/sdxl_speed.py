"""Seconds per DDIM step of plain sampling, W2SD, and the published W2SD loop (diffusers + peft), same process.

All runs share ONE set of random UNet weights (``unet_speed.build_pair``: our UNet and diffusers' UNet get the same
tensors) and one random LoRA (peft adapter on diffusers' UNet, the same tensors attached to ours through a PEFT
state dict), random prompt embeddings, the SDXL schedule, the demo's settings:
main step LoRA 0.8 / CFG 5.5, strong LoRA 1.5 / CFG 5.5, weak LoRA -1.5 / CFG 1.0, lambda = T - 1.

Rows:
  plain       ours: DDIM with the main setting (2 UNet batch items per step)
  w2sd        ours: W2SD, weak CFG 1.0 runs the conditional branch only (5 items per reflecting step)
  w2sd_batch2 ours, but every CFG call runs both branches as the published code does (6 items): isolates the
              algorithmic saving from UNet-implementation speed
  published   the published loop on diffusers' UNet + peft ``set_adapters`` + DDIM(Inverse)Scheduler (6 items)
Ratios: w2sd / plain vs the UNet-item ratio (target <= item ratio x 1.05) and published / w2sd (target: w2sd at
least 15% faster, i.e. w2sd / published <= 0.85 at the demo defaults). The items only set the cost when a batch-1
UNet call costs half a batch-2 call; the last line times both and prints the ratios those costs predict, so the
sampler's own overhead (the gap between measured and predicted) is visible on small, overhead-bound configs too.

    python benchmarks/sdxl_speed.py                     # CPU, tiny config (a smoke run of every code path)
    python benchmarks/sdxl_speed.py --config mid --T 4   # CPU, bigger
    python benchmarks/sdxl_speed.py --full              # SDXL base UNet, 1024 px, fp16, CUDA
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from unet_speed import CONFIGS, DTYPES, build_pair  # noqa: E402

from w2sd.denoiser import ModelPair  # noqa: E402
from w2sd.lora import attach_lora, load_lora  # noqa: E402
from w2sd.sampler import sample  # noqa: E402
from w2sd.schedule import NoiseSchedule  # noqa: E402
from w2sd.sdxl.denoiser import SDXLConditioning, SDXLDenoiser  # noqa: E402
from w2sd.sdxl.prompt import PromptEmbeds  # noqa: E402
from w2sd.table import format_table  # noqa: E402

DEMO = dict(main=(0.8, 5.5), strong=(1.5, 5.5), weak=(-1.5, 1.0))  # (LoRA scale, CFG scale)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading")


def add_lora(theirs, ours, rank: int, seed: int = 3):
    """A random peft LoRA on diffusers' UNet and the same tensors attached to ours (PEFT file format)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    theirs.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False),
                       adapter_name="lora")
    with torch.no_grad():  # keep the random LoRA's update small (no overflow / denormals at scales 1.5 and -1.5)
        for name, param in theirs.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.01)
    sd = get_peft_model_state_dict(theirs, adapter_name="lora")
    lora = load_lora({"unet." + k: v.float().cpu() for k, v in sd.items()})
    return attach_lora({"unet": ours}, lora, name="lora")


def conditioning(spec: dict, device, dtype, seed: int = 1) -> tuple[PromptEmbeds, torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(seed)
    cross, seq, pooled = spec["unet"]["cross_attention_dim"], spec["seq"], spec["pooled"]
    pe = torch.randn(1, seq, cross, generator=g).to(device, dtype)
    pp = torch.randn(1, pooled, generator=g).to(device, dtype)
    h, w = spec["latent"]
    ids = torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]], device=device, dtype=dtype)
    return PromptEmbeds(pe, pp, torch.zeros_like(pe), torch.zeros_like(pp)), ids


def published_loop(unet, embeds: PromptEmbeds, ids, x, num_steps: int, reflect: bool = True) -> torch.Tensor:
    """The published loop (see tests/helpers_published_w2sd.py): peft adapter weights switched per call, CFG as a
    batch of 2 for every call, DDIMScheduler + DDIMInverseScheduler.step(eps, timesteps[i+1], x1)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    sch, inv = DDIMScheduler(**SDXL_SCHEDULER), DDIMInverseScheduler(**SDXL_SCHEDULER)
    sch.set_timesteps(num_steps)
    inv.set_timesteps(num_steps)
    ts = sch.timesteps
    hs = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])
    added = {"text_embeds": torch.cat([embeds.negative_pooled, embeds.pooled]), "time_ids": torch.cat([ids, ids])}

    def eps(z, t, cfg):
        u, c = unet(torch.cat([z, z]), t, encoder_hidden_states=hs, added_cond_kwargs=added,
                    return_dict=False)[0].chunk(2)
        return u + cfg * (c - u)

    unet.set_adapters(["lora"], [DEMO["main"][0]])
    for i, t in enumerate(ts):
        if reflect and i < len(ts) - 1:
            unet.set_adapters(["lora"], [DEMO["strong"][0]])
            x1 = sch.step(eps(x, t, DEMO["strong"][1]), t, x, return_dict=False)[0]
            unet.set_adapters(["lora"], [DEMO["weak"][0]])
            x = inv.step(eps(x1, t, DEMO["weak"][1]), ts[i + 1], x1, return_dict=False)[0]
            unet.set_adapters(["lora"], [DEMO["main"][0]])
        x = sch.step(eps(x, t, DEMO["main"][1]), t, x, return_dict=False)[0]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--full", action="store_true", help="SDXL base UNet, 128x128 latents, fp16, CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--T", type=int, default=None, help="DDIM steps per timed run (default 10 full, 4 otherwise)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method (the median is reported)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--latent", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.full:
        args.config = "full"
    full = args.config == "full"
    device = torch.device(args.device or ("cuda" if full else "cpu"))
    dtype = DTYPES[args.dtype or ("float16" if full else "float32")]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sdxl_speed: CUDA requested but not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    T = args.T or (10 if full else 4)
    spec = dict(CONFIGS[args.config])
    if args.latent:
        spec["latent"] = tuple(args.latent)

    t0 = time.perf_counter()
    ours, theirs = build_pair(spec["unet"], device, dtype)
    handle = add_lora(theirs, ours, args.rank)
    embeds, ids = conditioning(spec, device, dtype)
    cond = SDXLConditioning(embeds, ids)
    schedule = NoiseSchedule.from_config(SDXL_SCHEDULER, coefficients="float32")
    timesteps = schedule.timesteps(T)
    x0 = torch.randn((1, 4, *spec["latent"]), generator=torch.Generator("cpu").manual_seed(5555), dtype=dtype).to(device)
    print(f"built in {time.perf_counter() - t0:.1f} s: config {args.config}, latent {spec['latent']}, {dtype}, "
          f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), T={T}, "
          f"LoRA rank {args.rank} on {len(handle.branches)} modules, torch {torch.__version__}")

    def den(role: str, batch2: bool = False) -> SDXLDenoiser:
        lora, cfg = DEMO[role]
        d = SDXLDenoiser(ours, cond, cfg, lora=handle, lora_scale=lora, name=role)
        if batch2:
            d.branches, d.nfe_per_call = "both", 2  # the published CFG: two branches even at scale 1 / 0
        return d

    def ours_run(reflect: bool, batch2: bool = False):
        def go():
            pair = ModelPair(den("strong", batch2), den("weak", batch2)) if reflect else None
            return sample(den("main", batch2), x0, timesteps, schedule, pair=pair, inversion="reference",
                          step_targets="diffusers").x
        return go

    methods = {
        "plain": (ours_run(False), 2 * T),
        "w2sd": (ours_run(True), 2 * T + 3 * (T - 1)),
        "w2sd_batch2": (ours_run(True, batch2=True), 2 * T + 4 * (T - 1)),
        "published": (lambda: published_loop(theirs, embeds, ids, x0, T), 2 * T + 4 * (T - 1)),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    with torch.inference_mode():
        outputs = {}
        for name, (fn, _) in methods.items():  # warm-up (kernels, allocator, cuDNN autotune), outputs kept
            outputs[name] = fn().float()
        for _ in range(args.repeats):
            for name, (fn, _) in methods.items():
                times[name].append(_timed(fn, device))
        # cost model: one UNet call at batch 1 (CFG 1) and at batch 2 (CFG 5.5), each timed 3 times
        t_mid = timesteps[len(timesteps) // 2]
        c1 = sorted(_timed(lambda: den("weak")(x0, t_mid), device) for _ in range(3))[1]
        c2 = sorted(_timed(lambda: den("main")(x0, t_mid), device) for _ in range(3))[1]
    sec = {k: sorted(v)[len(v) // 2] / T for k, v in times.items()}
    rows = [dict(method=k, items_per_image=items, s_per_step=sec[k], vs_plain=sec[k] / sec["plain"],
                 items_vs_plain=items / methods["plain"][1]) for k, (_, items) in methods.items()]
    print(format_table(rows, digits=4))
    items_ratio = methods["w2sd"][1] / methods["plain"][1]
    r_plain = sec["w2sd"] / sec["plain"]
    r_pub = sec["w2sd"] / sec["published"]
    r_b2 = sec["w2sd"] / sec["w2sd_batch2"]
    print(f"w2sd / plain       = {r_plain:.3f}  (UNet-item ratio {items_ratio:.3f}; target <= {1.05 * items_ratio:.3f}): "
          f"{'OK' if r_plain <= 1.05 * items_ratio else 'MISSED'}")
    print(f"w2sd / published   = {r_pub:.3f}  (target <= 0.85, i.e. >= 15% faster): {'OK' if r_pub <= 0.85 else 'MISSED'}"
          f"; published / w2sd = {1 / r_pub:.3f}")
    print(f"w2sd / w2sd_batch2 = {r_b2:.3f}  (same UNet; item ratio "
          f"{methods['w2sd'][1] / methods['w2sd_batch2'][1]:.3f})")
    ref = outputs["published"]
    diff = {k: ((outputs[k] - ref).abs().max() / ref.abs().max()).item() for k in ("w2sd", "w2sd_batch2")}
    print(f"agreement with the published loop (max rel diff of final latents): w2sd {diff['w2sd']:.2e}, "
          f"w2sd_batch2 {diff['w2sd_batch2']:.2e} ({dtype}; our UNet vs diffusers' with the same weights)")
    lam = T - 1
    w2sd_cost, plain_cost, pub_cost = T * c2 + lam * (c2 + c1), T * c2, T * c2 + 2 * lam * c2
    print(f"UNet call: batch 1 {c1 * 1e3:.1f} ms, batch 2 {c2 * 1e3:.1f} ms (batch-1 / batch-2 = {c1 / c2:.3f}); "
          f"from these costs w2sd / plain should be {w2sd_cost / plain_cost:.3f} and w2sd / published-on-our-UNet "
          f"{w2sd_cost / pub_cost:.3f}")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
