"""Text-to-image sampling with diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline semantics.

    pipe = load_image_pipeline("path/to/diffusers_or_mosaicjax_folder", dtype="bfloat16", mesh=None)
    images = pipe("a red fox in snow", negative_prompt="blurry", size="1280x768", seed=0)   # list of PIL

One request runs three programs:
  1. the text encoders (jitted per prompt-batch size): CLIP token ids -> the states the UNet attends to. SD1/SD2:
     the last hidden state (after the final LayerNorm). SDXL: the penultimate hidden states of both encoders
     concatenated, plus the second encoder's projected pooled state; unconditional embeddings are zeros when
     model_index.json says force_zeros_for_empty_prompt and no negative prompt is given.
  2. ONE compiled program for the rest: noise scaling, the whole denoising loop (a lax.fori_loop over scheduler
     + UNet + classifier-free guidance [+ guidance rescale]), VAE decode and [0, 1] post-processing. Embeddings,
     latents, guidance scale and the scheduler's arrays are its arguments, so it is compiled once per
     (height, width, batch, steps, scheduler, guidance on/off, rescale on/off, output) and reused: a second
     request of the same shape runs without tracing or compiling (self.num_compiles counts).
  3. host post-processing (PIL conversion).

Numerics follow diffusers: float32 scheduler state whatever the model dtype, CFG as
uncond + g * (cond - uncond), rescale_noise_cfg with unbiased stds, latents divided by the VAE scaling factor
(SDXL: * latents_std / scaling + latents_mean when the VAE config has them), images (x * 0.5 + 0.5).clip(0, 1).
Latents passed in use diffusers' layout, NCHW [batch, 4, height / 8, width / 8], and are multiplied by the
scheduler's init_noise_sigma as diffusers does. Seeds draw those latents with jax.random on the host side, so a
seed gives the same image on any number of devices.

With a mesh, the batch is split over the mesh's batch axes ('data', 'fsdp', 'expert'; padded up to a multiple of
their size) and parameters are replicated; the sharded program computes the same images as one device.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mosaicjax.checkpoints import diffusers_io
from mosaicjax.diffusion import schedulers as sched_lib

# "WIDTHxHEIGHT" sizes the models are trained for (SDXL buckets); any size meeting the multiple works.
SIZE_PRESETS = {"1024x1024": (1024, 1024), "1280x768": (1280, 768), "768x1280": (768, 1280)}
SIZE_ALIASES = {"square": "1024x1024", "landscape": "1280x768", "portrait": "768x1280"}
OUTPUT_TYPES = ("pil", "np", "latent")
# Used when scheduler=None and the folder's scheduler class is one we do not implement (e.g. SD1.5's PNDM).
FALLBACK_SCHEDULER = "dpmpp_2m"
_BATCH_AXES = ("data", "fsdp", "expert")


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or 'square' / 'landscape' / 'portrait') -> (width, height)."""
    text = SIZE_ALIASES.get(str(size).strip().lower(), str(size).strip().lower())
    parts = text.split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be 'WIDTHxHEIGHT' (e.g. {', '.join(SIZE_PRESETS)}), got {size!r}")
    return int(parts[0]), int(parts[1])


def _as_list(prompt, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt) and prompt:
        return list(prompt)
    raise TypeError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def rescale_noise_cfg(noise_cfg: jax.Array, noise_text: jax.Array, guidance_rescale) -> jax.Array:
    """diffusers' rescale_noise_cfg (arXiv 2305.08891 sec. 3.4): match the guided prediction's std to the
    conditional one's (unbiased std over every non-batch axis), then blend by guidance_rescale."""
    axes = tuple(range(1, noise_text.ndim))
    std_text = jnp.std(noise_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


class ImagePipeline:
    """SD1.x / SD2.x / SDXL text-to-image over an ImageModel (see the module docstring)."""

    def __init__(self, model: diffusers_io.ImageModel, dtype: str = "float32", mesh: Mesh | None = None):
        # pylint: disable=import-outside-toplevel
        from mosaicjax.checkpoints import diffusers_parts as parts
        from mosaicjax.checkpoints import diffusers_unet
        from mosaicjax.data.clip_tokenizer import CLIPTokenizer
        from mosaicjax.models import clip as clip_lib
        from mosaicjax.models import unet as unet_lib
        from mosaicjax.models import vae as vae_lib

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if mesh is not None and any(t != AxisType.Auto for t in mesh.axis_types):
            # The models place activations with logical constraints (GSPMD propagation); explicit-sharding
            # meshes (jax.make_mesh's default) would demand an out_sharding on every reshape instead.
            mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        self.model, self.dtype, self.mesh = model, dtype, mesh
        self.unet_config = diffusers_unet.unet_config_from_diffusers(model.configs["unet"], dtype=dtype,
                                                                     param_dtype=dtype)
        vae_cfg = parts.vae_config_from_diffusers(model.configs["vae"])
        # diffusers decodes float16 VAEs that overflow (force_upcast) in float32; so do we.
        vae_dtype = "float32" if dtype == "float16" and vae_cfg.force_upcast else dtype
        self.vae_config = parts.vae_config_from_diffusers(model.configs["vae"], dtype=vae_dtype,
                                                          param_dtype=vae_dtype)
        self.unet = unet_lib.UNet2DConditionModel(self.unet_config)
        self.vae = vae_lib.AutoencoderKL(self.vae_config)
        self.encoder_names = model.text_encoders
        if not self.encoder_names:
            raise ValueError(f"{model.source}: no text encoder; text-to-image needs one")
        self.text_encoders = []
        for name in self.encoder_names:
            cfg = parts.clip_config_from_hf(model.configs[name], dtype=dtype, param_dtype=dtype)
            self.text_encoders.append(clip_lib.CLIPTextModelWithProjection(cfg) if model.with_projection(name)
                                      else clip_lib.CLIPTextModel(cfg))
        self.tokenizers = [CLIPTokenizer.from_pretrained(model.tokenizer_dir(tok))
                           for tok, enc in zip(diffusers_io.TOKENIZERS, diffusers_io.TEXT_ENCODERS)
                           if enc in self.encoder_names]
        # SDXL-style conditioning (penultimate states, pooled text embeds, time ids) follows from the UNet.
        self.is_sdxl = self.unet_config.addition_embed_type == "text_time"
        if self.is_sdxl and not any(model.with_projection(n) for n in self.encoder_names):
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs a CLIPTextModelWithProjection")
        self.force_zeros_for_empty_prompt = bool(model.model_index.get("force_zeros_for_empty_prompt", True)) \
            if self.is_sdxl else False
        self.vae_scale_factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        downsamplers = sum(1 for s in self.unet_config.down_block_specs() if s.resample)
        # Sides must be whole latents that every UNet level halves evenly (64 for SD1/SD2, 32 for SDXL).
        self.size_multiple = self.vae_scale_factor * 2 ** downsamplers
        sample = self.unet_config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.default_size = int(sample or 64) * self.vae_scale_factor
        self.scheduler_config = model.scheduler_config()

        self._replicated = NamedSharding(mesh, P()) if mesh is not None else None
        self._batch_axes = None
        if mesh is not None:
            axes = tuple(a for a in mesh.axis_names if a in _BATCH_AXES) or (mesh.axis_names[0],)
            self._batch_axes = axes
        place = (lambda t: jax.device_put(t, self._replicated)) if mesh is not None else jax.device_put

        def cast(tree, dt):
            return jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(dt)), tree)

        self.params = {
            "unet": place(cast(model.params["unet"], dtype)),
            "vae": place(cast(model.params["vae"], vae_dtype)),
            "text": tuple(place(cast(model.params[n], dtype)) for n in self.encoder_names),
        }
        self._text_fn = jax.jit(self._encode_ids)
        self._programs: dict[tuple, Any] = {}
        self._compile_lock = threading.Lock()  # a server may call from several threads: compile each key once
        self._states: dict[tuple, Any] = {}
        self.num_compiles = 0
        self.last_timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ text side
    def _encode_ids(self, text_params, ids):
        """ids: tuple (one int32 [B, 77] per encoder) -> (context [B, 77, D], pooled [B, P] or None)."""
        states, pooled = [], None
        for model, params, tok_ids in zip(self.text_encoders, text_params, ids):
            last, aux = model.apply({"params": params}, tok_ids)
            if not self.is_sdxl:
                states.append(last)
                continue
            states.append(aux["hidden_states"][-2])
            if "text_embeds" in aux and pooled is None:
                pooled = aux["text_embeds"]
        context = jnp.concatenate(states, axis=-1).astype(jnp.float32)  # [batch, tokens, sum of widths]
        return context, (None if pooled is None else pooled.astype(jnp.float32))

    def _tokenize(self, prompts: list[str]) -> tuple:
        return tuple(jnp.asarray(tok(prompts, max_length=tok.model_max_length)) for tok in self.tokenizers)

    def encode_prompt(self, prompts, return_pooled: bool = False):
        """The text-encoder states the UNet attends to: float32 numpy [B, 77, D] (SDXL: D = 768 + 1280 style
        concatenation of both encoders' penultimate states). return_pooled=True also returns SDXL's pooled
        text embeddings [B, P] (None for SD1/SD2)."""
        context, pooled = self._text_fn(self.params["text"], self._tokenize(_as_list(prompts, "prompts")))
        context = np.asarray(context)
        if return_pooled:
            return context, (None if pooled is None else np.asarray(pooled))
        return context

    # ------------------------------------------------------------------------------------- sampling program
    def _batch_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(self._batch_axes, *([None] * (ndim - 1))))

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in self._batch_axes)

    def _sample_fn(self, sched: sched_lib.Scheduler, do_cfg: bool, rescale: bool, decode: bool):
        unet, vae, vcfg, is_sdxl = self.unet, self.vae, self.vae_config, self.is_sdxl

        def sample(unet_params, vae_params, cond, uncond, latents, guidance_scale, guidance_rescale, state):
            x = jnp.transpose(latents, (0, 2, 3, 1))  # NCHW -> [batch, h, w, channels]
            state = sched.prepare(state, x)
            x = x * state.init_noise_sigma
            both = (lambda u, c: jnp.concatenate([u, c], axis=0)) if do_cfg else (lambda u, c: c)
            unc = uncond if do_cfg else cond  # without guidance only the conditional half runs
            context = both(unc["context"], cond["context"])  # [2B or B, tokens, width]
            added = None
            if is_sdxl:
                added = {"text_embeds": both(unc["pooled"], cond["pooled"]),
                         "time_ids": both(cond["time_ids"], cond["time_ids"])}

            def body(i, carry):
                x, state = carry
                x_in = sched.scale_model_input(state, both(x, x), i)
                eps = unet.apply({"params": unet_params}, x_in, state.timesteps[i], context, added)
                eps = eps.astype(jnp.float32)
                if do_cfg:
                    eps_uncond, eps_text = jnp.split(eps, 2, axis=0)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                    if rescale:
                        eps = rescale_noise_cfg(eps, eps_text, guidance_rescale)
                return sched.step(state, eps, i, x)

            x, _ = jax.lax.fori_loop(0, state.timesteps.shape[0], body, (x, state))
            if not decode:
                return jnp.transpose(x, (0, 3, 1, 2))  # back to diffusers' NCHW latents
            if is_sdxl and vcfg.latents_mean is not None and vcfg.latents_std is not None:
                mean = jnp.asarray(vcfg.latents_mean, jnp.float32)
                std = jnp.asarray(vcfg.latents_std, jnp.float32)
                z = x * std / vcfg.scaling_factor + mean
            else:
                z = x / vcfg.scaling_factor
            image = vae.apply({"params": vae_params}, z.astype(jnp.dtype(vcfg.dtype)), method="decode")
            return jnp.clip(image.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)  # [batch, H, W, 3]

        return sample

    def _program(self, key: tuple, sched, args: tuple):
        """The compiled sampler for `key`, compiled on first use (ahead of time, with shardings on a mesh)."""
        prog = self._programs.get(key)
        if prog is not None:
            return prog
        with self._compile_lock:
            if key not in self._programs:
                self._programs[key] = self._compile(key, sched, args)
        return self._programs[key]

    def _compile(self, key: tuple, sched, args: tuple):
        _, _, _, _, _, do_cfg, rescale, decode = key
        fn = self._sample_fn(sched, do_cfg, rescale, decode)
        t0 = time.perf_counter()
        if self.mesh is None:
            prog = jax.jit(fn).lower(*args).compile()
        else:
            from mosaicjax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
            shard = lambda tree: jax.tree.map(lambda a: self._batch_sharding(a.ndim), tree)  # noqa: E731
            rep = lambda tree: jax.tree.map(lambda a: self._replicated, tree)  # noqa: E731
            unet_p, vae_p, cond, uncond, latents, g, r, state = args
            in_shardings = (rep(unet_p), rep(vae_p), shard(cond), shard(uncond), shard(latents), rep(g), rep(r),
                            rep(state))
            with rules_lib.activate(self.mesh, _rules_for(self.mesh, rules_lib.get_rules())):
                prog = jax.jit(fn, in_shardings=in_shardings,
                               out_shardings=self._batch_sharding(4)).lower(*args).compile()
        self.last_timings["compile_s"] = time.perf_counter() - t0
        self.num_compiles += 1
        return prog

    def _scheduler_state(self, name: str, steps: int):
        key = (name, steps)
        if key not in self._states:
            sched = sched_lib.make_scheduler(name, self.scheduler_config)
            state = sched.set_timesteps(steps)
            if self.mesh is not None:
                state = jax.device_put(state, self._replicated)
            self._states[key] = (sched, state)
        return self._states[key]

    def resolve_scheduler(self, scheduler: str | None) -> str:
        """Our scheduler name for a request: the given one, else the folder's class when implemented."""
        if scheduler is not None:
            name = sched_lib.scheduler_name(scheduler) or scheduler
            if name not in sched_lib.SCHEDULER_CLASSES:
                raise ValueError(f"scheduler must be one of {sorted(sched_lib.SCHEDULER_CLASSES)}, got "
                                 f"{scheduler!r}")
            return name
        cls = self.scheduler_config.get("_class_name")
        name = sched_lib.scheduler_name(cls or "")
        if name is None:
            logging.warning("scheduler %s is not implemented; sampling with %s (pass scheduler= to choose)",
                            cls, FALLBACK_SCHEDULER)
            name = FALLBACK_SCHEDULER
        return name

    def _resolve_size(self, height, width, size) -> tuple[int, int]:
        if size is not None:
            w, h = parse_size(size)
            if (height is not None and height != h) or (width is not None and width != w):
                raise ValueError(f"size={size!r} contradicts height={height} / width={width}")
            height, width = h, w
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m} (the VAE's factor "
                             f"{self.vae_scale_factor} times the UNet's {m // self.vae_scale_factor}x "
                             f"downsampling), got {width}x{height}; e.g. {', '.join(SIZE_PRESETS)}")
        return height, width

    # ------------------------------------------------------------------------------------------- __call__
    def __call__(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                 size: str | None = None, num_inference_steps: int = 30, guidance_scale: float = 7.5,
                 seed: int | None = None, scheduler: str | None = None, latents=None, output_type: str = "pil",
                 num_images_per_prompt: int = 1, guidance_rescale: float = 0.0):
        """Generates images. Returns a list of PIL images, a float32 numpy [B, H, W, 3] in [0, 1] ('np'), or the
        final latents NCHW ('latent'); B = len(prompts) * num_images_per_prompt."""
        t_start = time.perf_counter()
        prompts = _as_list(prompt, "prompt")
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) \
                else _as_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_images_per_prompt)
        if n < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        height, width = self._resolve_size(height, width, size)
        name = self.resolve_scheduler(scheduler)
        sched, state = self._scheduler_state(name, steps)
        do_cfg = float(guidance_scale) > 1.0
        rescale = do_cfg and float(guidance_rescale) > 0.0

        # Text: [negatives; prompts] through the encoders in one batch.
        zero_uncond = self.is_sdxl and negative_prompt is None and self.force_zeros_for_empty_prompt
        b = len(prompts)
        if do_cfg and not zero_uncond:
            texts = (negatives if negative_prompt is not None else [""] * b) + prompts
        else:
            texts = prompts
        context, pooled = self._text_fn(self.params["text"], self._tokenize(texts))
        context, pooled = np.asarray(context), (None if pooled is None else np.asarray(pooled))
        cond = {"context": context[-b:]}
        uncond = {"context": context[:b] if do_cfg and not zero_uncond else np.zeros_like(cond["context"])}
        if self.is_sdxl:
            cond["pooled"] = pooled[-b:]
            uncond["pooled"] = pooled[:b] if do_cfg and not zero_uncond else np.zeros_like(cond["pooled"])
            cond["time_ids"] = np.tile(np.asarray([[height, width, 0, 0, height, width]], np.float32), (b, 1))
        t_text = time.perf_counter()

        # Batch: each prompt n times in a row (diffusers' repeat), padded to the mesh's batch multiple.
        total = b * n
        padded = -(-total // self._batch_multiple()) * self._batch_multiple()
        expand = lambda a: _pad_rows(np.repeat(a, n, axis=0), padded)  # noqa: E731
        cond = {k: expand(v) for k, v in cond.items()}
        uncond = {k: expand(v) for k, v in uncond.items()} if do_cfg else {}
        shape = (total, self.unet_config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            seed = secrets.randbits(31) if seed is None else int(seed)
            with jax.default_device(jax.devices("cpu")[0] if _has_cpu() else jax.devices()[0]):
                latents = np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
        else:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape} (NCHW, batch = prompts x "
                                 f"num_images_per_prompt), got {latents.shape}")
        latents = _pad_rows(latents, padded)

        args = (self.params["unet"], self.params["vae"], cond, uncond, latents,
                np.float32(guidance_scale), np.float32(guidance_rescale), state)
        args = self._place(args)
        key = (height, width, padded, steps, name, do_cfg, rescale, output_type != "latent")
        prog = self._program(key, sched, args)
        out = np.asarray(jax.device_get(prog(*args)))[:total]
        t_end = time.perf_counter()
        self.last_timings.update(text_s=t_text - t_start, denoise_decode_s=t_end - t_text, total_s=t_end - t_start)
        if output_type == "pil":
            return to_pil(out)
        return out

    def _place(self, args: tuple) -> tuple:
        """Inputs onto the devices with the shardings the compiled program expects."""
        unet_p, vae_p, cond, uncond, latents, g, r, state = args
        if self.mesh is None:
            put = jax.device_put
            return unet_p, vae_p, put(cond), put(uncond), put(latents), put(g), put(r), state
        batch = lambda tree: jax.tree.map(lambda a: jax.device_put(a, self._batch_sharding(a.ndim)), tree)  # noqa
        rep = lambda a: jax.device_put(a, self._replicated)  # noqa: E731
        return unet_p, vae_p, batch(cond), batch(uncond), batch(latents), rep(g), rep(r), state


def _rules_for(mesh: Mesh, rules) -> tuple:
    """The rules table restricted to `mesh`'s axes (a user's mesh may have only some of the four)."""
    out = []
    for name, axes in rules:
        if axes is None:
            out.append((name, None))
            continue
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


def _has_cpu() -> bool:
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Pads the batch axis to `rows` by repeating the last row (padding rows are computed and discarded)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)], axis=0)


def to_pil(images: np.ndarray) -> list:
    """float [B, H, W, 3] in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    arr = (images * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def load_image_pipeline(path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None) -> ImagePipeline:
    """An ImagePipeline from a diffusers folder (safetensors) or a mosaicjax image checkpoint."""
    model = diffusers_io.load_image_model(os.fspath(path))
    pipe = ImagePipeline(model, dtype=dtype, mesh=mesh)
    # Keep one copy of the weights: the model now refers to the placed (cast) device arrays, not host numpy.
    placed = {"unet": pipe.params["unet"], "vae": pipe.params["vae"], **dict(zip(pipe.encoder_names,
                                                                                 pipe.params["text"]))}
    pipe.model = dataclasses.replace(model, params=placed)
    return pipe
