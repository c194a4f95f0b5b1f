"""Attention over query chunks with a hand-written backward: the CPU attention of DBRX, the UNet and the VAE.

jax.nn.dot_product_attention's XLA path materialises the [batch, heads, seq_q, seq_k] scores whole, several
times (scaled, masked, exponentiated, divided) and autodiff saves them for the backward pass. On XLA:CPU that
streams hundreds of MB through memory per layer. Here each chunk of queries computes its scores, softmax and
output while the tile is still in cache (the softmax is normalised after the PV product: [chunk, head_dim]
divides instead of [chunk, seq_k]); only the output and the log-sum-exp per query are saved, and the backward
recomputes each chunk's probabilities (flash attention's recipe, in XLA ops):

    dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K * scale,  dK = dS^T Q * scale,  dV = P^T dO

Measured on 2 CPU cores (BUILD_NOTES.md has the figures and commands): the UNet's 1024-token self-attention
forward ~8x faster than XLA's; DBRX's (8, 256, 8 heads, 2 kv heads) forward + backward about 4x.
GPUs keep cuDNN's fused kernel and TPUs XLA's attention (callers choose; see layers.attention, image_attention).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bytes of float32 scores one chunk may hold ([batch, heads, chunk, seq_k]): small enough that the chunk's
# scores, probabilities and their gradients stay in a server CPU's L2/L3. Measured on 2 Zen 4 cores: the UNet's
# 1024-token self-attention (2 x 8 heads) 14.5 / 11.4 / 11.0 ms at 2 / 4 / 8 MiB, DBRX's (8 x 256, 8 heads)
# forward + backward 27 / 26 / 40 ms.
TILE_BYTES = 4 << 20
MIN_CHUNK = 16
# Most query groups attention(causal=True) splits the queries into (each a separately compiled chunk loop).
CAUSAL_GROUPS = 8
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


def _logits(q, k, mask, scale):
    """q [b, kv, g, c, h], k [b, kv, s, h], mask bool [b, c, s] or None -> f32 [b, kv, g, c, s]."""
    # Scaling q ([c, h] per head) rather than the scores ([c, s]): the elementwise passes over the score tile,
    # not the matmuls, are what this attention's time goes to on CPU.
    q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum('bkgch,bksh->bkgcs', q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, _NEG)
    return logits


# Inside the loops every operand is in the layout its matmul reads ([b, kv, g, c, h] queries, [b, kv, s, h] keys
# and values): attention() transposes once outside, where per-chunk einsums over the [b, seq, heads, h] layout
# made XLA:CPU copy K and V into that layout again on every chunk (a fifth of the UNet's time).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _forward(q, k, v, mask, scale)[0]


def _forward(q, k, v, mask, scale):
    """q [chunks, b, kv, g, c, h], k/v [b, kv, s, h], mask [chunks, b, c, s] or None -> o like q."""
    def one(args):
        qc, mc = args
        logits = _logits(qc, k, mc, scale)  # [b, kv, g, c, s]
        m = jnp.max(logits, axis=-1, keepdims=True)  # [b, kv, g, c, 1]
        p = jnp.exp(logits - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)  # [b, kv, g, c, 1]
        o = jnp.einsum('bkgcs,bksh->bkgch', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        lse = (m + jnp.log(denom))[..., 0]  # [b, kv, g, c]
        return (o / denom).astype(q.dtype), lse

    o, lse = jax.lax.map(one, (q, mask))  # [chunks, b, kv, g, c, h], [chunks, b, kv, g, c]
    return o, (q, k, v, mask, o, lse)


def _backward(scale, res, do):
    q, k, v, mask, o, lse = res
    f32 = jnp.float32

    def one(carry, args):
        dk, dv = carry
        qc, doc, oc, lsec, mc = args  # [b, kv, g, c, h] x 3, [b, kv, g, c], [b, c, s] or None
        p = jnp.exp(_logits(qc, k, mc, scale) - lsec[..., None])  # [b, kv, g, c, s]
        dp = jnp.einsum('bkgch,bksh->bkgcs', doc, v, preferred_element_type=f32)
        rowsum = jnp.sum(doc.astype(f32) * oc.astype(f32), axis=-1, keepdims=True)  # [b, kv, g, c, 1]
        ds = p * (dp - rowsum)  # d(logits)
        # logits = (q * scale) k^T: the scale goes on the small [c, h] / [s, h] results, not on ds.
        dq = jnp.einsum('bkgcs,bksh->bkgch', ds.astype(k.dtype), k, preferred_element_type=f32) * scale
        dk = dk + jnp.einsum('bkgcs,bkgch->bksh', ds.astype(q.dtype), qc, preferred_element_type=f32) * scale
        dv = dv + jnp.einsum('bkgcs,bkgch->bksh', p.astype(do.dtype), doc, preferred_element_type=f32)
        return (dk, dv), dq.astype(q.dtype)

    init = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dk, dv), dq = jax.lax.scan(one, init, (q, do, o, lse, mask))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_forward, _backward)


def causal_groups(num_chunks: int) -> int:
    """Query groups for causal skipping: the largest divisor of num_chunks up to CAUSAL_GROUPS that leaves every
    group at least two chunks.

    Measured on 2 CPU cores, forward + backward, 8 heads / 2 kv heads, head_dim 32: (8, 256) in 4 chunks of 64
    15.9 ms unsplit, 11.1 ms in 2 groups, 18.4 ms in 4 (one-chunk groups are slower than no split); (2, 1024) in
    16 chunks 47.8 / 36.4 / 31.6 / 30.6 ms in 1 / 2 / 4 / 8 groups.
    """
    return max(d for d in range(1, max(1, min(num_chunks // 2, CAUSAL_GROUPS)) + 1) if num_chunks % d == 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              scale: float | None = None, chunk: int | None = None, causal: bool = False) -> jax.Array:
    """Softmax(q k^T * scale [masked]) v, GQA/MQA aware.

    Args:
      q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_k, kv_heads, head_dim] (heads % kv_heads == 0).
      mask: None or bool broadcastable to [batch, 1, seq_q, seq_k] (True: may attend); every query row needs at
        least one True (layers.make_attention_mask guarantees it).
      scale: logit scale (default head_dim ** -0.5).
      chunk: queries per chunk (default chunk_size()); must divide seq_q.
      causal: the caller's promise that query i never attends to a key after position i (mask included), with
        queries and keys at the same positions (seq_q == seq_k). The queries are then split into
        causal_groups() groups and group j reads only the keys up to its last query: the score tiles shrink to
        (G + 1) / 2G of the full square (62.5% at 4 groups), the mask still applies inside them.
    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = float(h ** -0.5 if scale is None else scale)
    chunk = chunk or chunk_size(b, n, t, s)
    if t % chunk:
        raise ValueError(f'chunk={chunk} does not divide seq_q={t}')
    kv = k.shape[2]
    g, nc = n // kv, t // chunk
    # query head i uses kv head i // g (transformers' order): [b, t, n, h] -> [chunks, b, kv, g, c, h]
    if causal:
        if s != t:
            raise ValueError(f'causal=True needs seq_q == seq_k, got {t} and {s}')
        if mask is None:  # plain causal attention: the promise made explicit
            mask = jnp.tril(jnp.ones((t, s), bool))  # [t, s]
    qc = q.reshape(b, nc, chunk, kv, g, h).transpose(1, 0, 3, 4, 2, 5)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, 1, t, s))[:, 0].reshape(b, nc, chunk, s).transpose(1, 0, 2, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, h]
    if not causal:
        o = _attention(qc, kt, vt, mask, scale)
    else:
        per = nc // causal_groups(nc)  # chunks per group
        # One custom-VJP call per group (a static loop of copies of the chunk loop); autodiff sums the groups'
        # key/value gradients, each zero past its group's keys.
        outs = []
        for start in range(0, nc, per):
            end = (start + per) * chunk  # keys up to the group's last query
            outs.append(_attention(qc[start:start + per], kt[:, :, :end], vt[:, :, :end],
                                   mask[start:start + per, ..., :end], scale))
        o = jnp.concatenate(outs, axis=0)  # [chunks, b, kv, g, c, h]
    return o.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n, h)
