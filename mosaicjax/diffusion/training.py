"""The latent-diffusion training objective, EMA, and the VAE pre-training objective (pure functions + one step).

Diffusion (what the UNet learns): x0 = VAE latents (scaled by the VAE's scaling factor), t ~ U{0..T-1},
noise ~ N(0, 1) [+ noise_offset * per-channel N(0, 1)], x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise with a_t the
scheduler config's alphas_cumprod; the target is the noise ('epsilon') or v = sqrt(a_t) noise - sqrt(1 - a_t) x0
('v_prediction'); the loss is the per-example mean squared error, optionally weighted by min-SNR-gamma
(Hang et al. 2023: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v), averaged over the batch.
Captions are replaced by the empty prompt with probability `caption_dropout` so classifier-free guidance has an
unconditional model to subtract.

VAE pre-training (`train_vae`): L1 reconstruction of the posterior sample plus kl_weight * KL(q(z|x) || N(0, 1)).

EMA: ema <- d * ema + (1 - d) * params after every update, d = min(ema_decay, (1 + step) / (10 + step)) so the
average follows the fast early changes; the EMA weights are saved with the state and used for sampling/export.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import optax

from mosaicjax.models import vae as vae_lib


@gin.configurable("diffusion")
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    # 'epsilon' | 'v_prediction' | None (None: the scheduler config's prediction_type).
    prediction_type: str | None = None
    # Min-SNR-gamma loss weighting (5.0 is the paper's choice); None disables it.
    min_snr_gamma: float | None = None
    # Offset noise strength (0.1 is common): lets the model learn very dark / bright images.
    noise_offset: float = 0.0
    # Probability of training on the empty prompt instead of the caption (for classifier-free guidance).
    caption_dropout: float = 0.1
    # EMA decay of the trained weights (0 disables the average: it then equals the weights).
    ema_decay: float = 0.999
    # Compute dtype of the UNet and text encoder ('float32' | 'bfloat16'); parameters stay float32 (master).
    compute_dtype: str = "float32"
    # Rematerialise the UNet's resnet/transformer blocks in the backward pass: 'none' | 'full' | 'dots'.
    remat: str = "none"
    # Also train the (first) text encoder; otherwise it is frozen.
    train_text_encoder: bool = False
    # Pre-train the VAE (reconstruction + KL) instead of the UNet.
    train_vae: bool = False
    # Weight of the KL term in VAE pre-training.
    kl_weight: float = 1e-4
    # Train the UNet on posterior samples (True) or on the posterior mean.
    sample_latents: bool = True

    def __post_init__(self):
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"diffusion.prediction_type={self.prediction_type!r}; use 'epsilon' or 'v_prediction'")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"diffusion.compute_dtype={self.compute_dtype!r}; use 'float32' or 'bfloat16'")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"diffusion.caption_dropout={self.caption_dropout} must be in [0, 1]")


@flax.struct.dataclass
class ImageTrainState:
    """TrainState of the image task: the LM's four fields plus the EMA and the frozen components."""
    step: jax.Array      # int32 scalar
    params: Any          # trained components {'unet'[, 'text_encoder']} or {'vae'} (float32 master)
    opt_state: Any
    rng: jax.Array       # uint32[2]; per-step keys are fold_in(rng, step)
    ema: Any             # EMA of params (same tree)
    frozen: Any          # components not trained (kept so the checkpoint is a whole model)


# ------------------------------------------------------------------------------------------------- objective

def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise [batch, h, w, c], t int [batch]."""
    a = alphas_cumprod[t][:, None, None, None]  # [batch, 1, 1, 1]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(x0, noise, t, alphas_cumprod):
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers' get_velocity)."""
    a = alphas_cumprod[t][:, None, None, None]  # [batch, 1, 1, 1]
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def snr(t, alphas_cumprod):
    a = alphas_cumprod[t]
    return a / (1.0 - a)


def loss_weights(t, alphas_cumprod, prediction_type: str, min_snr_gamma: float | None):
    """Per-example weights [batch]: ones, or min-SNR-gamma's."""
    if not min_snr_gamma:
        return jnp.ones(t.shape, jnp.float32)
    s = snr(t, alphas_cumprod)
    clipped = jnp.minimum(s, min_snr_gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def diffusion_loss(pred, target, weights):
    """Mean over the batch of weight * per-example MSE (mean over h, w, c); float32."""
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))  # [b]
    return jnp.mean(weights * mse)


def sample_training_noise(rng, shape, noise_offset: float):
    k1, k2 = jax.random.split(rng)
    noise = jax.random.normal(k1, shape, jnp.float32)  # [batch, h, w, c]
    if noise_offset:
        noise = noise + noise_offset * jax.random.normal(k2, (shape[0], 1, 1, shape[-1]), jnp.float32)
    return noise


def ema_decay_at(step, ema_decay: float):
    if not ema_decay:
        return jnp.zeros((), jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


# ---------------------------------------------------------------------------------------------------- step

def text_conditioning(models: dict, params_of, ids: dict, is_sdxl: bool):
    """What the UNet attends to: (context float32 [batch, 77, width], pooled [batch, proj] or None).

    SD1/SD2: the (only) encoder's last hidden state. SDXL: both encoders' penultimate hidden states concatenated
    along features, and text_encoder_2's projected pooled output. `params_of(name)` gives an encoder's params;
    `ids`: {'input_ids': int32 [batch, 77], 'input_ids_2': ...}. Shared by the step and the latent cache
    (mosaicjax/data/latent_cache.py), so cached and in-step embeddings are the same computation.
    """
    states, pooled = [], None
    for j, name in enumerate(n for n in ("text_encoder", "text_encoder_2") if n in models):
        key = "input_ids" if j == 0 else f"input_ids_{j + 1}"
        last, aux = models[name].apply({"params": params_of(name)}, ids[key])
        if not is_sdxl:
            states.append(last)
            continue
        states.append(aux["hidden_states"][-2])
        if "text_embeds" in aux and pooled is None:
            pooled = aux["text_embeds"].astype(jnp.float32)
    return jnp.concatenate(states, axis=-1).astype(jnp.float32), pooled  # [batch, 77, width]


def latent_moments(models: dict, vae_params, pixels):
    """The VAE posterior's (mean, logvar) [batch, h, w, latent] float32 (logvar clamped as diffusers does)."""
    dist = models["vae"].apply({"params": vae_params}, pixels, method="encode")
    return dist.mean, dist.logvar


CACHED_KEYS = ("latent_mean", "latent_logvar", "context")  # + 'pooled' (SDXL) and 'time_ids'


def _microbatches(batch: dict, n: int) -> dict:
    from mosaicjax.trainer.step import _microbatches as split  # pylint: disable=import-outside-toplevel
    return split(batch, n)


def make_train_step(models: dict, tx: optax.GradientTransformation, schedule, cfg: DiffusionConfig, *,
                    alphas_cumprod, prediction_type: str, vae_cfg, empty_ids: dict, is_sdxl: bool,
                    grad_accum_steps: int = 1, cached_empty: dict | None = None):
    """train_step(state, batch) -> (state, metrics).

    models: {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']} Flax modules; empty_ids: {'input_ids': int32
    [77] of the empty prompt, ...} (what caption dropout swaps in); batch: see mosaicjax/data/images.py.

    cached_empty: latent-cache mode (mosaicjax/data/latent_cache.py). The batch then holds the VAE moments and
    text embeddings instead of pixels and token ids ({'latent_mean', 'latent_logvar', 'context'[, 'pooled'],
    'time_ids'}), the encoders are never run, and caption dropout swaps in cached_empty = {'context': [77, width]
    [, 'pooled': [proj]]}, the empty prompt's embeddings.

    Every random draw of a step (caption dropout, the latent sample, the noise, the timesteps) is made for the
    whole global batch from fold_in(rng, step) before it is split into `grad_accum_steps` microbatches, and the
    losses are sums over examples divided by the global batch: accumulating microbatches gives the gradient of
    the whole batch in one piece (up to float summation order).
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    num_t = ac.shape[0]
    n_micro = int(grad_accum_steps)
    if cached_empty is not None and (cfg.train_vae or cfg.train_text_encoder):
        raise ValueError("the latent cache needs frozen text encoders and VAE (diffusion.train_vae and "
                         "diffusion.train_text_encoder False)")

    def params_getter(params, frozen):
        return lambda name: params[name] if name in params else frozen[name]

    def unet_loss(params, frozen, mb, total):
        """Sum over the microbatch of weighted per-example MSE, divided by the global batch `total`."""
        if cached_empty is not None:
            mean, logvar = mb["latent_mean"], mb["latent_logvar"]
            context = jnp.where(mb["drop"][:, None, None], cached_empty["context"][None], mb["context"])
            pooled = None
            if is_sdxl:
                pooled = jnp.where(mb["drop"][:, None], cached_empty["pooled"][None], mb["pooled"])
        else:
            mean, logvar = latent_moments(models, frozen["vae"], mb["pixels"])
            ids = {k: jnp.where(mb["drop"][:, None], empty_ids[k][None, :], mb[k]) for k in empty_ids}  # [b, 77]
            context, pooled = text_conditioning(models, params_getter(params, frozen), ids, is_sdxl)
        # The posterior sample as DiagonalGaussian.sample draws it: mean + std * eps.
        z = mean + jnp.exp(0.5 * logvar) * mb["eps_latent"] if cfg.sample_latents else mean
        x0 = jax.lax.stop_gradient(vae_lib.scale_latents(z, vae_cfg))  # [b, h, w, 4]
        t, noise = mb["t"], mb["noise"]
        x_t = add_noise(x0, noise, t, ac)
        target = velocity(x0, noise, t, ac) if prediction_type == "v_prediction" else noise
        added = {"text_embeds": pooled, "time_ids": mb["time_ids"]} if is_sdxl else None
        pred = models["unet"].apply({"params": params["unet"]}, x_t, t, context, added)
        mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))  # [b]
        loss = jnp.sum(loss_weights(t, ac, prediction_type, cfg.min_snr_gamma) * mse) / total
        return loss, {"loss": loss, "caption_dropout_rate": jnp.sum(mb["drop"].astype(jnp.float32)) / total}

    def vae_loss(params, frozen, mb, total):
        """Microbatch means divided by the microbatch count (microbatches are equal in size)."""
        del frozen, total
        pixels = mb["pixels"]
        mean, logvar = latent_moments(models, params["vae"], pixels)
        dist = vae_lib.DiagonalGaussian(mean, logvar)
        recon = models["vae"].apply({"params": params["vae"]}, mean + dist.std * mb["eps_latent"], method="decode")
        rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - pixels)) / n_micro
        kl = jnp.mean(dist.kl()) / (pixels.shape[1] * pixels.shape[2] * pixels.shape[3]) / n_micro
        loss = rec + cfg.kl_weight * kl
        return loss, {"loss": loss, "reconstruction_loss": rec, "kl_loss": kl}

    grad_fn = jax.value_and_grad(vae_loss if cfg.train_vae else unet_loss, has_aux=True)

    def draws(rng, batch):
        """The step's random draws for the whole global batch (see the docstring)."""
        if cached_empty is not None:
            latent_shape = batch["latent_mean"].shape  # [B, h, w, c]
        else:
            bsz, height, width, _ = batch["pixels"].shape
            f = vae_cfg.downsample_factor
            latent_shape = (bsz, height // f, width // f, vae_cfg.latent_channels)
        if cfg.train_vae:
            return {"eps_latent": jax.random.normal(rng, latent_shape, jnp.float32)}
        k_drop, k_lat, k_noise, k_t = jax.random.split(rng, 4)
        bsz = latent_shape[0]
        return {"drop": jax.random.uniform(k_drop, (bsz,)) < cfg.caption_dropout,  # [B]
                "eps_latent": jax.random.normal(k_lat, latent_shape, jnp.float32),
                "noise": sample_training_noise(k_noise, latent_shape, cfg.noise_offset),
                "t": jax.random.randint(k_t, (bsz,), 0, num_t)}

    def train_step(state: ImageTrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        full = {**batch, **draws(rng, batch)}
        total = jnp.float32(jax.tree.leaves(batch)[0].shape[0])
        if n_micro == 1:
            (_, stats), grads = grad_fn(state.params, state.frozen, full, total)
        else:
            def body(carry, mb):
                grads_acc, stats_acc = carry
                (_, stats), grads = grad_fn(state.params, state.frozen, mb, total)
                return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, stats_acc, stats)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            _, abstract_stats = jax.eval_shape(grad_fn, state.params, state.frozen,
                                               jax.tree.map(lambda x: x[:x.shape[0] // n_micro], full), total)[0]
            zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_stats)
            (grads, stats), _ = jax.lax.scan(body, (zeros, zero_stats), _microbatches(full, n_micro))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, cfg.ema_decay)
        ema = ema_update(state.ema, params, decay) if cfg.ema_decay else params
        metrics = {**stats, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "ema_decay": decay}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return train_step

