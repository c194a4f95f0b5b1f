"""KV-cache layout and the shape buckets generation compiles for.

Layout: {'k': [n_layers, batch, cache_len, kv_heads, head_dim], 'v': same}, in the model's compute dtype.
Only the kv heads are cached (GQA: DBRX-132B caches 8 of its 48 heads, 6x less memory than repeating them).
Slot s of row b holds the token at position s of that row: prompts are RIGHT-padded, every row starts at slot
0 and row b's next token goes to slot length_b (a per-row write index). Padding slots past a row's length hold
garbage that no query ever sees: a query at slot q attends only to slots < q (all real) and itself.
Why right padding: a token's slot equals its RoPE position, rows need no offsets, and a row can be refilled
independently of the others (what continuous batching in the server needs).

Buckets. Every jitted program has a static shape; generation pads the batch to a batch bucket (powers of two up
to max_batch) and prompts / cache lengths to length buckets (powers of two from min_length, capped by
max_seq_len, plus max_seq_len itself), so the set of compiled programs is fixed and small and a request never
compiles anything a previous request of the same buckets compiled.
"""
from __future__ import annotations

import jax.numpy as jnp

from mosaicjax.models import dbrx


def cache_shape(cfg: dbrx.DbrxConfig, batch: int, cache_len: int) -> tuple[int, ...]:
    """[n_layers, batch, cache_len, kv_heads, head_dim]."""
    return (cfg.n_layers, batch, cache_len, cfg.kv_n_heads, cfg.head_dim)


def init_cache(cfg: dbrx.DbrxConfig, batch: int, cache_len: int, dtype=None) -> dict:
    """An empty (zero) cache {'k', 'v'}; dtype defaults to the model's compute dtype."""
    shape = cache_shape(cfg, batch, cache_len)
    dtype = cfg.compute_dtype if dtype is None else dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def cache_bytes(cfg: dbrx.DbrxConfig, batch: int, cache_len: int, dtype=None) -> int:
    """Memory of one cache (k and v), for sizing batches: 2 * L * B * S * KV * hd * itemsize."""
    dtype = jnp.dtype(cfg.compute_dtype if dtype is None else dtype)
    n = 1
    for d in cache_shape(cfg, batch, cache_len):
        n *= d
    return 2 * n * dtype.itemsize


def length_buckets(max_seq_len: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from min_length below max_seq_len, then max_seq_len: the only lengths compiled."""
    out, n = [], max(1, min_length)
    while n < max_seq_len:
        out.append(n)
        n *= 2
    out.append(max_seq_len)
    return tuple(out)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, then max_batch."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    out.append(max_batch)
    return tuple(out)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n; ValueError past the largest."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f'{n} exceeds the largest bucket {buckets[-1]}')
