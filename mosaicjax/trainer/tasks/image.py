"""The image task: latent-diffusion training of a Stable-Diffusion-architecture model (or VAE pre-training).

    train.task = 'image'
    image.init_from = '/path/to/diffusers_folder'      # or a mosaicjax image checkpoint

Starts from the folder's weights (fine-tuning; `image.reinit` re-initialises components for pre-training),
trains the UNet (+ text encoder with diffusion.train_text_encoder, or only the VAE with diffusion.train_vae) with
the objective of mosaicjax/diffusion/training.py, and saves the whole model (trained weights, their EMA, frozen
components) in the run's Orbax checkpoints. The workdir also gets model/ (configs, tokenizers, scheduler) and a
mosaicjax.json marker, so `python -m mosaicjax.convert --src=WORKDIR --dst=OUT --to=hf` exports a diffusers folder
(EMA weights). At the end it samples `image.sample_prompts` (the held-out shapes prompts for the shapes data) into
a PNG grid under WORKDIR/samples/ and, for shapes, reports prompt adherence.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mosaicjax import config as config_lib
from mosaicjax.checkpoints import diffusers_io
from mosaicjax.data import images as images_lib
from mosaicjax.diffusion import training as training_lib
from mosaicjax.parallel import rules as rules_lib
from mosaicjax.trainer import optimizer as optimizer_lib
from mosaicjax.trainer.tasks import Task
from mosaicjax.trainer.tasks.lm import validate_batch

MODEL_DIR = "model"
WORKDIR_KIND = "image_training"


@gin.configurable("image")
@dataclasses.dataclass(frozen=True)
class ImageConfig:
    # diffusers folder or mosaicjax image checkpoint whose configs, tokenizers, scheduler and weights start the run.
    init_from: str | None = None
    # Components re-initialised randomly from their configs (pre-training): any of 'unet', 'vae', 'text_encoder'
    # ('text_encoder_2'). Components whose folder has no weights (an architecture-only folder such as
    # experiments/imageai/shapes_model/) must be listed.
    reinit: tuple = ()
    # > 0: the run has two phases. Phase 1 pre-trains the VAE (diffusion.train_vae) for this many steps in
    # WORKDIR/vae; phase 2, this run, then trains the UNet (+ text encoder) on that VAE's latents with the VAE
    # frozen. See `ImageTask.prior_phases`.
    vae_pretrain_steps: int = 0
    # Gin bindings that apply only to phase 1 (e.g. "optimizer.learning_rate = 2e-3", "train.batch_size = 64").
    vae_pretrain_bindings: tuple = ()
    # Prompts sampled (EMA weights) into WORKDIR/samples/ at the end; None with shapes data: held-out prompts.
    sample_prompts: tuple | None = None
    # Number of prompts sampled at the end (0 disables sampling), denoising steps, guidance, scheduler.
    num_samples: int = 16
    sample_steps: int = 20
    guidance_scale: float = 4.0
    sample_scheduler: str | None = "ddim"


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _put(tree, shardings):
    """Host numpy tree -> global arrays on `shardings` (every process holds the whole host tree)."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a)[idx]),
                        tree, shardings)


def _run_init(fn, key):
    """Host params of `fn(key)` (a model's initialisers), run as one program.

    Eagerly every parameter's initialiser would be its own small XLA compilation (~0.1 s apiece on CPU: tens of
    seconds for a UNet). The program runs once, so on CPU it is compiled without LLVM's expensive passes, which
    halves its compile time.
    """
    lowered = jax.jit(fn).lower(key)
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} \
        if jax.default_backend() == "cpu" else {}
    return jax.device_get(lowered.compile(compiler_options=options)(key))


class ImageTask(Task):
    name = "image"
    units_name = "images_per_sec"

    # ------------------------------------------------------------------------------------------- building
    def setup(self, train_cfg, mesh, rules, workdir):
        # pylint: disable=import-outside-toplevel
        from mosaicjax.checkpoints import diffusers_parts as parts
        from mosaicjax.checkpoints import diffusers_unet
        from mosaicjax.data.clip_tokenizer import CLIPTokenizer
        from mosaicjax.diffusion import schedulers as sched_lib
        from mosaicjax.models import clip as clip_lib
        from mosaicjax.models import vae as vae_lib
        from mosaicjax.models import unet as unet_lib

        self.train_cfg, self.mesh, self.rules = train_cfg, mesh, rules
        self.cfg = cfg = ImageConfig()
        self.dcfg = dcfg = training_lib.DiffusionConfig()
        try:
            self.data_cfg = images_lib.ImageDataConfig()
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        opt_cfg = optimizer_lib.OptimizerConfig()
        validate_batch(train_cfg, mesh)
        names = self._resolve_source(workdir)
        self.configs = {}
        for n in names:
            with open(os.path.join(self.files_dir, n, "config.json")) as f:
                self.configs[n] = json.load(f)
        self.encoder_names = [n for n in diffusers_io.TEXT_ENCODERS if n in self.configs]
        unet_cfg = diffusers_unet.unet_config_from_diffusers(
            self.configs["unet"], dtype=dcfg.compute_dtype, param_dtype="float32", remat=dcfg.remat)
        self.unet_cfg = unet_cfg
        self.vae_cfg = parts.vae_config_from_diffusers(self.configs["vae"])
        self.is_sdxl = unet_cfg.addition_embed_type == "text_time"
        models = {"unet": unet_lib.UNet2DConditionModel(unet_cfg), "vae": vae_lib.AutoencoderKL(self.vae_cfg)}
        for n in self.encoder_names:
            ccfg = parts.clip_config_from_hf(self.configs[n], dtype=dcfg.compute_dtype, param_dtype="float32")
            with_proj = (self.model_index.get(n) or [None, None])[1] == "CLIPTextModelWithProjection"
            models[n] = clip_lib.CLIPTextModelWithProjection(ccfg) if with_proj else clip_lib.CLIPTextModel(ccfg)
        self.models = models
        self.trained = ("vae",) if dcfg.train_vae else (
            ("unet", "text_encoder") if dcfg.train_text_encoder else ("unet",))
        self.tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(self.files_dir, t))
                           for t, e in zip(diffusers_io.TOKENIZERS, diffusers_io.TEXT_ENCODERS)
                           if e in self.encoder_names]
        self.empty_ids = {("input_ids" if j == 0 else f"input_ids_{j + 1}"):
                          jnp.asarray(tok([""], max_length=tok.model_max_length)[0], jnp.int32)
                          for j, tok in enumerate(self.tokenizers)}
        sched_path = os.path.join(self.files_dir, "scheduler", "scheduler_config.json")
        sched_json = json.load(open(sched_path)) if os.path.isfile(sched_path) else {}
        sched_cfg = sched_lib.make_scheduler("ddim", sched_json).config
        self.alphas_cumprod = sched_lib.alphas_cumprod(sched_cfg)
        self.prediction_type = dcfg.prediction_type or sched_cfg.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise config_lib.ConfigError(f"prediction_type {self.prediction_type!r} is not trainable here")
        multiple = self.vae_cfg.downsample_factor * 2 ** sum(1 for s in unet_cfg.down_block_specs() if s.resample)
        if self.data_cfg.resolution % multiple or self.data_cfg.size_multiple % multiple:
            raise config_lib.ConfigError(
                f"image_data.resolution={self.data_cfg.resolution} and image_data.size_multiple="
                f"{self.data_cfg.size_multiple} must be multiples of {multiple} (VAE factor x UNet downsampling)")
        self.tx, self.schedule = optimizer_lib.make_optimizer(opt_cfg, train_cfg.num_steps)

        # Shardings: UNet parameters follow their logical axes; everything else is replicated.
        abstract = diffusers_io._abstract_params(self.configs, self.model_index, "float32")  # pylint: disable=protected-access
        self.abstract_params = abstract
        rep = _replicated(mesh)
        comp_sh = {n: jax.tree.map(lambda _: rep, abstract[n]) for n in abstract}
        comp_sh["unet"] = rules_lib.fit_to_shapes(
            rules_lib.logical_to_sharding(unet_lib.param_logical_axes(unet_cfg), mesh, rules), abstract["unet"])
        params_sh = {n: comp_sh[n] for n in self.trained}
        frozen_sh = {n: comp_sh[n] for n in abstract if n not in self.trained}
        abstract_opt = jax.eval_shape(self.tx.init, {n: abstract[n] for n in self.trained})
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, params_sh,
                                       transform_non_params=lambda _: rep)
        self.shardings = training_lib.ImageTrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep,
                                                      ema=params_sh, frozen=frozen_sh)
        self._abstract_opt = abstract_opt
        tokenize = [lambda caps, tok=tok: tok(caps, max_length=tok.model_max_length) for tok in self.tokenizers]
        self.cache = self._latent_cache(tokenize)
        self.data_iter = images_lib.make_train_iterator(
            self.data_cfg, tokenize, global_batch=train_cfg.batch_size, seed=train_cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), source=self._data_source,
            cache=self.cache)
        self._flops: dict[tuple, float] = {}

    def _resolve_source(self, workdir) -> list[str]:
        """Checks image.init_from / image.reinit; sets source, files_dir, model_index, reinit; returns components.

        Phase 2 of a two-phase run starts from phase 1's workdir (its trained VAE and the components phase 1
        initialised or loaded; configs and tokenizers in its model/) and re-initialises nothing.
        """
        cfg, dcfg = self.cfg, self.dcfg
        if not cfg.init_from:
            raise config_lib.ConfigError(
                "train.task='image' needs image.init_from = a diffusers folder or mosaicjax image checkpoint "
                "(its configs define the model; image.reinit=('unet',) pre-trains from random weights)")
        if cfg.vae_pretrain_steps and dcfg.train_vae:
            raise config_lib.ConfigError(
                "image.vae_pretrain_steps > 0 runs VAE pre-training as phase 1 and then trains the UNet; "
                "diffusion.train_vae = True cannot be bound with it (bind it in image.vae_pretrain_bindings?)")
        src = os.path.abspath(cfg.init_from)
        in_repo = os.path.join(os.path.dirname(config_lib.EXPERIMENTS_DIR), cfg.init_from)
        if not os.path.exists(src) and os.path.exists(in_repo):  # as --gin_file: cwd, else the repository root
            src = os.path.abspath(in_repo)
        self.files_dir = src
        if diffusers_io.is_training_workdir(src):
            self.files_dir = os.path.join(src, MODEL_DIR)
            self.model_index = json.load(open(os.path.join(self.files_dir, "model_index.json")))
            names = diffusers_io._components(self.model_index)  # pylint: disable=protected-access
        elif diffusers_io.is_image_checkpoint(src):
            meta = diffusers_io.read_meta(src)
            self.model_index, names = meta["model_index"], meta["components"]
        elif diffusers_io.is_diffusers_folder(src):
            with open(os.path.join(src, "model_index.json")) as f:
                self.model_index = json.load(f)
            names = diffusers_io._components(self.model_index)  # pylint: disable=protected-access
        else:
            raise config_lib.ConfigError(f"image.init_from={src}: not a diffusers folder, image checkpoint or "
                                         "image training workdir")
        bad = set(cfg.reinit) - {"unet", "vae"} - set(diffusers_io.TEXT_ENCODERS)
        if bad or not set(cfg.reinit) <= set(names):
            raise config_lib.ConfigError(
                f"image.reinit={cfg.reinit}: only components of the model ({', '.join(names)}) can be "
                "re-initialised")
        if diffusers_io.is_diffusers_folder(src):
            missing = [n for n in diffusers_io.weightless_components(src) if n not in cfg.reinit]
            if missing:
                raise config_lib.ConfigError(
                    f"image.init_from={src} has no weights for {', '.join(missing)} (no *.safetensors in "
                    f"{', '.join(n + '/' for n in missing)}); add {', '.join(repr(n) for n in missing)} to "
                    "image.reinit to initialise them randomly from their config.json")
        self.source, self.reinit = src, tuple(cfg.reinit)
        if cfg.vae_pretrain_steps:
            # Phase 2 starts from phase 1's run: its trained VAE, and the other components as phase 1 held them
            # (initialised there from the same seed when image.reinit lists them, else the source's weights).
            self.source = self.vae_phase_workdir(workdir)
            self.files_dir = os.path.join(self.source, MODEL_DIR)
            self.reinit = ()
        return list(names)

    @staticmethod
    def vae_phase_workdir(workdir: str) -> str:
        return os.path.join(os.path.abspath(workdir), "vae")

    def prior_phases(self, workdir):
        """Phase 1 of a two-phase run (image.vae_pretrain_steps > 0): VAE pre-training in WORKDIR/vae.

        Why phases of one command rather than two commands or one program that trains both: each phase is an
        ordinary run of this task — its own checkpoints, resume, metrics.jsonl and config.gin under its own
        workdir — so nothing in the loop or the train state knows about phases, phase 1 is resumable and
        skippable on its own (complete: a checkpoint at its last step), and phase 2 starts from phase 1's
        workdir exactly as it would from any image training workdir. The phase differs from this run only by
        gin bindings (diffusion.train_vae, its steps, and image.vae_pretrain_bindings), which keeps it data.
        """
        from mosaicjax.trainer.tasks import Phase  # pylint: disable=import-outside-toplevel
        cfg = ImageConfig()
        if not cfg.vae_pretrain_steps:
            return []
        bindings = tuple(cfg.vae_pretrain_bindings) + (
            "diffusion.train_vae = True", f"train.num_steps = {int(cfg.vae_pretrain_steps)}",
            "image.vae_pretrain_steps = 0", "image.vae_pretrain_bindings = ()")
        return [Phase("vae", self.vae_phase_workdir(workdir), int(cfg.vae_pretrain_steps), bindings)]

    @property
    def phase_name(self) -> str:
        return "vae" if training_lib.DiffusionConfig().train_vae else "unet"

    def abstract_state(self):
        def sds(tree, sh):
            return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=x), tree, sh)
        sh = self.shardings
        params = {n: self.abstract_params[n] for n in self.trained}
        frozen = {n: self.abstract_params[n] for n in self.abstract_params if n not in self.trained}
        return training_lib.ImageTrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step), params=sds(params, sh.params),
            opt_state=sds(self._abstract_opt, sh.opt_state),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sh.rng), ema=sds(params, sh.ema),
            frozen=sds(frozen, sh.frozen))

    def init_state(self):
        from mosaicjax.models import unet as unet_lib  # pylint: disable=import-outside-toplevel
        if diffusers_io.is_diffusers_folder(self.source):  # re-initialised weights are not read (may not exist)
            model = diffusers_io.load_diffusers(self.source, dtype="float32", skip=self.reinit)
        else:
            model = diffusers_io.load_image_model(self.source, dtype="float32")
        host = dict(model.params)
        init_rng, run_rng = jax.random.split(jax.random.PRNGKey(self.train_cfg.seed))
        if "unet" in self.reinit:
            host["unet"] = _run_init(lambda k: unet_lib.init_params(self.unet_cfg, k), jax.random.fold_in(init_rng, 1))
        if "vae" in self.reinit:
            x = jnp.zeros((1, 8 * self.vae_cfg.downsample_factor, 8 * self.vae_cfg.downsample_factor, 3))
            host["vae"] = _run_init(lambda k: nn.meta.unbox(self.models["vae"].init(k, x)["params"]),
                                    jax.random.fold_in(init_rng, 2))
        for j, n in enumerate(self.encoder_names):
            if n in self.reinit:
                ids = jnp.zeros((1, self.models[n].config.max_position_embeddings), jnp.int32)
                host[n] = _run_init(lambda k, n=n: nn.meta.unbox(self.models[n].init(k, ids)["params"]),
                                    jax.random.fold_in(init_rng, 3 + j))
        sh = self.shardings
        params = _put({n: host[n] for n in self.trained}, sh.params)
        frozen = _put({n: host[n] for n in host if n not in self.trained}, sh.frozen)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        ema = jax.tree.map(jnp.copy, params)
        return training_lib.ImageTrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=params, opt_state=opt_state,
            rng=jax.device_put(run_rng, sh.rng), ema=ema, frozen=frozen)

    # ----------------------------------------------------------------------------------- data and step
    def _latent_cache(self, tokenize):
        """The latent cache (mosaicjax/data/latent_cache.py) when image_data.cache_dir is set, else None."""
        from mosaicjax.data import latent_cache  # pylint: disable=import-outside-toplevel
        data_cfg, dcfg = self.data_cfg, self.dcfg
        self._data_source = images_lib.build_source(data_cfg, self.train_cfg.seed)
        if not data_cfg.cache_dir:
            return None
        if dcfg.train_vae or dcfg.train_text_encoder:
            raise config_lib.ConfigError(
                "image_data.cache_dir caches the outputs of frozen encoders; it cannot be used with "
                "diffusion.train_vae or diffusion.train_text_encoder (unset image_data.cache_dir)")
        reinit = set(getattr(self, "reinit", self.cfg.reinit)) & ({"vae"} | set(self.encoder_names))
        if reinit:
            raise config_lib.ConfigError(
                f"image_data.cache_dir: image.reinit re-initialises {sorted(reinit)}, whose outputs the cache "
                "would hold; cache only encoders with trained weights (unset image_data.cache_dir)")
        names = ["vae"] + self.encoder_names
        files_dir = getattr(self, "files_dir", self.source)
        weights = [os.path.join(self.source, n) for n in names] if diffusers_io.is_diffusers_folder(self.source) \
            else [self.source]
        key_parts = {
            "version": latent_cache.CACHE_VERSION, "data": latent_cache.data_fingerprint(
                data_cfg, self._data_source, self.train_cfg.seed),
            "resolution": data_cfg.resolution, "buckets": data_cfg.buckets, "size_multiple": data_cfg.size_multiple,
            "encoder_configs": {n: self.configs[n] for n in names}, "compute_dtype": dcfg.compute_dtype,
            "encoder_weights": latent_cache.files_fingerprint(weights),
            "tokenizers": latent_cache.files_fingerprint(os.path.join(files_dir, t) for t in diffusers_io.TOKENIZERS
                                                         if os.path.isdir(os.path.join(files_dir, t))),
        }
        try:
            cache = latent_cache.open_or_build(
                data_cfg, self._data_source, key_parts, lambda px, ids: self._cache_encoder()(px, ids), tokenize,
                process_index=jax.process_index(), process_count=jax.process_count())
        except ValueError as e:
            if str(e).startswith("image_data."):  # a bad binding; an unreadable image stays a data error
                raise config_lib.ConfigError(str(e)) from None
            raise
        self.cached_empty = {k: jnp.asarray(v) for k, v in cache.empty.items()}
        return cache

    def _cache_encoder(self):
        """encode(pixels, ids) -> numpy moments and embeddings, with the run's frozen VAE and text encoders."""
        if getattr(self, "_encode", None) is None:
            names = ["vae"] + self.encoder_names
            if diffusers_io.is_diffusers_folder(self.source):
                host = diffusers_io.load_diffusers(self.source, dtype="float32", skip=("unet",)).params
            else:
                host = diffusers_io.load_image_model(self.source, dtype="float32").params
            params = jax.device_put({n: host[n] for n in names})

            @jax.jit
            def encode(p, pixels, ids):
                mean, logvar = training_lib.latent_moments(self.models, p["vae"], pixels)
                context, pooled = training_lib.text_conditioning(self.models, lambda n: p[n], ids, self.is_sdxl)
                out = {"latent_mean": mean, "latent_logvar": logvar, "context": context}
                if pooled is not None:
                    out["pooled"] = pooled
                return out

            self._encode = lambda pixels, ids: jax.device_get(encode(params, pixels, ids))
        return self._encode

    def train_step(self):
        return training_lib.make_train_step(
            self.models, self.tx, self.schedule, self.dcfg, alphas_cumprod=self.alphas_cumprod,
            prediction_type=self.prediction_type, vae_cfg=self.vae_cfg, empty_ids=self.empty_ids,
            is_sdxl=self.is_sdxl, grad_accum_steps=self.train_cfg.grad_accum_steps,
            cached_empty=self.cached_empty if self.cache is not None else None)

    def abstract_batch(self, batch_sharding):
        h = w = self.data_cfg.resolution
        b = self.train_cfg.batch_size
        if self.cache is not None:
            f, c = self.vae_cfg.downsample_factor, self.vae_cfg.latent_channels
            shapes = {"latent_mean": (b, h // f, w // f, c), "latent_logvar": (b, h // f, w // f, c),
                      "time_ids": (b, 6), **{k: (b,) + tuple(v.shape) for k, v in self.cached_empty.items()}}
            return {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=batch_sharding) for k, v in shapes.items()}
        out = {"pixels": jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=batch_sharding),
               "time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32, sharding=batch_sharding)}
        for k in self.empty_ids:
            out[k] = jax.ShapeDtypeStruct((b, int(self.empty_ids[k].shape[0])), jnp.int32, sharding=batch_sharding)
        return out

    def to_global(self, batch, sharding):
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

    def units_per_step(self):
        return self.train_cfg.batch_size

    def flops_per_step(self, batch=None):
        """3x the UNet forward's FLOPs (XLA's count) for this batch shape (diffusion); the VAE's for train_vae."""
        if batch is not None and "pixels" not in batch:  # latent cache: the image size from the latents
            b, lh, lw, _ = batch["latent_mean"].shape
            f = self.vae_cfg.downsample_factor
            batch = {"pixels": jax.ShapeDtypeStruct((b, lh * f, lw * f, 3), jnp.float32)}
        shape = tuple(batch["pixels"].shape) if batch is not None else None
        if shape in self._flops:
            return self._flops[shape]
        b, h, w, _ = shape
        f = self.vae_cfg.downsample_factor
        try:
            if self.dcfg.train_vae:
                fn = lambda p, x: self.models["vae"].apply({"params": p}, x)  # noqa: E731
                args = (self.abstract_params["vae"], jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
            else:
                width = sum(self.models[n].config.hidden_size for n in self.encoder_names)
                added = None
                if self.is_sdxl:
                    proj = self.unet_cfg.projection_class_embeddings_input_dim - 6 * self.unet_cfg.addition_time_embed_dim
                    added = {"text_embeds": jax.ShapeDtypeStruct((b, proj), jnp.float32),
                             "time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32)}
                fn = lambda p, x, t, c, a: self.models["unet"].apply({"params": p}, x, t, c, a)  # noqa: E731
                args = (self.abstract_params["unet"],
                        jax.ShapeDtypeStruct((b, h // f, w // f, self.unet_cfg.in_channels), jnp.float32),
                        jax.ShapeDtypeStruct((b,), jnp.int32),
                        jax.ShapeDtypeStruct((b, self.context_len, width), jnp.float32),
                        added)
            cost = jax.jit(fn).lower(*args).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = 3.0 * float(cost.get("flops", 0.0))
        except Exception:  # pylint: disable=broad-except  # a backend without cost analysis: MFU reads 0
            flops = 0.0
        self._flops[shape] = flops
        return flops

    @property
    def context_len(self) -> int:
        """Tokens the UNet attends to (the tokenizer's model_max_length: 77 for SD, 16 for the shapes model)."""
        return int(self.empty_ids["input_ids"].shape[0])

    def record_fields(self):
        return {"batch_size": self.train_cfg.batch_size, "resolution": self.data_cfg.resolution,
                "skipped_records": images_lib.skipped_records()}

    def meta(self, state):
        return {"step": int(jax.device_get(state.step)), "mesh_shape": dict(self.mesh.shape),
                "task": "image", "trained": list(self.trained)}

    # ------------------------------------------------------------------------------------ files and samples
    def on_start(self, workdir, is_primary):
        """WORKDIR/model/ (configs, tokenizers, scheduler) + WORKDIR/mosaicjax.json: what export needs."""
        if not is_primary:
            return
        dst = os.path.join(workdir, MODEL_DIR)
        os.makedirs(dst, exist_ok=True)
        for n, c in self.configs.items():
            os.makedirs(os.path.join(dst, n), exist_ok=True)
            with open(os.path.join(dst, n, "config.json"), "w") as f:
                json.dump(c, f, indent=2, sort_keys=True)
        for n in diffusers_io.TOKENIZERS + ("scheduler",):
            if os.path.isdir(os.path.join(self.files_dir, n)):
                shutil.copytree(os.path.join(self.files_dir, n), os.path.join(dst, n), dirs_exist_ok=True)
        with open(os.path.join(dst, "model_index.json"), "w") as f:
            json.dump(self.model_index, f, indent=2, sort_keys=True)
        with open(os.path.join(workdir, diffusers_io.META_NAME), "w") as f:
            json.dump({"kind": WORKDIR_KIND, "trained": list(self.trained), "source": self.source}, f, indent=2)

    def image_model(self, workdir, state) -> diffusers_io.ImageModel:
        """The current model (EMA weights for the trained components) as a host ImageModel."""
        params = {n: jax.tree.map(np.asarray, jax.device_get(v)) for n, v in state.frozen.items()}
        params.update({n: jax.tree.map(np.asarray, jax.device_get(v)) for n, v in state.ema.items()})
        return diffusers_io.ImageModel(self.model_index, self.configs, params, os.path.join(workdir, MODEL_DIR),
                                       self.source)

    def finish(self, workdir, state, last, is_primary):
        if self.cfg.num_samples <= 0 or self.dcfg.train_vae or int(jax.device_get(state.step)) \
                != self.train_cfg.num_steps:
            return
        from mosaicjax.diffusion import sampling_report  # pylint: disable=import-outside-toplevel
        sampling_report.sample_and_report(self, workdir, state, is_primary)
