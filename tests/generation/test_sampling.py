"""Token sampling: distributions, top-k / top-p sets, greedy, vocab limit, raw logprobs, per-row keys."""
import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.generation import sampling

N = 4000  # draws: one row per position, same seed
LOGITS = np.log(np.array([0.4, 0.3, 0.2, 0.08, 0.02], np.float32))


def _draw(temperature=1.0, top_k=0, top_p=1.0, vocab_limit=None, logits=LOGITS, seed=0):
    fn = jax.jit(sampling.sample, static_argnames='vocab_limit')
    tok, lp = fn(jnp.broadcast_to(jnp.asarray(logits), (N, len(logits))), jnp.full((N,), seed, jnp.uint32),
                 jnp.arange(N, dtype=jnp.int32), jnp.full((N,), temperature, jnp.float32),
                 jnp.full((N,), top_k, jnp.int32), jnp.full((N,), top_p, jnp.float32), vocab_limit=vocab_limit)
    return np.asarray(tok), np.asarray(lp)


def _freq(tok):
    return np.bincount(tok, minlength=len(LOGITS)) / len(tok)


def test_temperature_one_samples_the_softmax_and_logprobs_are_raw():
    tok, lp = _draw()
    np.testing.assert_allclose(_freq(tok), np.exp(LOGITS), atol=0.025)  # ~3 sigma at N=4000
    np.testing.assert_allclose(lp, jax.nn.log_softmax(LOGITS)[tok], rtol=1e-6)
    tok_t, lp_t = _draw(temperature=0.5)
    p = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()
    np.testing.assert_allclose(_freq(tok_t), p, atol=0.025)
    np.testing.assert_allclose(lp_t, jax.nn.log_softmax(LOGITS)[tok_t], rtol=1e-6)  # not the tempered one


def test_top_k_and_top_p_sets():
    assert set(_draw(top_k=2)[0]) == {0, 1}
    np.testing.assert_allclose(_freq(_draw(top_k=2)[0])[:2], [4 / 7, 3 / 7], atol=0.03)  # renormalised
    # Nucleus 0.65: 0.4 alone is short of it, 0.4 + 0.3 reaches it.
    assert set(_draw(top_p=0.65)[0]) == {0, 1}
    assert set(_draw(top_p=0.75)[0]) == {0, 1, 2}
    # top-k first, then top-p over what is left (renormalised): over {0.4, 0.3, 0.2}/0.9, 0.5 needs 2 tokens.
    assert set(_draw(top_k=3, top_p=0.5)[0]) == {0, 1}
    assert set(_draw(top_p=1e-6)[0]) == {0} and set(_draw(top_k=1)[0]) == {0}


def test_greedy_vocab_limit_and_row_keys():
    assert set(_draw(temperature=0.0)[0]) == {0}
    flipped = LOGITS[::-1].copy()  # the best token is id 4
    assert set(_draw(temperature=0.0, logits=flipped, vocab_limit=4)[0]) == {3}  # best id below the limit
    assert 4 not in set(_draw(logits=flipped, vocab_limit=4)[0])
    # A row's key depends only on (seed, position).
    a = sampling.row_keys(jnp.array([7, 7, 8], jnp.uint32), jnp.array([3, 4, 3]))
    b = sampling.row_keys(jnp.array([8, 7], jnp.uint32), jnp.array([3, 3]))
    data = jax.random.key_data
    np.testing.assert_array_equal(data(a[0]), data(b[1]))
    np.testing.assert_array_equal(data(a[2]), data(b[0]))
    assert not np.array_equal(data(a[0]), data(a[1]))
