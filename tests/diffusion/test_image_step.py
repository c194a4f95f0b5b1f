"""The image train step (mosaicjax/diffusion/training.py) without the CLI: gradient accumulation equals one big
batch, and the latent-cache step (cached moments and embeddings) equals the step that runs the encoders.

Tiny SD1- and SDXL-shaped models are built in JAX (no torch, no files); an SGD(1) update makes the parameter
change equal the gradient, so comparing parameters compares gradients without Adam's sign-like first step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mosaicjax.diffusion import training as tr
from mosaicjax.models import clip as clip_lib
from mosaicjax.models import unet as unet_lib
from mosaicjax.models import unet_config
from mosaicjax.models import vae as vae_lib

SIDE = 16  # pixels; latents 8x8 (VAE factor 2)
TOKENS = 77


def _models(kind):
    """Tiny models (one UNet level, one-layer text encoders) and non-degenerate random parameters made on the host
    from the eval_shape'd trees: a jitted Flax init compiles every initializer's RNG (tens of seconds here)."""
    width = 16
    te = clip_lib.CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=32, projection_dim=8,
                                 num_hidden_layers=1, num_attention_heads=2, eos_token_id=63)
    models = {"vae": vae_lib.AutoencoderKL(vae_lib.VAEConfig(block_out_channels=(8, 8), down_block_types=(
        "DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)),
        "text_encoder": clip_lib.CLIPTextModel(te)}
    kw = dict(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
              down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
              cross_attention_dim=width)
    if kind == "sdxl":
        models["text_encoder_2"] = clip_lib.CLIPTextModelWithProjection(te)
        kw.update(cross_attention_dim=2 * width, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    ucfg = unet_config.UNetConfig(**kw)
    models["unet"] = unet_lib.UNet2DConditionModel(ucfg)
    shapes = {"unet": unet_lib.param_shapes(ucfg),
              "vae": jax.eval_shape(lambda: models["vae"].init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))}
    shapes["vae"] = flax_unbox(shapes["vae"]["params"])
    for n in ("text_encoder", "text_encoder_2"):
        if n in models:
            shapes[n] = flax_unbox(jax.eval_shape(lambda n=n: models[n].init(
                jax.random.PRNGKey(0), jnp.zeros((1, TOKENS), jnp.int32)))["params"])
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(s.shape) == 1:
            return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * rng.standard_normal(s.shape), jnp.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)
    return models, jax.tree_util.tree_map_with_path(fill, shapes)


def flax_unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


def _batch(kind, b=8, seed=0):
    rng = np.random.default_rng(seed)
    out = {"pixels": rng.uniform(-1, 1, (b, SIDE, SIDE, 3)).astype(np.float32),
           "input_ids": rng.integers(0, 63, (b, TOKENS)).astype(np.int32),
           "time_ids": np.tile(np.asarray([[SIDE, SIDE, 0, 0, SIDE, SIDE]], np.float32), (b, 1))}
    out["input_ids"][:, -1] = 63
    if kind == "sdxl":
        out["input_ids_2"] = rng.integers(0, 63, (b, TOKENS)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


def _setup(kind, **dcfg_kw):
    models, params = _models(kind)
    ac = np.linspace(0.999, 0.01, 1000).astype(np.float32)
    empty = {"input_ids": jnp.full((TOKENS,), 63, jnp.int32)}
    if kind == "sdxl":
        empty["input_ids_2"] = jnp.full((TOKENS,), 63, jnp.int32)
    dcfg = tr.DiffusionConfig(**{"caption_dropout": 0.3, "min_snr_gamma": 5.0, "noise_offset": 0.1,
                                 "ema_decay": 0.0, **dcfg_kw})
    trained = ("vae",) if dcfg.train_vae else ("unet",)
    tx = optax.sgd(1.0)
    state = tr.ImageTrainState(step=jnp.zeros((), jnp.int32), params={n: params[n] for n in trained},
                               opt_state=tx.init({n: params[n] for n in trained}), rng=jax.random.PRNGKey(7),
                               ema={n: params[n] for n in trained},
                               frozen={n: params[n] for n in params if n not in trained})

    def make(**kw):
        return jax.jit(tr.make_train_step(models, tx, lambda s: 1.0, dcfg, alphas_cumprod=ac,
                                          prediction_type="epsilon", vae_cfg=models["vae"].config,
                                          empty_ids=empty, is_sdxl=kind == "sdxl", **kw))
    return models, params, state, empty, make


def _assert_same_step(a, b, rtol):
    (sa, ma), (sb, mb) = a, b
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=rtol)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=rtol)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-2)


@pytest.fixture(scope="module")
def sdxl():
    """The SDXL-shaped setup (two encoders, pooled projection, time ids) and its plain step on a batch of 8."""
    models, params, state, empty, make = _setup("sdxl")
    batch = _batch("sdxl")
    return models, params, state, empty, make, batch, make()(state, batch)


def test_grad_accum_two_by_four_equals_one_batch_of_eight(sdxl):
    _, _, state, _, make, batch, whole = sdxl
    accum = make(grad_accum_steps=2)(state, batch)
    # Same draws (made for the whole batch, then split): only float summation order differs.
    _assert_same_step(whole, accum, rtol=2e-5)
    assert 0 < float(whole[1]["caption_dropout_rate"]) < 1  # dropout did swap in the empty prompt


def test_grad_accum_vae_pretraining():
    _, _, state, _, make = _setup("sd1", train_vae=True)
    batch = _batch("sd1")
    _assert_same_step(make()(state, batch), make(grad_accum_steps=2)(state, batch), rtol=2e-5)


def _cached_inputs(models, params, empty, batch, kind):
    """What the latent cache stores for `batch`: latent_moments and text_conditioning of each record."""
    return jax.jit(lambda p, b: _cached_inputs_fn(models, p, empty, b, kind))(params, batch)


def _cached_inputs_fn(models, params, empty, batch, kind):
    mean, logvar = tr.latent_moments(models, params["vae"], batch["pixels"])
    ids = {k: batch[k] for k in empty}
    context, pooled = tr.text_conditioning(models, lambda n: params[n], ids, kind == "sdxl")
    e_ctx, e_pooled = tr.text_conditioning(models, lambda n: params[n], {k: v[None] for k, v in empty.items()},
                                           kind == "sdxl")
    cached = {"latent_mean": mean, "latent_logvar": logvar, "context": context, "time_ids": batch["time_ids"]}
    cached_empty = {"context": e_ctx[0]}
    if kind == "sdxl":
        cached["pooled"], cached_empty["pooled"] = pooled, e_pooled[0]
    return cached, cached_empty


class _NoEncoders(dict):
    """The cached step must not touch the encoders: any use of them fails."""

    def __getitem__(self, name):
        if name != "unet":
            raise AssertionError(f"the cached step used {name}")
        return super().__getitem__(name)


def _cached_step(models, empty, kind, cached_empty, **kw):
    return jax.jit(tr.make_train_step(
        _NoEncoders(models), optax.sgd(1.0), lambda s: 1.0, tr.DiffusionConfig(
            caption_dropout=0.3, min_snr_gamma=5.0, noise_offset=0.1, ema_decay=0.0),
        alphas_cumprod=np.linspace(0.999, 0.01, 1000).astype(np.float32), prediction_type="epsilon",
        vae_cfg=models["vae"].config, empty_ids=empty, is_sdxl=kind == "sdxl", cached_empty=cached_empty, **kw))


def test_cached_step_equals_encoder_step(sdxl):
    """Cached inputs (both encoders' penultimate states, the pooled projection, time ids), here with
    grad_accum_steps=2, against the plain step that runs the encoders on pixels and token ids. The cached step
    samples and drops captions with the same draws, so it computes the same loss and gradient. Not bit-equal in
    general: the encoders ran in another compiled program (another batch shape), whose float results may differ in
    the last bits; everything downstream is the same computation. (Through the CLI on XLA:CPU the losses do come
    out bit-equal: tests/diffusion/test_training.py.)"""
    models, params, state, empty, _, batch, want = sdxl
    cached, cached_empty = _cached_inputs(models, params, empty, batch, "sdxl")
    got = _cached_step(models, empty, "sdxl", cached_empty, grad_accum_steps=2)(state, cached)
    _assert_same_step(want, got, rtol=2e-5)
