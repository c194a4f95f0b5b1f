"""Attention over query chunks with a hand-written backward: the CPU attention of DBRX, the UNet and the VAE.

jax.nn.dot_product_attention's XLA path materialises the [batch, heads, seq_q, seq_k] scores whole, several
times (scaled, masked, exponentiated, divided) and autodiff saves them for the backward pass. On XLA:CPU that
streams hundreds of MB through memory per layer. Here each chunk of queries computes its scores, softmax and
output while the tile is still in cache (the softmax is normalised after the PV product: [chunk, head_dim]
divides instead of [chunk, seq_k]); only the output and the log-sum-exp per query are saved, and the backward
recomputes each chunk's probabilities (flash attention's recipe, in XLA ops):

    dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K * scale,  dK = dS^T Q * scale,  dV = P^T dO

Measured on 2 CPU cores (BUILD_NOTES.md has the figures and commands): the UNet's 1024-token self-attention
forward 5x faster than XLA's; DBRX's (8, 256, 8 heads, 2 kv heads) forward + backward about 2x.
GPUs keep cuDNN's fused kernel and TPUs XLA's attention (callers choose; see layers.attention, image_attention).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bytes of float32 scores one chunk may hold ([batch, heads, chunk, seq_k]): small enough that the chunk's
# scores, probabilities and their gradients stay in a server CPU's L2/L3 (2 and 4 MiB measured about equal).
TILE_BYTES = 2 << 20
MIN_CHUNK = 16
_NEG = -1e30  # masked logits: exp underflows to exactly 0 and no inf - inf can appear


def chunk_size(batch: int, heads: int, seq_q: int, seq_k: int) -> int:
    """Largest power-of-two divisor of seq_q whose score tile fits TILE_BYTES (seq_q itself when all of it fits).

    A seq_q with no power-of-two divisor >= MIN_CHUNK gets seq_q (one chunk) rather than tiny chunks.
    """
    if batch * heads * seq_q * seq_k * 4 <= TILE_BYTES:
        return seq_q
    chunk = seq_q & -seq_q  # largest power of two dividing seq_q
    while chunk > MIN_CHUNK and batch * heads * chunk * seq_k * 4 > TILE_BYTES:
        chunk //= 2
    return chunk if chunk >= MIN_CHUNK else seq_q


def _chunks(a, chunk):
    """[batch, seq, ...] -> [seq / chunk, batch, chunk, ...]"""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a):
    """[chunks, batch, chunk, ...] -> [batch, chunks * chunk, ...]"""
    return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], a.shape[0] * a.shape[2], *a.shape[3:])


def _logits(qg, k, mask, scale):
    """qg [b, c, kv, g, h], k [b, s, kv, h], mask bool [b, c, s] or None -> f32 [b, kv, g, c, s]."""
    # Scaling q ([c, h] per head) rather than the scores ([c, s]): the elementwise passes over the score tile,
    # not the matmuls, are what this attention's time goes to on CPU.
    qg = qg * jnp.asarray(scale, qg.dtype)
    logits = jnp.einsum('btkgh,bskh->bkgts', qg, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, _NEG)
    return logits


def _grouped(a, kv):
    """[b, c, heads, h] -> [b, c, kv, heads / kv, h]: query head i uses kv head i // group (transformers' order)."""
    b, c, n, h = a.shape
    return a.reshape(b, c, kv, n // kv, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, chunk):
    return _forward(q, k, v, mask, scale, chunk)[0]


def _forward(q, k, v, mask, scale, chunk):
    b, t, n, h = q.shape
    kv = k.shape[2]

    def one(args):
        qc, mc = args  # [b, c, n, h], bool [b, c, s] or None
        logits = _logits(_grouped(qc, kv), k, mc, scale)  # [b, kv, g, c, s]
        m = jnp.max(logits, axis=-1, keepdims=True)  # [b, kv, g, c, 1]
        p = jnp.exp(logits - m)  # [b, kv, g, c, s]
        denom = jnp.sum(p, axis=-1, keepdims=True)  # [b, kv, g, c, 1]
        o = jnp.einsum('bkgts,bskh->btkgh', p.astype(v.dtype), v,
                       preferred_element_type=jnp.float32)  # [b, c, kv, g, h]
        o = o / jnp.transpose(denom, (0, 3, 1, 2, 4))  # [b, c, kv, g, h]
        lse = (m + jnp.log(denom))[..., 0]  # [b, kv, g, c]
        return o.reshape(qc.shape).astype(q.dtype), lse

    masks = None if mask is None else _chunks(mask, chunk)
    o, lse = jax.lax.map(one, (_chunks(q, chunk), masks))  # [chunks, b, c, n, h], [chunks, b, kv, g, c]
    o = _unchunk(o)
    return o, (q, k, v, mask, o, lse)


def _backward(scale, chunk, res, do):
    q, k, v, mask, o, lse = res
    kv = k.shape[2]
    f32 = jnp.float32

    def one(carry, args):
        dk, dv = carry
        qc, doc, oc, lsec, mc = args
        qg, dog = _grouped(qc, kv), _grouped(doc, kv)  # [b, c, kv, g, h]
        p = jnp.exp(_logits(qg, k, mc, scale) - lsec[..., None])  # [b, kv, g, c, s]
        dp = jnp.einsum('btkgh,bskh->bkgts', dog, v, preferred_element_type=f32)  # [b, kv, g, c, s]
        rowsum = jnp.sum(dog.astype(f32) * _grouped(oc, kv).astype(f32), axis=-1)  # [b, c, kv, g]
        ds = p * (dp - jnp.transpose(rowsum, (0, 2, 3, 1))[..., None])  # [b, kv, g, c, s]; d(logits)
        # logits = (q * scale) k^T: the scale goes on the small [c, h] / [s, h] results, not on ds.
        dq = jnp.einsum('bkgts,bskh->btkgh', ds.astype(k.dtype), k,
                        preferred_element_type=f32) * scale  # [b, c, kv, g, h]
        dk = dk + jnp.einsum('bkgts,btkgh->bskh', ds.astype(q.dtype), qg,
                             preferred_element_type=f32) * scale  # [b, s, kv, h]
        dv = dv + jnp.einsum('bkgts,btkgh->bskh', p.astype(do.dtype), dog, preferred_element_type=f32)  # [b, s, kv, h]
        return (dk, dv), dq.reshape(qc.shape).astype(q.dtype)

    masks = None if mask is None else _chunks(mask, chunk)
    init = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dk, dv), dq = jax.lax.scan(one, init, (_chunks(q, chunk), _chunks(do, chunk), _chunks(o, chunk), lse, masks))
    return _unchunk(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_forward, _backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              scale: float | None = None, chunk: int | None = None) -> jax.Array:
    """Softmax(q k^T * scale [masked]) v, GQA/MQA aware.

    Args:
      q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_k, kv_heads, head_dim] (heads % kv_heads == 0).
      mask: None or bool broadcastable to [batch, 1, seq_q, seq_k] (True: may attend); every query row needs at
        least one True (layers.make_attention_mask guarantees it).
      scale: logit scale (default head_dim ** -0.5).
      chunk: queries per chunk (default chunk_size()); must divide seq_q.
    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = float(h ** -0.5 if scale is None else scale)
    chunk = chunk or chunk_size(b, n, t, s)
    if t % chunk:
        raise ValueError(f'chunk={chunk} does not divide seq_q={t}')
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, 1, t, s))[:, 0]  # [batch, seq_q, seq_k]
    return _attention(q, k, v, mask, scale, chunk)
