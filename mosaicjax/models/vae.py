"""Stable Diffusion's VAE (diffusers AutoencoderKL) in Flax linen, NHWC, numerically diffusers'.

Encoder: conv_in 3x3 -> per level `layers_per_block` ResnetBlock2D (GroupNorm(eps 1e-6) -> act -> conv3x3 ->
GroupNorm -> act -> conv3x3, 1x1 conv shortcut when channels change) and, except at the last level, a stride-2
3x3 conv after zero padding (0, 1, 0, 1) (bottom/right only: diffusers' Downsample2D with padding=0) -> mid block
(resnet, single-head self-attention over all pixels with GroupNorm and residual, resnet) -> GroupNorm -> act ->
conv_out to 2 * latent_channels (mean, logvar) -> quant_conv 1x1 (when use_quant_conv).
Decoder: post_quant_conv 1x1 (when use_post_quant_conv) -> conv_in -> mid block -> per level (reversed channels)
`layers_per_block + 1` resnets and, except at the last level, nearest-neighbour x2 upsampling + conv3x3 ->
GroupNorm -> act -> conv_out.

Layout: images and latents are NHWC here ([batch, height, width, channels]); diffusers' are NCHW. Conv kernels
are [kh, kw, in, out] (mosaicjax/checkpoints/diffusers_parts.py converts exactly). Images are in [-1, 1].
The latent scaling of the pipelines is `scale_latents` / `unscale_latents`: z_unet = (z - shift) * scaling.

Parameter tree mirrors the diffusers state dict: encoder/down_blocks_0/resnets_1/conv1/kernel,
encoder/mid_block/attentions_0/to_q/kernel, decoder/up_blocks_2/upsamplers_0/conv/bias, quant_conv/kernel...
Logical axes: conv kernels (None, None, 'conv_in', 'conv_out'), attention kernels ('conv_in', 'conv_out'),
biases ('conv_out',), GroupNorm ('norm',). The image task and the pipeline replicate the VAE (84M parameters)
whatever the rules say; activations are constrained to ('act_batch', 'act_height', 'act_width',
'act_channels') (batch-sharded under the default rules).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mosaicjax.models import image_attention

_ACT = ('act_batch', 'act_height', 'act_width', 'act_channels')


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config (vae/config.json); field names and defaults are diffusers'.

    Attributes:
      in_channels: image channels in (3).
      out_channels: image channels out (3).
      down_block_types: one 'DownEncoderBlock2D' per level (the only kind AutoencoderKL's SD VAEs use).
      up_block_types: one 'UpDecoderBlock2D' per level.
      block_out_channels: channels per level (SD: (128, 256, 512, 512): 8x downsampling).
      layers_per_block: resnets per encoder level (the decoder has one more).
      act_fn: activation: 'silu' / 'swish', 'gelu' (exact), 'relu', 'mish'.
      latent_channels: latent channels (4).
      norm_num_groups: GroupNorm groups (32).
      sample_size: training image size (only for tiling heuristics; unused here).
      scaling_factor: latents are multiplied by this before the UNet (SD1/2: 0.18215, SDXL: 0.13025).
      shift_factor: subtracted before scaling (None = 0; used by SD3/Flux VAEs).
      latents_mean / latents_std: per-channel statistics some VAEs publish (kept for the pipeline; unused here).
      force_upcast: the VAE overflows in float16: run it in float32 (a hint for the pipeline).
      use_quant_conv: 1x1 conv on the encoder's moments.
      use_post_quant_conv: 1x1 conv on latents before the decoder.
      mid_block_add_attention: self-attention in the mid blocks.
      dtype: compute dtype; GroupNorm statistics and the attention softmax are float32 regardless.
      param_dtype: parameter dtype.
      attention_impl: the mid-block attention's implementation (models/image_attention.py; 'auto' per backend).
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ('DownEncoderBlock2D',)
    up_block_types: tuple = ('UpDecoderBlock2D',)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = 'silu'
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = 'float32'
    param_dtype: str = 'float32'
    attention_impl: str = 'auto'

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f'{n} block_out_channels but {len(self.down_block_types)} down / '
                             f'{len(self.up_block_types)} up block types')
        if set(self.down_block_types) != {'DownEncoderBlock2D'} or set(self.up_block_types) != {'UpDecoderBlock2D'}:
            raise ValueError(f'only DownEncoderBlock2D / UpDecoderBlock2D are supported, got '
                             f'{self.down_block_types} / {self.up_block_types}')
        if self.act_fn not in ('silu', 'swish', 'gelu', 'relu', 'mish'):
            raise ValueError(f'unsupported act_fn {self.act_fn!r}')
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f'block_out_channels {self.block_out_channels} not divisible by '
                                 f'norm_num_groups={self.norm_num_groups}')

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _act(name: str, x: jax.Array) -> jax.Array:
    if name in ('silu', 'swish'):
        return jax.nn.silu(x)
    if name == 'gelu':
        return jax.nn.gelu(x, approximate=False)
    if name == 'relu':
        return jax.nn.relu(x)
    return x * jnp.tanh(jax.nn.softplus(x))  # mish


class _Ctx(nn.Module):
    """Base with the config and small factories shared by every block."""
    config: VAEConfig

    def conv(self, features: int, kernel: int, name: str | None, padding: Any = 1, strides: int = 1) -> nn.Conv:
        cfg = self.config
        pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=pad,
                       dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                (None, None, 'conv_in', 'conv_out')),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))

    def norm(self, name: str) -> nn.GroupNorm:
        cfg = self.config
        # use_fast_variance=False: two-pass variance as torch computes it (E[x^2] - E[x]^2 cancels badly).
        return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=1e-6, use_fast_variance=False,
                            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))

    def act(self, x: jax.Array) -> jax.Array:
        return _act(self.config.act_fn, x)


class ResnetBlock2D(_Ctx):
    """diffusers ResnetBlock2D without time embedding (temb_channels=None), output_scale_factor 1."""
    out_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(self.out_channels, 3, 'conv1')(self.act(self.norm('norm1')(x)))
        h = self.conv(self.out_channels, 3, 'conv2')(self.act(self.norm('norm2')(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, 'conv_shortcut', padding=0)(x)
        return nn.with_logical_constraint(x + h, _ACT)


class Downsample2D(_Ctx):
    """Stride-2 3x3 conv after zero padding one row at the bottom and one column at the right."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x.shape[-1], 3, 'conv', padding=((0, 1), (0, 1)), strides=2)(x)


class Upsample2D(_Ctx):
    """Nearest-neighbour x2 (torch F.interpolate(scale_factor=2, mode='nearest')) then a 3x3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [batch, 2h, 2w, channels]
        return self.conv(x.shape[-1], 3, 'conv')(x)


class AttentionBlock(_Ctx):
    """The VAE mid-block attention: GroupNorm, one head over all channels, residual (diffusers Attention with
    heads = 1, dim_head = channels, bias, residual_connection, rescale 1)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, hh, ww, c = x.shape

        def dense(name):
            return nn.Dense(c, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                     ('conv_in', 'conv_out')),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))

        h = self.norm('group_norm')(x).reshape(b, hh * ww, c)  # [batch, pixels, channels]
        q, k, v = dense('to_q')(h), dense('to_k')(h), dense('to_v')(h)
        heads = lambda a: a.reshape(b, hh * ww, 1, c)  # noqa: E731  # [batch, pixels, 1 head, channels]
        out = image_attention.attention(heads(q), heads(k), heads(v), c ** -0.5, cfg.attention_impl)
        out = out.reshape(b, hh * ww, c)  # [batch, pixels, channels]
        out = dense('to_out_0')(out).reshape(b, hh, ww, c)  # [batch, h, w, channels]
        return x + out


class MidBlock(_Ctx):
    """UNetMidBlock2D: resnet, (attention), resnet."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(self.config, c, name='resnets_0')(x)
        if self.config.mid_block_add_attention:
            x = AttentionBlock(self.config, name='attentions_0')(x)
        return ResnetBlock2D(self.config, c, name='resnets_1')(x)


class DownEncoderBlock2D(_Ctx):
    out_channels: int = 0
    num_layers: int = 1
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.config, self.out_channels, name=f'resnets_{j}')(x)
        if self.add_downsample:
            x = Downsample2D(self.config, name='downsamplers_0')(x)
        return x


class UpDecoderBlock2D(_Ctx):
    out_channels: int = 0
    num_layers: int = 1
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.config, self.out_channels, name=f'resnets_{j}')(x)
        if self.add_upsample:
            x = Upsample2D(self.config, name='upsamplers_0')(x)
        return x


class Encoder(_Ctx):
    """Image [batch, H, W, in_channels] -> moments [batch, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans = cfg.block_out_channels
        x = self.conv(chans[0], 3, 'conv_in')(x.astype(jnp.dtype(cfg.dtype)))
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(cfg, c, cfg.layers_per_block, i < len(chans) - 1, name=f'down_blocks_{i}')(x)
        x = MidBlock(cfg, name='mid_block')(x)
        x = self.act(self.norm('conv_norm_out')(x))
        return self.conv(2 * cfg.latent_channels, 3, 'conv_out')(x)


class Decoder(_Ctx):
    """Latents [batch, h, w, latent_channels] (after post_quant_conv) -> image [batch, h*f, w*f, out_channels]."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        x = self.conv(chans[0], 3, 'conv_in')(z.astype(jnp.dtype(cfg.dtype)))
        x = MidBlock(cfg, name='mid_block')(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock2D(cfg, c, cfg.layers_per_block + 1, i < len(chans) - 1, name=f'up_blocks_{i}')(x)
        x = self.act(self.norm('conv_norm_out')(x))
        return self.conv(cfg.out_channels, 3, 'conv_out')(x)


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' DiagonalGaussianDistribution (latent_dist): logvar clamped to [-30, 20]. NHWC."""
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """KL to N(0, 1) summed over all but the batch axis: [batch]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(_Ctx):
    """encode(images) -> DiagonalGaussian; decode(latents) -> images. __call__ = decode(encode(x).mode()) (init).

    Use with `model.apply(variables, x, method='encode')` / `method='decode'`.
    """

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        # Submodules made in setup take their names from the attributes (name=None).
        self.quant_conv = self.conv(2 * c, 1, None, padding=0) if cfg.use_quant_conv else None
        self.post_quant_conv = self.conv(c, 1, None, padding=0) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [batch, H, W, in_channels] in [-1, 1]; H, W multiples of downsample_factor."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # [batch, h, w, latent] each
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: unscaled latents [batch, h, w, latent_channels] -> images [batch, h*f, w*f, out_channels]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(jnp.dtype(self.config.dtype)))
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x).mode())


def scale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """VAE latents -> the UNet's latent space: (z - shift_factor) * scaling_factor."""
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def unscale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """The UNet's latents -> what decode() takes: z / scaling_factor + shift_factor."""
    return z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
