"""Dense building blocks shared by the decoder models: LayerNorm, RoPE, masked GQA attention (with a KV cache).

Numerics follow transformers' DBRX (the parity reference): bias-free LayerNorm computed in float32,
NeoX-style ("rotate_half") rotary embeddings, softmax scale 1/sqrt(head_dim), softmax in float32.

Every parameter carries logical axis names (see mosaicjax/parallel/rules.py) and the key activations are
constrained with logical names; outside a mesh/rules context those constraints are no-ops, so nothing here
depends on the mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.models import chunked_attention
from mosaicjax.models import quantize as quantize_lib

Dtype = Any

# Values accepted by `attention(..., impl=)` / DbrxConfig.attention_impl.
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'einsum', 'chunked')


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum('...i,io->...o', x, w)  # [..., in] x [in, out] -> [..., out]


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    dx = jnp.einsum('...o,io->...i', g, w)  # [..., in]
    # The weight gradient as one plain [in, rows] x [rows, out] product over flattened rows. Left to autodiff,
    # XLA:CPU lowers this contraction over (batch, seq) through a slow transposed path (the lm_head's weight
    # gradient alone went from 183 to 109 ms per step at d_model 256, vocab 4096, 2k tokens, on one core).
    dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))  # [in, out]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`dot_general` for nn.Dense: a [.., in] x [in, out] product gets the explicit backward above."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
            and precision is None and preferred_element_type is None and not kwargs):
        return _matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


class LayerNorm(nn.Module):
    """LayerNorm without bias (DBRX uses `nn.LayerNorm(d, bias=False)`), statistics in float32.

    Attributes:
      eps: variance epsilon (torch's default 1e-5 for DBRX).
      dtype: dtype of the output (the compute dtype of the model).
      param_dtype: dtype of the `scale` parameter.
    """
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                           (features,), self.param_dtype)
        # float32 statistics: bf16 variance over thousands of features loses several bits.
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        return y.astype(self.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for NeoX rotary embeddings at integer `positions`.

    Args:
      positions: int [batch, seq] token positions (restart at 0 at every packed document).
      head_dim: rotary dimension (DBRX rotates the whole head).
      theta: RoPE base (DBRX-132B: 500000).
    Returns:
      (cos, sin), each float32 [batch, seq, head_dim].
    """
    if head_dim % 2:
        raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
    # inv_freq is a trace-time constant: compute it in float64 and round once, which is at least as
    # accurate as the reference's float32 pow.
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = jnp.asarray(inv_freq, dtype=jnp.float32)  # [head_dim/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, seq, head_dim]
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis (NeoX / transformers convention, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, seq, heads, head_dim] by cos/sin [batch, seq, head_dim]; math in float32."""
    cos = cos[:, :, None, :]  # [batch, seq, 1, head_dim]
    sin = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def make_attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal AND same-segment boolean mask.

    Args:
      segment_ids: int [batch, seq]; 1..n per packed document, 0 = padding.
    Returns:
      bool [batch, 1, seq, seq]; True where query t may attend key s.

    Padding (segment 0) is treated as one more segment: real tokens never see it, and a padding row still
    sees itself, so no softmax row is empty (no NaN) and nothing needs special-casing downstream.
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))  # [seq_q, seq_k]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, seq_q, seq_k]
    return (same & causal[None])[:, None, :, :]  # [batch, 1, seq_q, seq_k]


def _einsum_attention(q, k, v, mask, scale):
    """Reference attention, grouped without materialising repeated K/V heads."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    # Query head i uses kv head i // g (transformers' repeat_kv order): split heads as [kv, g].
    qg = q.reshape(b, t, kv, g, h)  # [batch, seq_q, kv_heads, group, head_dim]
    logits = jnp.einsum('btkgh,bskh->bkgts', qg, k,
                        preferred_element_type=jnp.float32)  # [batch, kv_heads, group, seq_q, seq_k]
    logits = logits * scale
    logits = jnp.where(mask[:, :, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [batch, kv_heads, group, seq_q, seq_k]
    out = jnp.einsum('bkgts,bskh->btkgh', probs, v)  # [batch, seq_q, kv_heads, group, head_dim]
    return out.reshape(b, t, n, h)  # [batch, seq_q, heads, head_dim]


def cudnn_attention_if_supported(q, k, v, *, scale: float, mask=None) -> jax.Array | None:
    """cuDNN's fused attention on GPU for bf16/fp16 when it accepts the shapes (checked at trace time, e.g.
    head_dim <= 128); None elsewhere, so the caller picks its fallback. The 'auto' choice of DBRX and the image
    models: jax.nn.dot_product_attention's own default (implementation=None) is XLA's attention on every backend."""
    if jax.default_backend() != 'gpu' or q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError):  # shapes/GPUs the kernel does not cover
        return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              impl: str = 'auto', causal: bool = False) -> jax.Array:
    """Masked (GQA/MQA) scaled dot-product attention.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (heads % kv_heads == 0).
      mask: bool broadcastable to [batch, heads, seq_q, seq_k] (see make_attention_mask).
      impl: 'auto' ('chunked' on CPU; on GPU 'cudnn' for bf16/fp16 when cuDNN accepts the shapes at trace
        time, else 'xla'; 'xla' on TPU), 'xla', 'cudnn' (flash attention on GPU; supports only some
        shapes/dtypes; the mask goes in as an additive bias), 'einsum' (plain einsums) or 'chunked' (query chunks
        with a recomputing backward: models/chunked_attention.py, about 2x faster than 'xla' forward + backward on
        XLA:CPU). jax.nn.dot_product_attention's own default (implementation=None) is XLA's attention on every
        backend, hence the explicit choice: on an H200 cuDNN took 270 ms off a 1.74 s DBRX training step
        (BUILD_NOTES.md, "GPU").
      causal: mask is causal (make_attention_mask's always is); 'chunked' then skips the keys past each group
        of query chunks (the other implementations apply the mask as it is).
    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    scale = 1.0 / float(np.sqrt(q.shape[-1]))
    if impl == 'einsum':
        return _einsum_attention(q, k, v, mask, scale)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}')
    if impl == 'auto':
        if jax.default_backend() == 'cpu':
            impl = 'chunked'
        else:
            out = cudnn_attention_if_supported(q, k, v, scale=scale, mask=mask)
            if out is not None:
                return out
            impl = 'xla'
    if impl == 'chunked':
        return chunked_attention.attention(q, k, v, mask, scale=scale, causal=causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     new_mask: jax.Array, cache_mask: jax.Array) -> jax.Array:
    """GQA attention of new tokens over a KV cache plus themselves, without concatenating the cache.

    The cache is read once and never copied: scores against the cached keys and against the new keys are
    computed separately, normalised by one joint softmax and the two value sums added. (Concatenating
    [cache; new] keys first would copy the whole layer cache every decode step.)

    Args:
      q: [batch, seq, heads, head_dim] new queries (RoPE applied).
      k, v: [batch, seq, kv_heads, head_dim] the new tokens' keys (RoPE applied) / values.
      cache_k, cache_v: [batch, cache_len, kv_heads, head_dim] the layer's cache before the new tokens.
      new_mask: bool [batch, 1, seq, seq]; True where new query t may attend new key s (causal).
      cache_mask: bool [batch, 1, seq, cache_len]; True where query t may attend cached slot s.
    Returns:
      [batch, seq, heads, head_dim] in q's dtype.

    Every query must see at least itself (new_mask diagonal True) so no softmax row is empty.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    scale = 1.0 / float(np.sqrt(h))
    qg = q.reshape(b, t, kv, g, h)  # [batch, seq, kv_heads, group, head_dim]; head i uses kv head i // g
    neg = jnp.finfo(jnp.float32).min
    s_cache = jnp.einsum('btkgh,bskh->bkgts', qg, cache_k.astype(q.dtype),
                         preferred_element_type=jnp.float32) * scale  # [batch, kv, group, seq, cache_len]
    s_new = jnp.einsum('btkgh,bskh->bkgts', qg, k,
                       preferred_element_type=jnp.float32) * scale  # [batch, kv, group, seq, seq]
    s_cache = jnp.where(cache_mask[:, :, None], s_cache, neg)
    s_new = jnp.where(new_mask[:, :, None], s_new, neg)
    m = jnp.maximum(jnp.max(s_cache, axis=-1, keepdims=True),
                    jnp.max(s_new, axis=-1, keepdims=True))  # [batch, kv, group, seq, 1]
    p_cache = jnp.exp(s_cache - m)  # [batch, kv, group, seq, cache_len]; masked entries underflow to 0
    p_new = jnp.exp(s_new - m)  # [batch, kv, group, seq, seq]
    denom = jnp.sum(p_cache, axis=-1, keepdims=True) + jnp.sum(p_new, axis=-1, keepdims=True)
    out = (jnp.einsum('bkgts,bskh->btkgh', (p_cache / denom).astype(v.dtype), cache_v.astype(v.dtype))
           + jnp.einsum('bkgts,bskh->btkgh', (p_new / denom).astype(v.dtype), v))  # [b, seq, kv, group, hd]
    return out.reshape(b, t, n, h)  # [batch, seq, heads, head_dim]


class Attention(nn.Module):
    """DBRX attention: fused Wqkv, optional clamp, RoPE, GQA, causal+segment mask, out_proj.

    Attributes:
      d_model, n_heads, kv_n_heads: model width and head counts (head_dim = d_model // n_heads).
      clip_qkv: clamp the fused qkv projection to [-clip_qkv, clip_qkv] when not None.
      impl: attention implementation (see `attention`).
      init_std: stddev of the normal kernel initialiser.
      quantize: 'none' or 'int8' (weight-only int8 Wqkv / out_proj; see models/quantize.py).
    """
    d_model: int
    n_heads: int
    kv_n_heads: int
    clip_qkv: float | None = None
    impl: str = 'auto'
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str = 'none'

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, cache_mask: jax.Array | None = None,
                 return_kv: bool = False):
        """x [batch, seq, d_model] -> [batch, seq, d_model].

        cos/sin come from rope_cos_sin, mask from make_attention_mask.

        Decoding (KV cache): with `kv_cache` = (cache_k, cache_v) [batch, cache_len, kv_heads, head_dim], the
        new tokens attend to the cached slots allowed by `cache_mask` [batch, 1, seq, cache_len] and to each
        other as `mask` allows (see cached_attention). With `return_kv` (implied by kv_cache) the result is
        (out, (k, v)) where k, v [batch, seq, kv_heads, head_dim] are the new tokens' keys (RoPE applied) and
        values: the caller writes them into its cache. Only kv heads are cached (GQA).
        """
        b, t, _ = x.shape
        hd = self.d_model // self.n_heads
        kv_dim = self.kv_n_heads * hd
        init = nn.initializers.normal(self.init_std)
        qkv = quantize_lib.dense(self.d_model + 2 * kv_dim, self.quantize, kernel_axes=('embed', 'qkv'),
                                 kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                                 dot_general=dense_dot_general,
                                 name='Wqkv')(x)  # [batch, seq, (heads + 2*kv_heads)*head_dim]
        if self.clip_qkv is not None:
            qkv = jnp.clip(qkv, -self.clip_qkv, self.clip_qkv)
        q = qkv[..., :self.d_model].reshape(b, t, self.n_heads, hd)  # [batch, seq, heads, head_dim]
        k = qkv[..., self.d_model:self.d_model + kv_dim].reshape(b, t, self.kv_n_heads, hd)  # [b, s, kv, hd]
        v = qkv[..., self.d_model + kv_dim:].reshape(b, t, self.kv_n_heads, hd)  # [batch, seq, kv_heads, hd]
        q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
        k = nn.with_logical_constraint(k, ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
        v = nn.with_logical_constraint(v, ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is None:
            o = attention(q, k, v, mask, impl=self.impl, causal=True)  # [batch, seq, heads, head_dim]
        else:
            o = cached_attention(q, k, v, kv_cache[0], kv_cache[1], mask, cache_mask)  # [b, seq, heads, hd]
        o = nn.with_logical_constraint(o, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
        o = o.reshape(b, t, self.d_model)  # [batch, seq, heads*head_dim]
        out = quantize_lib.dense(self.d_model, self.quantize, kernel_axes=('heads', 'embed'), kernel_init=init,
                                 dtype=self.dtype, param_dtype=self.param_dtype, dot_general=dense_dot_general,
                                 name='out_proj')(o)  # [batch, seq, d_model]
        if kv_cache is None and not return_kv:
            return out
        return out, (k, v)
