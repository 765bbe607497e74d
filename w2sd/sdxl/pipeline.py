"""SDXL text-to-image with our DDIM, plain or with W2SD reflections for any weak-to-strong pair.

    pipe = SDXLPipeline.load("stabilityai/stable-diffusion-xl-base-1.0", lora_path="xlMoreArt.safetensors",
                             dtype=torch.float16, device="cuda")
    main = Setting(model="main", lora_scale=0.8, guidance_scale=5.5, prompt="a cat")
    plain = pipe.generate(main, seeds=[5555], size=(1024, 1024), num_steps=50)
    w2sd = pipe.generate(main, seeds=[5555], size=(1024, 1024), num_steps=50,
                         pair=lora_pair(1.5, -1.5, strong_guidance=5.5, weak_guidance=1.0), inversion="reference")
    images = pipe.decode(w2sd.latents)                                   # (B, 3, H, W) in [0, 1]

What matches diffusers (sdxl.md §3.3-3.4, METHOD.md) and what does not:
- Initial latents: one ``torch.randn((1, C, H/f, W/f), generator=torch.Generator("cpu").manual_seed(seed),
  dtype=dtype)`` per seed (f = the VAE's scale factor, 8 for SDXL), concatenated, then moved to the device:
  diffusers' draw for a list of CPU generators (for one seed also its draw for one generator). DDIM init sigma 1.
- Prompts: ``encode_prompt`` (force_zeros_for_empty_prompt from model_index.json), time ids [H, W, 0, 0, H, W].
  Plain sampling encodes with the LoRA at the main step's scale, as ``StableDiffusionXLPipeline`` does after
  ``set_adapters``; W2SD encodes every member's prompt with the LoRA disabled, as the published code does
  (``pipe.disable_lora()`` before ``w2sd_lora``). This matters only for LoRAs that touch the text encoders.
  Each distinct (text encoders, prompt, negative prompt, LoRA state) is encoded once per ``generate`` call.
- DDIM with diffusers' float32 coefficients and its ``t - 1000 // T`` step targets (= the grid for SDXL's
  "leading" spacing), eta 0.
- CFG follows eps_u + s (eps_c - eps_u) for every scale, one batched UNet call for both branches; scale 1 runs
  only the conditional branch, 0 only the unconditional one. (diffusers' pipeline skips CFG for any s <= 1 and
  returns eps_c, so plain images at 0 < s < 1 or s < 0 differ from its output; s = 1 and s > 1 agree.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from w2sd.denoiser import ModelPair
from w2sd.errors import ConfigError
from w2sd.sampler import NFE, sample
from w2sd.schedule import NoiseSchedule
from w2sd.sdxl.denoiser import SDXLConditioning, SDXLDenoiser
from w2sd.sdxl.pairs import MAIN_MODEL, OFF, WEAK_MODEL, Pair, Setting, resolve
from w2sd.sdxl.prompt import PromptEmbeds, add_time_ids, encode_prompt

__all__ = ["SDXLPipeline", "Generation", "initial_latents", "share_equal_modules"]

SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")


def initial_latents(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype,
                    device: torch.device | str) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal latents, each row drawn from its own CPU generator seeded with
    its seed (diffusers' ``randn_tensor`` with CPU generators), then moved to ``device``."""
    rows = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        g = torch.Generator("cpu").manual_seed(seed)
        rows.append(torch.randn((1, *shape), generator=g, dtype=dtype))
    if not rows:
        raise ValueError("seeds: give at least one seed")
    return torch.cat(rows).to(device)


def share_equal_modules(main, weak, names: Iterable[str] = SHARED_COMPONENTS) -> list[str]:
    """Point ``weak.<name>`` at ``main.<name>`` where both hold modules of the same class with identical tensors
    (a fine-tune that kept SDXL's text encoders / VAE); the duplicate is freed. Shared text encoders take their
    tokenizer along. Returns the shared names."""
    shared = []
    for name in names:
        a, b = getattr(main, name, None), getattr(weak, name, None)
        if a is None or b is None or a is b or type(a) is not type(b):
            continue
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or not all(
            sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
        ):
            continue
        setattr(weak, name, a)
        if name.startswith("text_encoder"):
            tok = "tokenizer" + name[len("text_encoder"):]
            setattr(weak, tok, getattr(main, tok))
        shared.append(name)
    return shared


@dataclass
class Generation:
    """The result of one sampling run (one batch of seeds)."""

    latents: torch.Tensor              # (B, C, H/f, W/f) final latents, before dividing by the VAE scaling factor
    seeds: list[int]
    nfe: NFE                           # model evaluations per sample, by role (CFG counts 2)
    unet_calls: int                    # UNet forward calls
    unet_items: int                    # UNet batch items (= nfe.total * B)
    seconds: float
    settings: dict = field(default_factory=dict)   # main / strong / weak settings as dicts
    model: str = MAIN_MODEL            # whose VAE decodes these latents


class SDXLPipeline:
    """One or two loaded SDXL checkpoints (``w2sd.sdxl.loading.SDXLComponents``), an optional LoRA on the main
    one, our DDIM schedule, and the W2SD sampler.

    Args:
        main: the main (strong) checkpoint's components.
        weak: a second checkpoint for full-model pairs (``--weak_model``), or None.
        lora: a ``w2sd.lora.LoRAHandle`` attached to ``main``'s modules, or None.
        coefficients: DDIM coefficient precision, "float32" reproduces diffusers' schedulers bit for bit.
    """

    def __init__(self, main, weak=None, lora=None, *, coefficients: str = "float32") -> None:
        for name, comps in ((MAIN_MODEL, main), (WEAK_MODEL, weak)):
            if comps is not None and (comps.text_encoder is None or comps.tokenizer is None):
                raise ConfigError(f"the {name} model ({comps.source}) is an SDXL refiner (one text encoder, "
                                  "aesthetic-score ids); W2SD text-to-image needs an SDXL base-type model")
        self.models = {MAIN_MODEL: main} | ({WEAK_MODEL: weak} if weak is not None else {})
        self.lora = lora
        self.schedule = NoiseSchedule.from_config(main.scheduler_config, coefficients=coefficients)
        self._text_lora = lora is not None and any(slot.startswith("text_encoder") for slot in lora.branches)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model, weak_model=None, lora_path=None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", variant: str | None = None, config=None, lora_name: str = "lora",
             coefficients: str = "float32") -> "SDXLPipeline":
        """Load the main checkpoint (folder, HF cache entry or single file), optionally a weak checkpoint (its
        text encoders / VAE are shared with the main one when identical) and a LoRA attached to the main one.
        ``config``: a diffusers folder whose configs / tokenizers are used for single-file checkpoints (default:
        the built-in SDXL base configs); folders carry their own."""
        from w2sd.lora import attach_lora, load_lora
        from w2sd.sdxl.loading import load_sdxl_components, resolve_pretrained_path

        def load_one(path):
            single = resolve_pretrained_path(path).is_file()
            return load_sdxl_components(path, dtype=dtype, device=device, variant=variant,
                                        config=config if single else None)

        lora = load_lora(lora_path) if lora_path is not None else None  # parse the small file first
        main = load_one(model)
        weak = None
        if weak_model is not None:
            weak = load_one(weak_model)
            share_equal_modules(main, weak)
        handle = None
        if lora is not None:
            targets = {"unet": main.unet, "text_encoder": main.text_encoder, "text_encoder_2": main.text_encoder_2}
            handle = attach_lora({k: v for k, v in targets.items() if v is not None}, lora, name=lora_name, scale=OFF)
        return cls(main, weak, handle, coefficients=coefficients)

    # ------------------------------------------------------------------ properties
    @property
    def unet(self) -> torch.nn.Module:
        return self.models[MAIN_MODEL].unet

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.models[MAIN_MODEL].vae.scale_factor)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f); ``ValueError`` when the size is not a multiple of the VAE factor f."""
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"image {name} must be a positive multiple of {f} (the VAE's scale factor), got {v!r}")
        return (int(self.unet.config.in_channels), height // f, width // f)

    # ------------------------------------------------------------------ conditioning
    def _component(self, model: str):
        if model not in self.models:
            raise ValueError(f"no {model!r} model is loaded (a full-model pair needs --weak_model)")
        return self.models[model]

    def encode(self, model: str, prompt: str, negative_prompt: str | None, lora_scale: float | None,
               cache: dict | None = None) -> PromptEmbeds:
        """Prompt embeddings of one prompt with ``model``'s text encoders, the LoRA at ``lora_scale`` while
        encoding (None: as it is). ``cache`` (a dict) avoids encoding the same thing twice."""
        comps = self._component(model)
        encoders = (comps.text_encoder, comps.text_encoder_2)
        hooked = self._text_lora and comps.text_encoder_2 is self.models[MAIN_MODEL].text_encoder_2
        scale = lora_scale if hooked else None
        key = (id(encoders[0]), id(encoders[1]), prompt, negative_prompt, scale)
        if cache is not None and key in cache:
            return cache[key]
        previous = self.lora.scale if self.lora is not None else None
        try:
            if scale is not None:
                self.lora.scale = scale
            embeds = encode_prompt(prompt, negative_prompt, [comps.tokenizer, comps.tokenizer_2], list(encoders),
                                   comps.force_zeros_for_empty_prompt, device=self.device)
        finally:
            if self.lora is not None:
                self.lora.scale = previous
        if cache is not None:
            cache[key] = embeds
        return embeds

    def denoiser(self, setting: Setting, negative_prompt: str | None, height: int, width: int, *,
                 encode_lora_scale: float | None, cache: dict | None = None, name: str = "") -> SDXLDenoiser:
        """The denoiser of one concrete setting (prompt bound, CFG scale, LoRA scale set before each call)."""
        comps = self._component(setting.model)
        embeds = self.encode(setting.model, setting.prompt, negative_prompt, encode_lora_scale, cache)
        ids = add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.prompt_embeds.dtype,
                           device=self.device)  # (1, 6)
        lora = self.lora if setting.model == MAIN_MODEL and setting.lora_scale is not None else None
        return SDXLDenoiser(comps.unet, SDXLConditioning(embeds, ids), setting.guidance_scale, lora=lora,
                            lora_scale=setting.lora_scale if lora is not None else None, name=name)

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        main: Setting,
        seeds: Sequence[int],
        size: tuple[int, int],
        num_steps: int,
        *,
        negative_prompt: str | None = None,
        pair: Pair | None = None,
        lam: int | None = None,
        inversion: str = "exact",
        weak_at: str = "stepped",
        latents: torch.Tensor | None = None,
        progress: bool = False,
        desc: str = "sampling",
    ) -> Generation:
        """Sample a batch of seeds: plain DDIM with ``main``, or W2SD with ``pair`` (reflections on the first
        ``lam`` steps, default T-1; ``inversion`` "exact" = paper, "reference" = published code's levels).

        Args:
            main: the main step's setting (model, LoRA scale or None without LoRA, CFG scale, prompt).
            seeds: one initial latent per seed (see :func:`initial_latents`); ``latents`` overrides them.
            size: (height, width) in pixels, multiples of the VAE factor.
            num_steps: T, DDIM steps on the schedule's grid.
            negative_prompt: None = zeros with force_zeros_for_empty_prompt (SDXL base), else encoded.
        """
        height, width = size
        shape = self.latent_shape(height, width)
        seeds = [int(s) for s in seeds]
        if latents is None:
            latents = initial_latents(seeds, shape, self.dtype, self.device)
        timesteps = self.schedule.timesteps(num_steps)
        cache: dict = {}
        start = time.perf_counter()
        w2sd = pair is not None
        settings = {"main": main}
        if w2sd:
            settings |= {"strong": resolve(pair.strong, main), "weak": resolve(pair.weak, main)}
        denoisers: dict[Setting, SDXLDenoiser] = {}

        def make(role: str, setting: Setting) -> SDXLDenoiser:
            if setting not in denoisers:  # identical settings share one denoiser
                enc = OFF if w2sd else setting.lora_scale  # published code: prompts encoded with LoRA disabled
                denoisers[setting] = self.denoiser(setting, negative_prompt, height, width, encode_lora_scale=enc,
                                                   cache=cache, name=role)
            return denoisers[setting]

        main_den = make("main", main)
        model_pair = ModelPair(make("strong", settings["strong"]), make("weak", settings["weak"])) if w2sd else None
        lora_before = self.lora.scale if self.lora is not None else None
        try:
            with torch.inference_mode():
                result = sample(main_den, latents, timesteps, self.schedule, pair=model_pair,
                                lam=lam if w2sd else None, inversion=inversion, weak_at=weak_at,
                                step_targets="diffusers", progress=progress, desc=desc)
        finally:
            if self.lora is not None:
                self.lora.scale = lora_before
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Generation(
            latents=result.x,
            seeds=seeds,
            nfe=result.nfe,
            unet_calls=sum(d.unet_calls for d in denoisers.values()),
            unet_items=sum(d.unet_items for d in denoisers.values()),
            seconds=time.perf_counter() - start,
            settings={k: v.as_dict() for k, v in settings.items()},
            model=main.model,
        )

    # ------------------------------------------------------------------ decoding
    def decode(self, latents: torch.Tensor, model: str = MAIN_MODEL) -> torch.Tensor:
        """Final latents -> images (B, 3, H, W) float32 in [0, 1] on the CPU (``vae.latents_to_image``)."""
        vae = self._component(model).vae
        with torch.inference_mode():
            images = vae.latents_to_image(latents.to(vae.device))
        return images.float().cpu()
