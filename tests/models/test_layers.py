"""LayerNorm, RoPE and masked GQA attention against small numpy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.models import layers


def _np_layernorm(x, scale, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale


def test_layernorm_matches_numpy_and_is_bias_free():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 5, 16)).astype(np.float32)
    ln = layers.LayerNorm(eps=1e-5)
    v = ln.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(v)) == {'params': {'scale': (16,)}}
    assert nn.get_partition_spec(v)['params']['scale'] == jax.sharding.PartitionSpec('norm')
    scale = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    y = ln.apply({'params': {'scale': scale}}, x)
    np.testing.assert_allclose(y, _np_layernorm(x, scale, 1e-5), rtol=1e-5, atol=1e-5)
    eps_big = layers.LayerNorm(eps=0.5).apply({'params': {'scale': scale}}, x)
    np.testing.assert_allclose(eps_big, _np_layernorm(x, scale, 0.5), rtol=1e-5, atol=1e-5)


def test_layernorm_bf16_computes_stats_in_float32():
    # A large common offset destroys bf16 statistics; float32 statistics of the bf16 input survive it.
    rng = np.random.default_rng(1)
    x = (100.0 + rng.normal(0, 1, (4, 256))).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = layers.LayerNorm(dtype=jnp.bfloat16).apply({'params': {'scale': np.ones(256, np.float32)}}, xb)
    assert y.dtype == jnp.bfloat16
    ref = _np_layernorm(np.asarray(xb, np.float32), 1.0, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)


def _np_rope(x, pos, theta):
    """Explicit NeoX rotation: pair (i, i + d/2) rotated by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for i in range(d // 2):
        ang = pos * theta ** (-2.0 * i / d)  # [b, t, 1]
        a, b = x[..., i], x[..., i + d // 2]
        c, s = np.cos(ang), np.sin(ang)
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


@pytest.mark.parametrize('theta', [10000.0, 500000.0, 123.0])
def test_rope_matches_explicit_rotation(theta):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 0, 1]], np.int32)
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), 8, theta)
    y = layers.apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(y, _np_rope(x, pos[..., None].astype(np.float64), theta), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        cq, sq = layers.rope_cos_sin(jnp.array([[pq]]), 16, 10000.0)
        ck, sk = layers.rope_cos_sin(jnp.array([[pk]]), 16, 10000.0)
        return float(jnp.sum(layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk)))

    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_attention_mask_is_causal_and_per_segment():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    m = np.asarray(layers.make_attention_mask(seg))[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only padding (never an empty softmax row)
    ], bool)
    np.testing.assert_array_equal(m, expected)


def _np_attention(q, k, v, mask):
    n, kv = q.shape[2], k.shape[2]
    k = np.repeat(k, n // kv, axis=2)  # transformers' repeat_kv: query head i uses kv head i // (n/kv)
    v = np.repeat(v, n // kv, axis=2)
    s = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum('bhts,bshd->bthd', p, v)


@pytest.mark.parametrize('impl', ['auto', 'einsum'])
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_attention_gqa_matches_numpy(impl, kv_heads):
    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
    mask = layers.make_attention_mask(seg)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl=impl)
    np.testing.assert_allclose(out, _np_attention(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-5)


def test_attention_module_params_and_clip():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 16)), jnp.float32)
    mod = layers.Attention(d_model=16, n_heads=4, kv_n_heads=2, clip_qkv=0.1, init_std=1.0)
    cos, sin = layers.rope_cos_sin(jnp.arange(4)[None], 4, 10000.0)
    mask = layers.make_attention_mask(jnp.ones((1, 4), jnp.int32))
    v = mod.init(jax.random.PRNGKey(0), x, cos, sin, mask)
    specs = nn.get_partition_spec(v)['params']
    assert specs['Wqkv']['kernel'] == jax.sharding.PartitionSpec('embed', 'qkv')
    assert specs['out_proj']['kernel'] == jax.sharding.PartitionSpec('heads', 'embed')
    assert nn.meta.unbox(v)['params']['Wqkv']['kernel'].shape == (16, 16 + 2 * 2 * 4)
    # With clip 0.1, v entries are in [-0.1, 0.1] so the attention output before out_proj is bounded too.
    _, inter = mod.apply(v, x, cos, sin, mask, capture_intermediates=True)
    out_in = inter['intermediates']['out_proj']['__call__'][0]
    assert float(jnp.max(jnp.abs(out_in))) > 0
    w_out = nn.meta.unbox(v)['params']['out_proj']['kernel']
    bound = 0.1 * np.abs(np.asarray(w_out)).sum(0).max()
    assert float(jnp.max(jnp.abs(out_in))) <= bound + 1e-6
