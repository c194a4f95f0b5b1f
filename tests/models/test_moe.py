"""Router, dispatch strategies (outputs and gradients against the 'loop' reference), capacity drops, aux losses."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.models import moe

D, F = 8, 12


def _weights(e, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(0, 0.4, (e, F, D)), jnp.float32) for _ in range(3))  # w1, v1, w2


def _routing(n, e, k, seed=0, skew=0.0):
    """Random top-k routing; skew > 0 piles tokens onto expert 0 (and leaves some experts empty)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, e))
    logits[:, 0] += skew
    logits[:, -1] -= skew  # never chosen when skewed: an empty group
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
    top_w, top_idx = jax.lax.top_k(probs, k)
    return top_w / top_w.sum(-1, keepdims=True), top_idx.astype(jnp.int32)


def _np_moe(x, w1, v1, w2, top_w, top_idx):
    x, w1, v1, w2 = (np.asarray(a, np.float64) for a in (x, w1, v1, w2))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_idx.shape[1]):
            e = int(top_idx[n, j])
            g = x[n] @ w1[e].T
            h = g / (1 + np.exp(-g)) * (x[n] @ v1[e].T)
            out[n] += float(top_w[n, j]) * (h @ w2[e])
    return out


DROPLESS = {
    'sorted': moe.dispatch_sorted,
    'sorted_bs3': functools.partial(moe.dispatch_sorted, block_size=3),  # odd size, many blocks
    # The accelerator's weight selection (a one-hot matmul, not a gather), forced on here.
    'sorted_onehot': functools.partial(moe.dispatch_sorted, one_hot=True),
    'sorted_onehot_bs3': functools.partial(moe.dispatch_sorted, block_size=3, one_hot=True),
    'blocked': moe.dispatch_blocked,
    'blocked_bs3': functools.partial(moe.dispatch_blocked, block_size=3),
    'ragged': moe.dispatch_ragged,
    # Enough capacity for every assignment: must then equal the dropless result exactly.
    'capacity_nodrop': functools.partial(moe.dispatch_capacity, capacity_factor=100.0),
}


def test_loop_reference_matches_numpy():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, D)), jnp.float32)
    w1, v1, w2 = _weights(4)
    top_w, top_idx = _routing(10, 4, 2)
    y, dropped = moe.dispatch_loop(x, w1, v1, w2, top_w, top_idx)
    np.testing.assert_allclose(y, _np_moe(x, w1, v1, w2, top_w, top_idx), rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0.0


def _loss(dispatch, top_idx, x, w1, v1, w2, top_w):
    y, _ = dispatch(x, w1, v1, w2, top_w, top_idx)
    # A fixed random projection so every output element carries a distinct gradient.
    proj = jnp.asarray(np.random.default_rng(99).normal(size=y.shape), jnp.float32)
    return jnp.sum(y * proj), y


_grad = jax.jit(jax.value_and_grad(_loss, argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=0)


@functools.lru_cache(maxsize=None)
def _case(n, e, k, skew):
    x = jnp.asarray(np.random.default_rng(n).normal(size=(n, D)), jnp.float32)
    ws = _weights(e, seed=e)
    top_w, top_idx = _routing(n, e, k, seed=n + k, skew=skew)
    (_, y_ref), g_ref = _grad(moe.dispatch_loop, top_idx, x, *ws, top_w)
    return (x, ws, top_w, top_idx), y_ref, g_ref


@pytest.mark.parametrize('name', sorted(DROPLESS))
@pytest.mark.parametrize('n,e,k,skew', [(24, 4, 1, 0.0), (24, 4, 2, 0.0), (19, 6, 3, 0.0), (32, 4, 2, 6.0)])
def test_dropless_dispatch_equals_loop_outputs_and_grads(name, n, e, k, skew):
    (x, ws, top_w, top_idx), y_ref, g_ref = _case(n, e, k, skew)
    (_, y_got), g_got = _grad(DROPLESS[name], top_idx, x, *ws, top_w)
    np.testing.assert_allclose(y_got, y_ref, rtol=1e-5, atol=1e-5)
    for gr, gg, what in zip(g_ref, g_got, ('x', 'w1', 'v1', 'w2', 'top_w')):
        np.testing.assert_allclose(gg, gr, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_block_weights_one_hot_equals_gather_exactly(dtype):
    w = jnp.asarray(np.random.default_rng(3).normal(size=(5, 7, 3)), dtype)
    block_e = jnp.asarray([0, 0, 2, 3, 3, 3, 4, 4], jnp.int32)
    gathered = moe.block_weights(w, block_e, one_hot=False)
    selected = moe.block_weights(w, block_e, one_hot=True)
    assert selected.dtype == dtype and selected.shape == (8, 7, 3)
    np.testing.assert_array_equal(np.asarray(selected, np.float32), np.asarray(gathered, np.float32))
    # Gradients: the scatter-add's per-expert sums, here through the one-hot matmul.
    g = jnp.asarray(np.random.default_rng(4).normal(size=(8, 7, 3)), jnp.float32)
    grads = [jax.grad(lambda w_: jnp.sum(moe.block_weights(w_, block_e, one_hot=o).astype(jnp.float32) * g))(
        w.astype(jnp.float32)) for o in (False, True)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def _np_capacity_keep(top_idx, valid, e, cap):
    """Which assignments survive: slot-major priority (first choices first), padding last."""
    n, k = top_idx.shape
    keep = np.zeros((n, k), bool)
    used = np.zeros(e, int)
    for pad_pass in (False, True):
        for j in range(k):
            for t in range(n):
                if bool(valid[t]) == pad_pass:
                    continue
                ex = int(top_idx[t, j])
                if used[ex] < cap:
                    keep[t, j] = True
                    used[ex] += 1
    return keep


@pytest.mark.parametrize('cf', [0.5, 1.0])
def test_capacity_drops_overflow_and_reports_rate(cf):
    n, e, k = 24, 4, 2
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, D)), jnp.float32)
    ws = _weights(e)
    top_w, top_idx = _routing(n, e, k, seed=3, skew=2.0)
    valid = np.ones(n, bool)
    valid[-3:] = False  # padding tokens: lowest priority, not counted in the rate
    cap = moe.expert_capacity(n, k, e, cf)
    keep = _np_capacity_keep(np.asarray(top_idx), valid, e, cap)
    y, dropped = moe.dispatch_capacity(x, *ws, top_w, top_idx, jnp.asarray(valid), capacity_factor=cf)
    expected_rate = 1.0 - keep[valid].sum() / (valid.sum() * k)
    assert expected_rate > 0.05  # the test really drops something
    assert float(dropped) == pytest.approx(expected_rate, abs=1e-6)
    # Dropped assignments contribute nothing; kept ones are unchanged.
    ref = _np_moe(x, *ws, np.asarray(top_w) * keep, top_idx)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_router_softmax_topk_and_pnorm():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, D)), jnp.float32)
    for p in (1.0, 2.0, None):
        r = moe.Router(num_experts=6, top_k=3, normalize_p=p, init_std=0.5)
        v = r.init(jax.random.PRNGKey(0), x)
        logits, probs, top_w, top_idx = r.apply(v, x)
        kernel = nn.meta.unbox(v)['params']['kernel']
        np.testing.assert_allclose(logits, np.einsum('btd,de->bte', x, kernel), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-6)
        raw = np.take_along_axis(np.asarray(probs), np.asarray(top_idx), -1)
        assert np.all(np.asarray(probs).max(-1) == raw[..., 0])  # top-1 really is the max
        if p is None:
            np.testing.assert_allclose(top_w, raw, rtol=1e-6)
        else:
            np.testing.assert_allclose(top_w, raw / (raw ** p).sum(-1, keepdims=True) ** (1 / p), rtol=1e-5)
        assert logits.dtype == probs.dtype == top_w.dtype == jnp.float32


def test_router_jitter_only_when_not_deterministic():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, D)), jnp.float32)
    r = moe.Router(num_experts=4, top_k=2, jitter_eps=0.1, init_std=0.5)
    v = r.init(jax.random.PRNGKey(0), x)
    clean = r.apply(v, x)[0]
    np.testing.assert_array_equal(r.apply(v, x, deterministic=True)[0], clean)
    with pytest.raises(Exception):  # training with jitter needs the 'jitter' rng stream
        r.apply(v, x, deterministic=False)
    noisy = r.apply(v, x, deterministic=False, rngs={'jitter': jax.random.PRNGKey(1)})[0]
    again = r.apply(v, x, deterministic=False, rngs={'jitter': jax.random.PRNGKey(1)})[0]
    np.testing.assert_array_equal(noisy, again)
    assert not np.allclose(noisy, clean)
    # Multiplicative noise within [1-eps, 1+eps] per input feature bounds the logit change.
    kernel = np.asarray(nn.meta.unbox(v)['params']['kernel'])
    bound = 0.1 * np.einsum('btd,de->bte', np.abs(np.asarray(x)), np.abs(kernel))
    assert np.all(np.abs(np.asarray(noisy) - np.asarray(clean)) <= bound + 1e-5)
    # eps=None/0: no rng needed, no noise.
    r0 = moe.Router(num_experts=4, top_k=2, jitter_eps=None, init_std=0.5)
    np.testing.assert_array_equal(r0.apply(v, x, deterministic=False)[0], clean)


def test_router_aux_losses():
    rng = np.random.default_rng(0)
    n, e, k = 40, 4, 2
    logits = jnp.asarray(rng.normal(size=(n, e)) * 2, jnp.float32)
    probs = jax.nn.softmax(logits)
    _, top_idx = jax.lax.top_k(probs, k)
    valid = np.ones(n, bool)
    valid[-7:] = False
    aux = moe.router_aux(logits, probs, top_idx, jnp.asarray(valid))
    p, ti = np.asarray(probs)[valid], np.asarray(top_idx)[valid]
    counts = np.array([(ti == i).sum() for i in range(e)], np.float64)
    f = counts / valid.sum()
    assert float(aux['lb_loss']) == pytest.approx(e * np.sum(f * p.mean(0)), rel=1e-5)
    lse = np.log(np.exp(np.asarray(logits, np.float64)[valid]).sum(-1))
    assert float(aux['z_loss']) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
    np.testing.assert_allclose(aux['expert_load'], counts / counts.sum(), rtol=1e-6)
    # Perfect balance with uniform probabilities scores top_k (HF / Switch normalisation).
    uni = jnp.zeros((8, 4), jnp.float32)
    idx = jnp.asarray(np.array([[i % 4, (i + 1) % 4] for i in range(8)]), jnp.int32)
    assert float(moe.router_aux(uni, jax.nn.softmax(uni), idx)['lb_loss']) == pytest.approx(2.0)


@pytest.mark.parametrize('dispatch', ['loop', 'sorted', 'blocked', 'ragged', 'capacity'])
def test_experts_module_hf_layout_and_dispatch(dispatch):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, D)), jnp.float32)
    top_w, top_idx = _routing(12, 4, 2)
    top_w, top_idx = top_w.reshape(2, 6, 2), top_idx.reshape(2, 6, 2)
    mod = moe.Experts(num_experts=4, ffn_hidden_size=F, dispatch=dispatch, capacity_factor=100.0, init_std=0.3)
    v = mod.init(jax.random.PRNGKey(0), x, top_w, top_idx)
    specs = nn.get_partition_spec(v)['params']
    for name in ('w1', 'v1', 'w2'):
        assert nn.meta.unbox(v)['params'][name].shape == (4 * F, D)
        assert specs[name] == jax.sharding.PartitionSpec('exp_mlp', 'embed')
    y, dropped = mod.apply(v, x, top_w, top_idx)
    p = nn.meta.unbox(v)['params']
    ws = [np.asarray(p[nm]).reshape(4, F, D) for nm in ('w1', 'v1', 'w2')]
    ref = _np_moe(x.reshape(12, D), *ws, top_w.reshape(12, 2), top_idx.reshape(12, 2))
    np.testing.assert_allclose(y.reshape(12, D), ref, rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0.0


def test_auto_dispatch_is_blocked_on_cpu():
    assert moe.resolve_dispatch('auto') == {'cpu': 'blocked', 'gpu': 'sorted', 'tpu': 'ragged'}[jax.default_backend()]
    with pytest.raises(ValueError):
        moe.resolve_dispatch('nope')


def test_default_block_size():
    assert moe.default_block_size(64, 4) == 8
    assert moe.default_block_size(4096 * 4, 16) == 256
    assert moe.default_block_size(10 ** 7, 16) == 512
    assert moe.blocked_block_size(4096, 8) == 64
    assert moe.blocked_block_size(64, 4) == 16
    assert moe.blocked_block_size(10 ** 7, 16) == 512


def test_blocked_bf16_matches_float32_reference():
    # bf16 compute: weight gradients accumulate over blocks in float32, outputs stay close to the f32 result.
    (x, ws, top_w, top_idx), y_ref, g_ref = _case(32, 4, 2, 0.0)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    (_, y), g = _grad(functools.partial(moe.dispatch_blocked, block_size=3), top_idx, bf(x), *map(bf, ws), top_w)
    assert y.dtype == jnp.float32 and g[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(y, y_ref, rtol=0.05, atol=0.05)
    for gr, gg in zip(g_ref[:4], g[:4]):
        np.testing.assert_allclose(np.asarray(gg, np.float32), gr, rtol=0.05, atol=0.05 * float(np.abs(gr).max()))
