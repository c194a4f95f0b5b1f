"""Unmasked multi-head attention of the image models (UNet, VAE), with the implementation chosen per backend."""
from __future__ import annotations

import jax

from mosaicjax.models import chunked_attention
from mosaicjax.models import layers


def attention(q, k, v, scale: float, impl: str = 'auto') -> jax.Array:
    """Unmasked multi-head attention, q [batch, seq_q, heads, head_dim], k/v [batch, seq_k, heads, head_dim].

    impl 'auto': on GPU, cuDNN's fused (flash) kernel for bf16/fp16 when it accepts the shapes (checked at trace
    time; e.g. head_dim <= 128), else XLA's implementation; on CPU 'chunked' (models/chunked_attention.py:
    the UNet's 1024-token self-attention 5x faster than 'xla' there); on TPU 'xla', which its compiler fuses.
    jax.nn.dot_product_attention's own default is always XLA, hence the explicit choice here.
    """
    if impl == 'auto':
        out = layers.cudnn_attention_if_supported(q, k, v, scale=scale)
        if out is not None:
            return out
        impl = 'chunked' if jax.default_backend() == 'cpu' else 'xla'
    if impl == 'chunked':
        return chunked_attention.attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
