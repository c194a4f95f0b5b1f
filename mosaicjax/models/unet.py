"""UNet2DConditionModel with diffusers' semantics in Flax linen: the SD1.x / SD2.x / SDXL denoiser.

Numerically equal (float32) to diffusers' `UNet2DConditionModel` for the block types those checkpoints use
(CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D), weight-compatible
through mosaicjax/checkpoints/diffusers_unet.py. Layout is NHWC throughout (`sample` [batch, height, width,
channels]); the pipeline converts from/to diffusers' NCHW.

    t -> sinusoid -> time_embedding (+ add_embedding(text_embeds, sinusoid(time_ids)) for SDXL) = emb
    sample -> conv_in -> down_blocks (resnets [+ Transformer2D], downsample; every output is a skip)
           -> mid_block (resnet, Transformer2D, resnet) -> up_blocks (concat skip, resnet [+ Transformer2D],
           upsample) -> conv_norm_out -> act -> conv_out -> noise prediction

Parameter names mirror diffusers' state-dict keys with list indices joined by '_' (`down_blocks_0/resnets_1/
conv1/kernel` <-> `down_blocks.0.resnets.1.conv1.weight`); Flax layouts: conv kernels HWIO, dense kernels
[in, out], norms `scale`/`bias`.

diffusers quirks reproduced on purpose:
  * `attention_head_dim` is the NUMBER of heads (diffusers issue 2011) unless `num_attention_heads` is given;
    head_dim = block channels // heads. The mid block uses the last block's head count, up block i the
    reversed list's i-th.
  * Transformer2D's GroupNorm has eps 1e-6 and its LayerNorms 1e-5 whatever `norm_eps` says.
  * GEGLU feed-forward uses the exact (erf) GELU.
  * Up blocks upsample to the spatial size of the skip they meet next, so latents whose sides are not
    multiples of 2**num_upsamplers work as in diffusers.
Attention runs through `jax.nn.dot_product_attention` (fused cuDNN kernel on GPU for bf16/fp16 when it
applies, see `attention`; the XLA path computes logits and softmax in float32 for bf16 inputs).

Logical axes (mosaicjax/parallel/rules.py): attention q/k/v kernels ('embed', 'heads'), to_out ('heads',
'embed'), GEGLU ('embed', 'mlp') / ('mlp', 'embed'), time MLPs ('embed', 'mlp'), convs and the image<->token
projections (None, None, 'conv_in', 'conv_out') / ('conv_in', 'embed') / ('embed', 'conv_out'), norms ('norm',).
The default table splits 'conv_in' over fsdp ('conv_out' stays whole); the image task keeps whole any dimension the
mesh axes do not divide (rules.fit_to_shapes: conv_in's 4 input channels).
Activations: images ('act_batch', None, None, 'act_embed'), tokens ('act_batch', 'act_length', 'act_embed'),
heads ('act_batch', 'act_length', 'act_heads', 'act_head_dim').
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.models import image_attention
from mosaicjax.models.unet_config import (ATTENTION_IMPLS, DOWN_BLOCK_TYPES, MID_BLOCK_TYPES,  # noqa: F401
                                          REMAT_POLICIES, UP_BLOCK_TYPES, BlockSpec, UNetConfig)

ACTIVATIONS = {  # diffusers' get_activation table
    'silu': nn.silu,
    'swish': nn.silu,
    'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
    'gelu': functools.partial(nn.gelu, approximate=False),
    'relu': nn.relu,
}

IMG_AXES = ('act_batch', None, None, 'act_embed')  # [batch, height, width, channels]
SEQ_AXES = ('act_batch', 'act_length', 'act_embed')  # [batch, tokens, channels]
HEAD_AXES = ('act_batch', 'act_length', 'act_heads', 'act_head_dim')  # [batch, tokens, heads, head_dim]


# ----------------------------------------------------------------------------------------------------------
# Layers


def _dense(cfg: UNetConfig, features: int, axes: tuple, *, use_bias: bool = True, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name)


def _conv(cfg: UNetConfig, features: int, kernel: int, *, stride: int = 1, padding: int | None = None,
          name: str) -> nn.Conv:
    # Explicit symmetric padding as torch's Conv2d(padding=p); 'SAME' would pad stride-2 convs differently.
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, 'conv_in', 'conv_out')),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)), name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis, contiguous channel groups, two-pass float32 stats.

    Attributes:
      num_groups: channel groups (channels % num_groups == 0).
      eps: variance epsilon.
      dtype / param_dtype: output dtype / parameter dtype.
    """
    num_groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (c,),
                           self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)), (c,),
                          self.param_dtype)
        g = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        # g: [batch, *spatial, groups, channels/groups]; statistics over everything but batch and group.
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (with bias) over the last axis, float32 statistics."""
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (c,),
                           self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)), (c,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding: float32 [n] timesteps (may be fractional) -> float32 [n, dim]."""
    half = dim // 2
    # A trace-time constant: float64 then one rounding (torch computes it in float32; <= 1 ulp apart).
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    emb = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]  # [n, half]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)  # [n, 2*half]
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers TimestepEmbedding without cond_proj / post_act)."""
    config: UNetConfig
    features: int
    act_fn: str = 'silu'

    @nn.compact
    def __call__(self, x):
        x = _dense(self.config, self.features, ('embed', 'mlp'), name='linear_1')(x)
        x = ACTIVATIONS[self.act_fn.lower()](x)
        return _dense(self.config, self.features, ('mlp', 'embed'), name='linear_2')(x)


class ResnetBlock2D(nn.Module):
    """norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2, + (1x1) shortcut."""
    config: UNetConfig
    out_channels: int
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb):
        """x [batch, h, w, c_in]; temb [batch, time_embed_dim] -> [batch, h, w, out_channels]."""
        cfg = self.config
        act = ACTIVATIONS[cfg.act_fn.lower()]
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        h = act(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name='norm1')(x))
        h = _conv(cfg, self.out_channels, 3, name='conv1')(h)
        scale_shift = cfg.resnet_time_scale_shift == 'scale_shift'
        t = _dense(cfg, self.out_channels * (2 if scale_shift else 1), ('embed', 'conv_out'),
                   name='time_emb_proj')(act(temb))[:, None, None, :]  # [batch, 1, 1, out(*2)]
        norm2 = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dt, pdt, name='norm2')
        if scale_shift:
            t_scale, t_shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + t_scale) + t_shift
        else:
            h = norm2(h + t)
        h = _conv(cfg, self.out_channels, 3, name='conv2')(act(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(cfg, self.out_channels, 1, name='conv_shortcut')(x)
        out = (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h
        return nn.with_logical_constraint(out, IMG_AXES)


attention = image_attention.attention  # kept importable from here (tests, benchmarks)


class Attention(nn.Module):
    """Multi-head attention: to_q/to_k/to_v (no bias), to_out.0 (bias); self-attention when context is None."""
    config: UNetConfig
    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, context=None):
        """x [batch, seq_q, dim]; context [batch, seq_k, ctx_dim] or None -> [batch, seq_q, dim]."""
        cfg = self.config
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        b, t, dim = x.shape
        s = context.shape[1]
        q = _dense(cfg, inner, ('embed', 'heads'), use_bias=False, name='to_q')(x)  # [batch, seq_q, inner]
        k = _dense(cfg, inner, ('embed', 'heads'), use_bias=False, name='to_k')(context)  # [batch, seq_k, inner]
        v = _dense(cfg, inner, ('embed', 'heads'), use_bias=False, name='to_v')(context)  # [batch, seq_k, inner]
        q = nn.with_logical_constraint(q.reshape(b, t, self.num_heads, self.head_dim), HEAD_AXES)
        k = nn.with_logical_constraint(k.reshape(b, s, self.num_heads, self.head_dim), HEAD_AXES)
        v = nn.with_logical_constraint(v.reshape(b, s, self.num_heads, self.head_dim), HEAD_AXES)
        # upcast_attention guards float16 overflow in QK^T; bf16 has float32's range and the XLA path
        # already accumulates logits and softmax in float32, so only float16 is upcast here.
        dtype = q.dtype
        if cfg.upcast_attention and dtype == jnp.float16:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        o = attention(q, k, v, self.head_dim ** -0.5, cfg.attention_impl)  # [batch, seq_q, heads, head_dim]
        o = o.astype(dtype).reshape(b, t, inner)  # [batch, seq_q, inner]
        return _dense(cfg, dim, ('heads', 'embed'), name='to_out_0')(o)


class GEGLU(nn.Module):
    """proj to 2*inner, split (hidden, gate), hidden * gelu(gate) with the EXACT gelu (as diffusers)."""
    config: UNetConfig
    inner: int

    @nn.compact
    def __call__(self, x):
        h = _dense(self.config, 2 * self.inner, ('embed', 'mlp'), name='proj')(x)  # [batch, seq, 2*inner]
        h, gate = jnp.split(h, 2, axis=-1)  # each [batch, seq, inner]
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net.0 = GEGLU(dim -> 4*dim), net.2 = Dense(4*dim -> dim) (net.1 is dropout in diffusers)."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(self.config, 4 * dim, name='net_0')(x)
        return _dense(self.config, dim, ('mlp', 'embed'), name='net_2')(h)


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), text); x += ff(norm3(x)). LayerNorm eps 1e-5."""
    config: UNetConfig
    num_heads: int
    head_dim: int
    only_cross_attention: bool = False

    @nn.compact
    def __call__(self, x, context):
        """x [batch, tokens, dim]; context [batch, text_len, ctx_dim] -> [batch, tokens, dim]."""
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        attn = functools.partial(Attention, cfg, self.num_heads, self.head_dim)
        h = LayerNorm(1e-5, dt, pdt, name='norm1')(x)
        x = x + attn(name='attn1')(h, context if self.only_cross_attention else None)
        h = LayerNorm(1e-5, dt, pdt, name='norm2')(x)
        x = x + attn(name='attn2')(h, context)
        h = LayerNorm(1e-5, dt, pdt, name='norm3')(x)
        x = x + FeedForward(cfg, name='ff')(h)
        return nn.with_logical_constraint(x, SEQ_AXES)


def _remat(cls, cfg: UNetConfig):
    if cfg.remat == 'none':
        return cls
    # 'full' saves nothing (recompute the whole block); 'dots' keeps matmul/conv outputs.
    policy = {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots}[cfg.remat]
    return nn.remat(cls, policy=policy)


class Transformer2DModel(nn.Module):
    """GroupNorm(eps 1e-6) -> proj_in -> BasicTransformerBlocks over h*w tokens -> proj_out, + residual."""
    config: UNetConfig
    num_heads: int
    head_dim: int
    num_layers: int
    only_cross_attention: bool = False

    @nn.compact
    def __call__(self, x, context):
        """x [batch, h, w, c]; context [batch, text_len, ctx_dim] -> [batch, h, w, c]."""
        cfg = self.config
        b, hgt, wid, c = x.shape
        inner = self.num_heads * self.head_dim
        h = GroupNorm(cfg.norm_num_groups, 1e-6, cfg.compute_dtype, cfg.params_dtype, name='norm')(x)
        if cfg.use_linear_projection:
            h = h.reshape(b, hgt * wid, c)  # [batch, h*w, c]
            h = _dense(cfg, inner, ('conv_in', 'embed'), name='proj_in')(h)  # [batch, h*w, inner]
        else:
            h = _conv(cfg, inner, 1, name='proj_in')(h).reshape(b, hgt * wid, inner)  # [batch, h*w, inner]
        h = nn.with_logical_constraint(h, SEQ_AXES)  # [batch, h*w, inner]
        block = _remat(BasicTransformerBlock, cfg)
        for i in range(self.num_layers):
            h = block(cfg, self.num_heads, self.head_dim, self.only_cross_attention,
                      name=f'transformer_blocks_{i}')(h, context)
        if cfg.use_linear_projection:
            h = _dense(cfg, c, ('embed', 'conv_out'), name='proj_out')(h).reshape(b, hgt, wid, c)  # [b, h, w, c]
        else:
            h = _conv(cfg, c, 1, name='proj_out')(h.reshape(b, hgt, wid, inner))  # [batch, h, w, c]
        return h + x


def _nearest_resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='nearest', size=hw) on NHWC: source index floor(i * in / out)."""
    b, h, w, c = x.shape
    if hw == (2 * h, 2 * w):
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))  # [batch, h, 2, w, 2, c]
        return x.reshape(b, 2 * h, 2 * w, c)
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return x[:, rows][:, :, cols]


class Downsample2D(nn.Module):
    """3x3 conv, stride 2 (diffusers Downsample2D(use_conv=True)); the conv is the submodule 'conv'."""
    config: UNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        pad = self.config.downsample_padding
        if pad == 0:  # diffusers pads right/bottom by one, then convolves unpadded
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.config, self.out_channels, 3, stride=2, padding=pad, name='conv')(x)


class Upsample2D(nn.Module):
    """Nearest upsampling to `hw` then 3x3 conv (diffusers Upsample2D(use_conv=True)); conv is 'conv'."""
    config: UNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x, hw):
        return _conv(self.config, self.out_channels, 3, name='conv')(_nearest_resize(x, tuple(hw)))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: returns (x, the skips it adds: every layer output + downsample)."""
    config: UNetConfig
    spec: BlockSpec

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, spec = self.config, self.spec
        resnet, skips = _remat(ResnetBlock2D, cfg), []
        for j in range(spec.num_layers):
            x = resnet(cfg, spec.out_channels, name=f'resnets_{j}')(x, temb)
            if spec.cross_attention:
                x = Transformer2DModel(cfg, spec.num_heads, spec.head_dim, spec.transformer_layers[j],
                                       spec.only_cross_attention, name=f'attentions_{j}')(x, context)
            skips.append(x)
        if spec.resample:
            x = Downsample2D(cfg, spec.out_channels, name='downsamplers_0')(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, Transformer2D, resnet (resnets divide by mid_block_scale_factor)."""
    config: UNetConfig
    spec: BlockSpec

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, spec = self.config, self.spec
        resnet = _remat(ResnetBlock2D, cfg)
        x = resnet(cfg, spec.out_channels, cfg.mid_block_scale_factor, name='resnets_0')(x, temb)
        x = Transformer2DModel(cfg, spec.num_heads, spec.head_dim, spec.transformer_layers[0],
                               name='attentions_0')(x, context)
        return resnet(cfg, spec.out_channels, cfg.mid_block_scale_factor, name='resnets_1')(x, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: concat the newest skip, resnet [+ transformer], ...; then upsample."""
    config: UNetConfig
    spec: BlockSpec

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_hw=None):
        """skips: this block's num_layers skip tensors, oldest first; upsample_hw: (h, w) to upsample to."""
        cfg, spec = self.config, self.spec
        resnet = _remat(ResnetBlock2D, cfg)
        for j in range(spec.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)  # [batch, h, w, c + c_skip]
            x = resnet(cfg, spec.out_channels, name=f'resnets_{j}')(x, temb)
            if spec.cross_attention:
                x = Transformer2DModel(cfg, spec.num_heads, spec.head_dim, spec.transformer_layers[j],
                                       spec.only_cross_attention, name=f'attentions_{j}')(x, context)
        if spec.resample:
            x = Upsample2D(cfg, spec.out_channels, name='upsamplers_0')(x, upsample_hw)
        return x


class UNet2DConditionModel(nn.Module):
    """The denoiser. __call__(sample, timesteps, encoder_hidden_states, added_cond_kwargs=None) -> eps.

    Args (of __call__):
      sample: [batch, height, width, in_channels] latents, NHWC (diffusers is NCHW: the pipeline transposes).
      timesteps: [batch] or scalar, int or float (broadcast over the batch).
      encoder_hidden_states: [batch, text_len, cross_attention_dim] text-encoder states.
      added_cond_kwargs: SDXL ('text_time') only: {'text_embeds': [batch, pooled_dim],
        'time_ids': [batch, n_ids] (SDXL base: [h, w, crop_top, crop_left, target_h, target_w])}.
    Returns:
      float32 [batch, height, width, out_channels] (noise / v prediction; the scheduler runs in float32).
    """
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        cfg = self.config
        dt = cfg.compute_dtype
        b = sample.shape[0]
        x = sample.astype(dt)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))  # [batch]
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg, cfg.time_embed_dim, cfg.act_fn, name='time_embedding')(t_emb.astype(dt))
        if cfg.addition_embed_type == 'text_time':
            if not added_cond_kwargs or 'text_embeds' not in added_cond_kwargs or \
                    'time_ids' not in added_cond_kwargs:
                raise ValueError('addition_embed_type="text_time" needs added_cond_kwargs with "text_embeds" '
                                 'and "time_ids"')
            text_embeds = jnp.asarray(added_cond_kwargs['text_embeds'])  # [batch, pooled_dim]
            time_ids = jnp.asarray(added_cond_kwargs['time_ids'])
            time_ids = jnp.broadcast_to(time_ids, (b, time_ids.shape[-1]))  # [batch, n_ids]
            ids_emb = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                         cfg.freq_shift).reshape(b, -1)  # [batch, n_ids * time_dim]
            add_in = jnp.concatenate([text_embeds.astype(jnp.float32), ids_emb], axis=-1).astype(dt)
            emb = emb + TimestepEmbedding(cfg, cfg.time_embed_dim, 'silu', name='add_embedding')(add_in)

        context = nn.with_logical_constraint(jnp.asarray(encoder_hidden_states).astype(dt), SEQ_AXES)
        x = _conv(cfg, cfg.block_out_channels[0], cfg.conv_in_kernel, name='conv_in')(x)
        skips = [x]
        for i, spec in enumerate(cfg.down_block_specs()):
            x, s = DownBlock(cfg, spec, name=f'down_blocks_{i}')(x, emb, context)
            skips.extend(s)
        mid = cfg.mid_block_spec()
        if mid is not None:
            x = MidBlock(cfg, mid, name='mid_block')(x, emb, context)
        for i, spec in enumerate(cfg.up_block_specs()):
            block_skips, skips = skips[-spec.num_layers:], skips[:-spec.num_layers]
            # Upsample to the size of the skip met next: 2x when sides divide, diffusers' upsample_size if not.
            hw = skips[-1].shape[1:3] if spec.resample else None
            x = UpBlock(cfg, spec, name=f'up_blocks_{i}')(x, block_skips, emb, context, hw)
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dt, cfg.params_dtype, name='conv_norm_out')(x)
        x = ACTIVATIONS[cfg.act_fn.lower()](x)
        x = _conv(cfg, cfg.out_channels, cfg.conv_out_kernel, name='conv_out')(x)
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Construction helpers


def dummy_inputs(cfg: UNetConfig, batch: int = 1) -> dict:
    """Smallest inputs that build every parameter (for init / eval_shape): keyword args of __call__."""
    side = 2 ** (len(cfg.block_out_channels) - 1)
    kw = dict(sample=jnp.zeros((batch, side, side, cfg.in_channels), jnp.float32),
              timesteps=jnp.zeros((batch,), jnp.float32),
              encoder_hidden_states=jnp.zeros((batch, 1, cfg.cross_attention_dims[0]), jnp.float32))
    if cfg.addition_embed_type == 'text_time':
        # Only the concatenated width matters for the parameters: one id plus the remaining text width.
        text = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
        kw['added_cond_kwargs'] = {'text_embeds': jnp.zeros((batch, text), jnp.float32),
                                   'time_ids': jnp.zeros((batch, 1), jnp.float32)}
    return kw


def init_params(cfg: UNetConfig, rng: jax.Array) -> dict:
    """Random parameters (the 'params' collection, logical-partitioning boxes removed)."""
    variables = UNet2DConditionModel(cfg).init(rng, **dummy_inputs(cfg))
    return nn.meta.unbox(variables['params'])


def param_shapes(cfg: UNetConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves (no memory; works for full-size configs)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_logical_axes(cfg: UNetConfig) -> dict:
    """Logical PartitionSpecs of the parameter tree (for NamedSharding via the rules table)."""
    boxed = jax.eval_shape(lambda: UNet2DConditionModel(cfg).init(jax.random.key(0), **dummy_inputs(cfg)))
    return nn.get_partition_spec(boxed)['params']
