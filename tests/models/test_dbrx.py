"""The Dbrx module: packing semantics, scan/remat/bf16 variants, aux outputs, sizes of the 132B config."""
import dataclasses
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.models import dbrx

TINY = dbrx.DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=64, vocab_size=64,
                       clip_qkv=2.0, rope_theta=10000.0, ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2,
                       initializer_range=0.2)


def _cfg(**kw):
    return dataclasses.replace(TINY, **kw)


def _init(cfg, seed=0, t=12):
    init = jax.jit(dbrx.Dbrx(cfg).init)
    return nn.unbox(init(jax.random.PRNGKey(seed), jnp.zeros((1, t), jnp.int32))['params'])


def _apply_fn(cfg, deterministic=True):
    model = dbrx.Dbrx(cfg)

    @jax.jit
    def f(params, tokens, positions=None, segment_ids=None, rng=None):
        rngs = None if rng is None else {'jitter': rng}
        return model.apply({'params': params}, tokens, positions, segment_ids, deterministic=deterministic,
                           rngs=rngs)
    return f


PARAMS = _init(TINY)
APPLY = _apply_fn(TINY)


def _tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape), jnp.int32)


def test_output_contract():
    tok = _tokens(0, (2, 12))
    logits, aux = APPLY(PARAMS, tok)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert set(aux) == {'moe_lb_loss', 'router_z_loss', 'expert_load', 'dropped_fraction'}
    assert aux['moe_lb_loss'].shape == aux['router_z_loss'].shape == aux['dropped_fraction'].shape == ()
    assert aux['expert_load'].shape == (2, 4)
    np.testing.assert_allclose(aux['expert_load'].sum(-1), 1.0, rtol=1e-6)
    assert float(aux['dropped_fraction']) == 0.0
    assert float(aux['moe_lb_loss']) >= 1.0  # >= top_k * (something near 1) for any routing; 2.0 = balanced
    # Defaults: positions = arange, segment_ids = ones.
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    l2, _ = APPLY(PARAMS, tok, pos, jnp.ones((2, 12), jnp.int32))
    np.testing.assert_array_equal(logits, l2)


def test_param_tree_matches_spec():
    e, f, d = 4, 16, 32
    shapes = jax.tree.map(lambda a: a.shape, PARAMS)
    assert shapes == {
        'wte': {'embedding': (64, d)},
        'blocks': {'norm_1': {'scale': (2, d)}, 'norm_2': {'scale': (2, d)},
                   'attn': {'Wqkv': {'kernel': (2, d, (4 + 2 * 2) * 8)}, 'out_proj': {'kernel': (2, d, d)}},
                   'router': {'kernel': (2, d, e)},
                   'experts': {'w1': (2, e * f, d), 'v1': (2, e * f, d), 'w2': (2, e * f, d)}},
        'norm_f': {'scale': (d,)},
        'lm_head': {'kernel': (d, 64)},
    }
    boxed = jax.eval_shape(dbrx.Dbrx(TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    specs = nn.get_partition_spec(boxed)['params']
    P = jax.sharding.PartitionSpec
    assert specs['blocks']['experts']['w1'] == P('layers', 'exp_mlp', 'embed')
    assert specs['blocks']['attn']['Wqkv']['kernel'] == P('layers', 'embed', 'qkv')
    assert specs['wte']['embedding'] == P('vocab', 'embed')
    assert specs['lm_head']['kernel'] == P('embed', 'vocab')
    n_tree = sum(a.size for a in jax.tree.leaves(PARAMS))
    counts = dbrx.count_params(TINY)
    assert counts['total'] == n_tree
    expert = 2 * 3 * e * f * d
    assert counts['active'] == n_tree - expert + expert * 2 // 4
    assert counts['embedding'] == 64 * d


def test_segments_block_cross_document_attention_and_positions_restart():
    a, b = 5, 7  # row = [document A | document B], positions restart at B
    seg = jnp.asarray([[1] * a + [2] * b] * 2, jnp.int32)
    pos = jnp.asarray([list(range(a)) + list(range(b))] * 2, jnp.int32)
    tok = _tokens(1, (1, a + b))
    tok2 = tok.at[0, :a].set((tok[0, :a] + 7) % 64)  # change document A only
    both = jnp.concatenate([tok, tok2])
    logits, _ = APPLY(PARAMS, both, pos, seg)
    assert not np.allclose(logits[0, :a], logits[1, :a])
    np.testing.assert_array_equal(logits[0, a:], logits[1, a:])  # document B cannot see document A
    # Document B packed second == document B at the start of a row (then padding): positions restart, no
    # leakage either way, padding is invisible.
    alone = jnp.concatenate([tok[:, a:], jnp.full((1, a), 3, jnp.int32)], axis=1)
    seg_alone = jnp.asarray([[1] * b + [0] * a], jnp.int32)
    pos_alone = jnp.asarray([list(range(b)) + [0] * a], jnp.int32)
    l_alone, _ = APPLY(PARAMS, jnp.concatenate([alone, both[:1]]), jnp.concatenate([pos_alone, pos[:1]]),
                       jnp.concatenate([seg_alone, seg[:1]]))
    np.testing.assert_allclose(l_alone[0, :b], logits[0, a:], rtol=1e-5, atol=1e-5)
    # Control: with one segment per row the same edit does reach document B.
    ones = jnp.ones_like(seg)
    l_one, _ = APPLY(PARAMS, both, pos, ones)
    assert not np.allclose(l_one[0, a:], l_one[1, a:])


def test_padding_is_invisible_and_excluded_from_router_stats():
    n, pad = 8, 4
    tok = _tokens(2, (2, n))
    seg = jnp.asarray([[1] * n + [0] * pad] * 2, jnp.int32)
    pos = jnp.asarray([list(range(n)) + [0] * pad] * 2, jnp.int32)
    p1 = jnp.concatenate([tok, jnp.full((2, pad), 3, jnp.int32)], axis=1)
    p2 = jnp.concatenate([tok, _tokens(9, (2, pad))], axis=1)  # different padding content
    l1, aux1 = APPLY(PARAMS, p1, pos, seg)
    l2, aux2 = APPLY(PARAMS, p2, pos, seg)
    assert np.all(np.isfinite(l1))
    np.testing.assert_array_equal(l1[:, :n], l2[:, :n])
    for k in ('moe_lb_loss', 'router_z_loss', 'expert_load'):
        np.testing.assert_allclose(aux1[k], aux2[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # ... while the same change on real tokens does move the router statistics.
    _, aux3 = APPLY(PARAMS, p2, pos, jnp.ones_like(seg))
    _, aux4 = APPLY(PARAMS, p1, pos, jnp.ones_like(seg))
    assert not np.allclose(aux3['router_z_loss'], aux4['router_z_loss'])


def test_scan_and_unrolled_layers_agree():
    tok = _tokens(3, (2, 12))
    l_scan, aux_scan = APPLY(PARAMS, tok)
    cfg = _cfg(scan_layers=False)
    unrolled = dbrx.unstack_block_params(PARAMS, TINY.n_layers)
    expected = jax.eval_shape(lambda: _init(cfg))
    assert jax.tree.map(lambda a: a.shape, unrolled) == jax.tree.map(lambda a: a.shape, expected)
    l_un, aux_un = _apply_fn(cfg)(unrolled, tok)
    np.testing.assert_allclose(l_un, l_scan, rtol=1e-5, atol=1e-5)
    for k in aux_scan:
        np.testing.assert_allclose(aux_un[k], aux_scan[k], rtol=1e-5, atol=1e-6, err_msg=k)
    restacked = dbrx.stack_block_params(unrolled, TINY.n_layers)
    jax.tree.map(np.testing.assert_array_equal, restacked, PARAMS)


def _assert_close_to_scale(got, ref, tol):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))
    assert err < tol, err


def _loss_and_grads(cfg, params, tok):
    model = dbrx.Dbrx(cfg)
    proj = jnp.asarray(np.random.default_rng(0).normal(size=tok.shape + (cfg.vocab_size,)), jnp.float32)

    def loss(p):
        logits, aux = model.apply({'params': p}, tok)
        return jnp.sum(logits * proj) + aux['moe_lb_loss'] + aux['router_z_loss'], logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@functools.lru_cache(maxsize=None)
def _reference_grads():
    return _loss_and_grads(TINY, PARAMS, _tokens(4, (2, 12)))


@pytest.mark.parametrize('remat', ['full', pytest.param('dots', marks=pytest.mark.slow)])
def test_remat_same_outputs_and_grads(remat):
    (_, l_ref), g_ref = _reference_grads()
    (_, l_got), g_got = _loss_and_grads(_cfg(remat=remat), PARAMS, _tokens(4, (2, 12)))
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-5, atol=1e-5)
    # Recomputation changes fusion and summation order: float32 round-off, so compare each gradient relative
    # to its own scale (observed ~1e-6; a wrong gradient would be O(1)).
    jax.tree.map(lambda a, b: _assert_close_to_scale(a, b, 1e-5), g_got, g_ref)


def test_bf16_compute_float32_params_and_logits():
    cfg = _cfg(dtype='bfloat16')
    params = jax.eval_shape(lambda: _init(cfg))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    params = PARAMS
    tok = _tokens(5, (2, 12))
    logits, aux = _apply_fn(cfg)(params, tok)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert aux['moe_lb_loss'].dtype == jnp.float32
    ref, _ = APPLY(params, tok)
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert rel < 0.1, rel  # bf16 matmuls: close to float32, not equal


def test_dispatch_strategies_agree_in_the_model():
    tok = _tokens(6, (2, 12))
    ref, aux_ref = _apply_fn(_cfg(moe_dispatch='loop'))(PARAMS, tok)
    got, _ = APPLY(PARAMS, tok)  # 'auto'
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    _, aux_cap = _apply_fn(_cfg(moe_dispatch='capacity', moe_capacity_factor=0.5))(PARAMS, tok)
    assert 0.0 < float(aux_cap['dropped_fraction']) < 1.0


def test_jitter_only_in_training():
    cfg = _cfg(moe_jitter_eps=0.3)
    tok = _tokens(7, (2, 12))
    clean, _ = APPLY(PARAMS, tok)  # (deterministic passes ignore jitter: see test_moe's router test)
    train = _apply_fn(cfg, deterministic=False)
    n1, _ = train(PARAMS, tok, rng=jax.random.PRNGKey(1))
    n2, _ = train(PARAMS, tok, rng=jax.random.PRNGKey(2))
    assert not np.allclose(n1, clean) and not np.allclose(n1, n2)


def test_full_132b_config_shapes_without_memory():
    cfg = dbrx.DbrxConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.n_layers, cfg.moe_num_experts, cfg.moe_top_k) == (
        6144, 48, 8, 40, 16, 4)
    shapes = jax.eval_shape(lambda: nn.unbox(
        dbrx.Dbrx(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']))
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    counts = dbrx.count_params(cfg)
    assert total == counts['total'] == 131_596_523_520
    assert 130e9 < counts['total'] < 133e9  # "132B"
    assert 35e9 < counts['active'] < 37.5e9  # "36B active"
    assert shapes['blocks']['experts']['w1'].shape == (40, 16 * 10752, 6144)
    assert shapes['blocks']['attn']['Wqkv']['kernel'].shape == (40, 6144, (48 + 16) * 128)


def test_flops_per_token_palm_formula():
    cfg = dbrx.DbrxConfig()
    c = dbrx.count_params(cfg)
    assert dbrx.flops_per_token(cfg, 4096) == 6 * (c['active'] - c['embedding']) + 12 * 40 * 6144 * 4096
    # ~6 * 36B: the attention term is a small correction at 4k context.
    assert 2.1e11 < dbrx.flops_per_token(cfg, 4096) < 2.4e11


def test_config_gin_and_validation():
    gin.clear_config()
    try:
        gin.parse_config(['DbrxConfig.d_model = 64', 'DbrxConfig.n_heads = 2', "DbrxConfig.moe_dispatch = 'loop'"])
        cfg = dbrx.DbrxConfig(kv_n_heads=1)
        assert (cfg.d_model, cfg.n_heads, cfg.moe_dispatch, cfg.head_dim) == (64, 2, 'loop', 32)
    finally:
        gin.clear_config()
    assert dbrx.DbrxConfig().d_model == 6144
    for bad in (dict(n_heads=5), dict(kv_n_heads=5), dict(moe_top_k=17), dict(remat='some'),
                dict(moe_dispatch='x'), dict(dtype='float99'), dict(attention_impl='flash')):
        with pytest.raises((ValueError, TypeError)):
            dbrx.DbrxConfig(**bad)
    hash(TINY)  # usable as a static jit argument / module attribute


def test_sharded_on_a_mesh_matches_single_device():
    # The model only names axes: under an 8-device mesh with the default rules table it computes the same logits.
    from mosaicjax.parallel import rules  # pylint: disable=import-outside-toplevel
    devices = np.array(jax.devices()[:8]).reshape(1, 2, 2, 2)
    mesh = jax.sharding.Mesh(devices, ('data', 'fsdp', 'expert', 'tensor'))
    tok = _tokens(10, (4, 12))
    ref, _ = APPLY(PARAMS, tok[:2])
    boxed = jax.eval_shape(dbrx.Dbrx(TINY).init, jax.random.PRNGKey(0), tok)['params']
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules.DEFAULT_RULES)
    params = jax.device_put(PARAMS, shardings)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp', 'expert')))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.DEFAULT_RULES):
        logits, _ = jax.jit(dbrx.Dbrx(TINY).apply)({"params": params}, jax.device_put(tok, batch))
    assert len(params['blocks']['experts']['w1'].sharding.device_set) == 8
    np.testing.assert_allclose(logits[:2], ref, rtol=1e-5, atol=1e-5)
