"""Next-token sampling: greedy, temperature, top-k, top-p, with per-row seeds. Pure JAX, used under jit.

Every sampling setting is a per-row array, not a static argument: one compiled program serves any mix of
greedy and sampled rows with different settings (the server batches unrelated requests together).

Randomness. Row b samples the token at absolute position p with the key fold_in(key(seed_b), p): it depends
only on the row's seed and the position, never on the batch it runs in or on its slot in that batch, so a
request gives the same text alone or batched, and a resumed / re-batched request continues identically.

Order of operations (as transformers and vLLM): logits / temperature, then top-k, then top-p over what top-k
kept (renormalised), then one draw by the Gumbel-max trick (argmax(logits + Gumbel noise) is an exact sample of
softmax(logits)). Temperature <= 0 means greedy (argmax of the raw logits). The reported logprob is that of the
raw model distribution, log_softmax(logits) before temperature and filtering (what lm-evaluation-harness and
OpenAI's `logprobs` mean), so it does not change with the sampling settings.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks (to -inf) the tokens outside each row's top-k, then outside the top-p nucleus of what is left.

    scaled f32 [batch, vocab] (already divided by temperature); top_k int32 [batch] (<= 0: off);
    top_p f32 [batch] (>= 1: off). At least one token (the best) always survives.
    One descending sort per row serves both filters.
    """
    v = scaled.shape[-1]
    srt = -jnp.sort(-scaled, axis=-1)  # [batch, vocab] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [batch]
    ranks = jnp.arange(v)[None, :]  # [1, vocab]
    kept_sorted = jnp.where(ranks < k[:, None], srt, _NEG_INF)  # [batch, vocab] top-k of the sorted logits
    probs = jax.nn.softmax(kept_sorted, axis=-1)  # renormalised over the top-k
    before = jnp.cumsum(probs, axis=-1) - probs  # [batch, vocab] probability mass strictly before each rank
    # Keep a rank while the mass before it is < top_p: the smallest prefix whose mass reaches top_p.
    n_keep = jnp.sum((before < top_p[:, None]) & (ranks < k[:, None]), axis=-1)  # [batch]
    n_keep = jnp.maximum(n_keep, 1)
    threshold = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)  # [batch, 1]
    return jnp.where(scaled >= threshold, scaled, _NEG_INF)


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-row PRNG keys: fold_in(key(seed_b), position_b). seeds uint32 [batch], positions int32 [batch]."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def sample(logits: jax.Array, seeds: jax.Array, positions: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: f32 [batch, vocab] next-token logits.
      seeds: uint32 [batch]; positions: int32 [batch] absolute position of the token being drawn.
      temperature: f32 [batch] (<= 0: greedy); top_k: int32 [batch] (<= 0: off); top_p: f32 [batch] (>= 1: off).
      vocab_limit: static; ids >= it are never drawn (an lm_head padded past the tokenizer's vocabulary).
    Returns:
      (tokens int32 [batch], logprobs f32 [batch]: raw model log-probability of each drawn token).
    """
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)  # [batch, vocab]
    if vocab_limit is not None and vocab_limit < v:
        logits = jnp.where(jnp.arange(v)[None, :] < vocab_limit, logits, _NEG_INF)
    greedy = temperature <= 0.0  # [batch]
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch]

    def draw(_):
        scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]  # [batch, vocab]
        needs_filter = ((top_k > 0) & (top_k < v)) | (top_p < 1.0)  # [batch]
        # The sort is the costly part at a 100k vocabulary: skip it when no row filters.
        scaled = jax.lax.cond(jnp.any(needs_filter & ~greedy),
                              lambda x: _filter_top_k_top_p(x, top_k, top_p), lambda x: x, scaled)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32))(
            row_keys(seeds, positions))  # [batch, vocab]
        sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)  # [batch]
        return jnp.where(greedy, greedy_tok, sampled)

    # All-greedy batches (benchmarks, evals) skip the noise and the filters entirely.
    tokens = jax.lax.cond(jnp.all(greedy), lambda _: greedy_tok, draw, None)
    logprobs = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]  # [batch]
    return tokens, logprobs


def top_logprobs(logits: jax.Array, k: int, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of the raw model distribution (OpenAI's top_logprobs).

    logits f32 [batch, vocab] -> (ids int32 [batch, k], log_softmax values f32 [batch, k]), best first; ids >=
    vocab_limit (lm_head padding) are never listed.
    """
    logprobs_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, vocab]
    v = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < v:
        logprobs_all = jnp.where(jnp.arange(v)[None, :] < vocab_limit, logprobs_all, _NEG_INF)
    values, ids = jax.lax.top_k(logprobs_all, k)  # [batch, k]
    return ids.astype(jnp.int32), values
