"""Test oracle: the published W2SD loop (``w2sd_lora`` + ``reflection_operation``) re-implemented on diffusers +
peft, from the description in METHOD.md and research/sdxl.md §1.6 / paper.md §1.2-1.3 (no published code is
copied; it is not in this repo).

Per step i, t = timesteps[i], while i < T - 1:
  1. adapter weight = strong scale; eps_s = CFG(strong cfg) UNet(x, t); x1 = DDIMScheduler.step(eps_s, t, x)
  2. adapter weight = weak scale;   eps_w = CFG(weak cfg) UNet(x1, t)     (label t, input at level t_{i+1})
     x = DDIMInverseScheduler.step(eps_w, timesteps[i+1], x1)   (``inverse_at="next"``, the published call)
         or .step(eps_w, timesteps[i], x1)                      (``inverse_at="current"``, the exact inverse)
  3. adapter weight = main scale (LoRA disabled if 0)
then the main step: eps = CFG(guidance_scale) UNet(x, t); x = DDIMScheduler.step(eps, t, x).
CFG as published: any scale >= 0 runs the two-branch batch [uncond; cond] (scale 1.0 included). Prompts are
encoded once with the LoRA disabled. Both schedulers are built from the pipeline's scheduler config (SDXL's).
"""

from __future__ import annotations

import torch

INVERSE_AT = ("next", "current")


class UNetCallCounter:
    """Counts forward calls and batch items of a diffusers UNet (wraps ``unet.forward``)."""

    def __init__(self, unet) -> None:
        self.unet, self.calls, self.items = unet, 0, 0
        self._orig = unet.forward

        def counted(sample, *args, **kwargs):
            self.calls += 1
            self.items += sample.shape[0]
            return self._orig(sample, *args, **kwargs)

        unet.forward = counted

    def restore(self) -> None:
        self.unet.forward = self._orig


def set_adapter_weight(unet, adapter: str | None, weight: float) -> None:
    """Published: set the LoRA adapter's weight, or disable the LoRA when the weight is 0 (no-op without LoRA)."""
    if adapter is None:
        return
    if weight == 0:
        unet.disable_lora()
    else:
        unet.enable_lora()
        unet.set_adapters([adapter], [weight])  # UNet: weights=, pipeline: adapter_weights=


def published_w2sd(
    pipe,
    prompt: str,
    seed: int,
    height: int,
    width: int,
    num_steps: int,
    *,
    strong: tuple[float, float] = (1.5, 5.5),   # (LoRA scale, CFG scale), the demo's defaults
    weak: tuple[float, float] = (-1.5, 1.0),
    main: tuple[float, float] = (0.8, 5.5),
    adapter: str | None = "lora",
    negative_prompt: str | None = None,
    inverse_at: str = "next",
    reflect: bool = True,
) -> torch.Tensor:
    """Final latents (1, C, H/f, W/f) of the published loop (before VAE decoding, not divided by the scaling
    factor). ``reflect=False`` gives the plain DDIM loop with the main setting."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    if inverse_at not in INVERSE_AT:
        raise ValueError(inverse_at)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    inv_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    inv_scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    unet = pipe.unet
    dtype = unet.dtype

    with torch.no_grad():
        if adapter is not None:
            pipe.disable_lora()  # published: prompts encoded once with the LoRA disabled
        pe, ne, pooled, npooled = pipe.encode_prompt(
            prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pe.dtype)
        f = pipe.vae_scale_factor
        shape = (1, unet.config.in_channels, height // f, width // f)
        x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
        x = x * scheduler.init_noise_sigma

        def eps(latents: torch.Tensor, t, cfg: float) -> torch.Tensor:
            assert cfg >= 0, "the published code supports CFG >= 0 only"
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([ne, pe]),
                       added_cond_kwargs={"text_embeds": torch.cat([npooled, pooled]),
                                          "time_ids": torch.cat([time_ids, time_ids])},
                       return_dict=False)[0]
            u, c = out.chunk(2)
            return u + cfg * (c - u)

        set_adapter_weight(unet, adapter, main[0])
        for i, t in enumerate(timesteps):
            if reflect and i < len(timesteps) - 1:
                set_adapter_weight(unet, adapter, strong[0])
                x1 = scheduler.step(eps(x, t, strong[1]), t, x, eta=0.0, return_dict=False)[0]
                set_adapter_weight(unet, adapter, weak[0])
                e_w = eps(x1, t, weak[1])
                target = timesteps[i + 1] if inverse_at == "next" else timesteps[i]
                x = inv_scheduler.step(e_w, target, x1, return_dict=False)[0]
                set_adapter_weight(unet, adapter, main[0])
            x = scheduler.step(eps(x, t, main[1]), t, x, eta=0.0, return_dict=False)[0]
    return x


_LORA_FILES: dict = {}


def write_tiny_kohya_lora(folder, path, seed: int = 31, std: float = 0.05):
    """A random kohya LoRA (rank 4, alpha 2, LoCon convs, both text encoders) for the tiny SDXL in ``folder``,
    built with the LoRA tests' helpers (``test_lora_models``) and saved as safetensors at ``path``. One file per
    (folder, seed, std) per pytest session: later calls return the first path."""
    key = (str(folder), seed, std)
    if key in _LORA_FILES:
        return _LORA_FILES[key]
    from safetensors.torch import save_file

    from test_lora_models import kohya_targets, make_kohya_state_dict
    from w2sd.sdxl.loading import load_sdxl_components

    c = load_sdxl_components(folder)
    mods, _ = kohya_targets({"unet": c.unet, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2})
    sd = make_kohya_state_dict(mods, rank=4, alpha=lambda n, i: 2.0, seed=seed, std=std, conv_rank=4)
    save_file(sd, str(path))
    _LORA_FILES[key] = path
    return path
