"""Chunked attention (models/chunked_attention.py): values against a float64 reference, gradients against XLA's
attention, masks and GQA included; the per-backend choice of the image models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.models import chunked_attention, image_attention, layers


def _reference(q, k, v, scale, mask=None):
    """float64 numpy attention; q [b, t, n, h], k/v [b, s, kv, h], mask bool [b, 1, t, s]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head i uses kv head i // g
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale  # [b, n, t, s]
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _qkv(b, t, s, n, kv, h, seed=0):
    r = np.random.RandomState(seed)
    q = r.randn(b, t, n, h).astype(np.float32) * 2.0
    k, v = (r.randn(b, s, kv, h).astype(np.float32) * 2.0 for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _mask(b, t):
    seg = np.zeros((b, t), np.int32)
    seg[:, : t // 3], seg[:, t // 3:] = 1, 2  # two packed documents
    seg[-1, -5:] = 0  # padding
    return layers.make_attention_mask(jnp.asarray(seg))  # [b, 1, t, t]


@pytest.mark.parametrize("t,s,n,kv,chunk,masked", [(256, 256, 3, 3, 32, False), (256, 77, 4, 4, 64, False),
                                                   (192, 192, 4, 2, 16, True), (64, 64, 4, 1, None, True)])
def test_values_match_float64(t, s, n, kv, chunk, masked):
    q, k, v = _qkv(2, t, s, n, kv, 8)
    mask = _mask(2, t) if masked else None
    got = jax.jit(lambda q, k, v: chunked_attention.attention(q, k, v, mask, scale=0.3, chunk=chunk))(q, k, v)
    # float32 rounding only: XLA's own attention is ~6e-6 off this reference on such inputs (|out| up to ~7).
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, 0.3, mask), rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("masked,kv", [(False, 2), (True, 2), (True, 1)])
def test_gradients_match_xla(masked, kv):
    q, k, v = _qkv(2, 128, 128, 4, kv, 16, seed=1)
    mask = _mask(2, 128) if masked else None
    w = jnp.asarray(np.random.RandomState(2).randn(2, 128, 4, 16).astype(np.float32))

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    got = grads(lambda q, k, v: chunked_attention.attention(q, k, v, mask, scale=0.25, chunk=32))
    ref = grads(lambda q, k, v: layers.attention(q * 0.25 * 4.0, k, v, mask if mask is not None
                                                 else jnp.ones((1, 1, 128, 128), bool), impl='einsum'))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=2e-5)


def test_chunk_size_rule():
    tile = chunked_attention.TILE_BYTES
    assert chunked_attention.chunk_size(1, 1, 64, 64) == 64  # small: one chunk
    c = chunked_attention.chunk_size(1, 4, 4096, 4096)
    assert c & (c - 1) == 0 and 4096 % c == 0 and 4 * c * 4096 * 4 <= tile < 4 * 2 * c * 4096 * 4
    assert chunked_attention.chunk_size(8, 16, 4096, 4096) == chunked_attention.MIN_CHUNK  # floor
    assert chunked_attention.chunk_size(8, 8, 4099, 4099) == 4099  # no power-of-two divisor: one chunk
    with pytest.raises(ValueError, match="does not divide"):
        chunked_attention.attention(*_qkv(1, 48, 48, 1, 1, 4), chunk=32)


def test_image_attention_auto_is_chunked_on_cpu():
    q, k, v = _qkv(1, 512, 512, 8, 8, 8, seed=3)  # 8 MiB of scores: several chunks
    auto = jax.jit(lambda q, k, v: image_attention.attention(q, k, v, 8 ** -0.5))
    assert "while" in auto.lower(q, k, v).as_text()  # lax.map over the chunks
    np.testing.assert_allclose(np.asarray(auto(q, k, v)), _reference(q, k, v, 8 ** -0.5), rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("t,chunk,kv", [(256, 32, 2), (192, 16, 1), (128, 64, 4)])
def test_causal_key_skipping_equals_full_attention(t, chunk, kv):
    """causal=True reads only the keys up to each query group's end; values and gradients stay those of the
    masked full attention (packed segments and padding included)."""
    q, k, v = _qkv(2, t, t, 4, kv, 8, seed=4)
    mask = _mask(2, t)
    w = jnp.asarray(np.random.RandomState(5).randn(2, t, 4, 8).astype(np.float32))
    groups = chunked_attention.causal_groups(t // chunk)
    assert groups == {256: 4, 192: 6, 128: 1}[t]  # 8, 12 and 2 chunks

    def run(causal):
        fn = lambda q, k, v: chunked_attention.attention(q, k, v, mask, scale=0.3, chunk=chunk, causal=causal)
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
        return out, grads
    (out, grads), (ref_out, ref_grads) = run(True), run(False)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, 0.3, mask), rtol=1e-5, atol=5e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=5e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="seq_q == seq_k"):
        chunked_attention.attention(q, k[:, :64], v[:, :64], causal=True)


def test_causal_without_mask_is_causal_attention():
    q, k, v = _qkv(2, 256, 256, 4, 2, 8, seed=6)
    got = jax.jit(lambda q, k, v: chunked_attention.attention(q, k, v, scale=0.3, chunk=32, causal=True))(q, k, v)
    causal = np.tril(np.ones((256, 256), bool))[None, None]
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, 0.3, causal), rtol=1e-5, atol=5e-6)


def test_causal_groups_rule():
    assert [chunked_attention.causal_groups(n) for n in (1, 2, 4, 6, 8, 16, 64)] == [1, 1, 2, 3, 4, 8, 8]
