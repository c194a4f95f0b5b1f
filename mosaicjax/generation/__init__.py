"""KV-cache text generation for DBRX: prefill + decode under jax.jit over fixed shape buckets.

Generator (generator.py) runs batches; SamplingParams / Completion describe a request and its result;
sampling.py draws tokens (greedy, temperature, top-k, top-p, per-row seeds); kv_cache.py holds the cache
layout [layers, batch, max_len, kv_heads, head_dim] and the bucket tables.
"""
from mosaicjax.generation.generator import Completion, Generator, SamplingParams

__all__ = ["Completion", "Generator", "SamplingParams"]
