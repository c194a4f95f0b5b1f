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
    # Components re-initialised randomly from their configs (pre-training): any of 'unet', 'vae'.
    reinit: tuple = ()
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
        self.data_cfg = images_lib.ImageDataConfig()
        opt_cfg = optimizer_lib.OptimizerConfig()
        validate_batch(train_cfg, mesh)
        if train_cfg.grad_accum_steps != 1:
            raise config_lib.ConfigError("train.grad_accum_steps must be 1 for train.task='image' (not implemented)")
        if not cfg.init_from:
            raise config_lib.ConfigError(
                "train.task='image' needs image.init_from = a diffusers folder or mosaicjax image checkpoint "
                "(its configs define the model; image.reinit=('unet',) pre-trains from random weights)")
        bad = set(cfg.reinit) - {"unet", "vae"}
        if bad:
            raise config_lib.ConfigError(f"image.reinit={cfg.reinit}: only 'unet' and 'vae' can be re-initialised")
        src = os.path.abspath(cfg.init_from)
        if diffusers_io.is_image_checkpoint(src):
            meta = diffusers_io.read_meta(src)
            self.model_index, names = meta["model_index"], meta["components"]
        elif diffusers_io.is_diffusers_folder(src):
            with open(os.path.join(src, "model_index.json")) as f:
                self.model_index = json.load(f)
            names = diffusers_io._components(self.model_index)  # pylint: disable=protected-access
        else:
            raise config_lib.ConfigError(f"image.init_from={src}: not a diffusers folder or image checkpoint")
        self.source = src
        self.configs = {}
        for n in names:
            with open(os.path.join(src, n, "config.json")) as f:
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
        self.tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(src, t))
                           for t, e in zip(diffusers_io.TOKENIZERS, diffusers_io.TEXT_ENCODERS)
                           if e in self.encoder_names]
        self.empty_ids = {("input_ids" if j == 0 else f"input_ids_{j + 1}"):
                          jnp.asarray(tok([""], max_length=tok.model_max_length)[0], jnp.int32)
                          for j, tok in enumerate(self.tokenizers)}
        sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
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
        comp_sh["unet"] = rules_lib.logical_to_sharding(unet_lib.param_logical_axes(unet_cfg), mesh, rules)
        params_sh = {n: comp_sh[n] for n in self.trained}
        frozen_sh = {n: comp_sh[n] for n in abstract if n not in self.trained}
        abstract_opt = jax.eval_shape(self.tx.init, {n: abstract[n] for n in self.trained})
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, params_sh,
                                       transform_non_params=lambda _: rep)
        self.shardings = training_lib.ImageTrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep,
                                                      ema=params_sh, frozen=frozen_sh)
        self._abstract_opt = abstract_opt
        tokenize = [lambda caps, tok=tok: tok(caps, max_length=tok.model_max_length) for tok in self.tokenizers]
        self.data_iter = images_lib.make_train_iterator(
            self.data_cfg, tokenize, global_batch=train_cfg.batch_size, seed=train_cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        self._flops: dict[tuple, float] = {}

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
        model = diffusers_io.load_image_model(self.source, dtype="float32")
        host = dict(model.params)
        init_rng, run_rng = jax.random.split(jax.random.PRNGKey(self.train_cfg.seed))
        if "unet" in self.cfg.reinit:
            host["unet"] = jax.device_get(unet_lib.init_params(self.unet_cfg, jax.random.fold_in(init_rng, 1)))
        if "vae" in self.cfg.reinit:
            x = jnp.zeros((1, 8 * self.vae_cfg.downsample_factor, 8 * self.vae_cfg.downsample_factor, 3))
            host["vae"] = jax.device_get(self.models["vae"].init(jax.random.fold_in(init_rng, 2), x)["params"])
        sh = self.shardings
        params = _put({n: host[n] for n in self.trained}, sh.params)
        frozen = _put({n: host[n] for n in host if n not in self.trained}, sh.frozen)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        ema = jax.tree.map(jnp.copy, params)
        return training_lib.ImageTrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=params, opt_state=opt_state,
            rng=jax.device_put(run_rng, sh.rng), ema=ema, frozen=frozen)

    def train_step(self):
        return training_lib.make_train_step(
            self.models, self.tx, self.schedule, self.dcfg, alphas_cumprod=self.alphas_cumprod,
            prediction_type=self.prediction_type, vae_cfg=self.vae_cfg, empty_ids=self.empty_ids,
            is_sdxl=self.is_sdxl)

    def abstract_batch(self, batch_sharding):
        h = w = self.data_cfg.resolution
        b = self.train_cfg.batch_size
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
                        jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, 77, width), jnp.float32),
                        added)
            cost = jax.jit(fn).lower(*args).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = 3.0 * float(cost.get("flops", 0.0))
        except Exception:  # pylint: disable=broad-except  # a backend without cost analysis: MFU reads 0
            flops = 0.0
        self._flops[shape] = flops
        return flops

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
            if os.path.isdir(os.path.join(self.source, n)):
                shutil.copytree(os.path.join(self.source, n), os.path.join(dst, n), dirs_exist_ok=True)
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
