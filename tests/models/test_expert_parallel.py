"""Expert parallelism (all-to-all in shard_map) equals the single-device model: MoE layer, Dbrx, train step.

Runs on the 8 host-platform devices tests/conftest.py creates. float32 everywhere; the only differences from
the single-device program are summation orders (psum over tensor, fsdp reduce-scatter), hence ~1e-6.
"""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.models import dbrx
from mosaicjax.models import expert_parallel
from mosaicjax.models import moe
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib

RULES = rules_lib.DEFAULT_RULES
MESHES = {
    'e8': {'expert': 8},
    'f2e2t2': {'fsdp': 2, 'expert': 2, 'tensor': 2},
    'd2e4': {'data': 2, 'expert': 4},
}
E, K, D, F = 8, 2, 16, 8


def _mesh(shape):
    return mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1, **shape}))


def _shard(tree, logical, mesh):
    return jax.device_put(tree, rules_lib.logical_to_sharding(logical, mesh, RULES))


def _batch(x, mesh):
    return jax.device_put(x, rules_lib.batch_sharding(mesh, RULES, x.ndim))


def _assert_close(got, want, tol=1e-5):
    """Elementwise rtol plus an atol scaled by the array's largest entry.

    A gradient entry is a sum over every token; the sharded program adds the per-device partial sums in another
    order, so an entry that cancels to ~0 carries the rounding of its largest terms (~1e-7 of the array's scale).
    The pure-GSPMD program (no shard_map) differs from one device by the same ~1e-6 of max|grad|.
    """
    def check(g, w):
        w = np.asarray(w)
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol * scale)
    jax.tree.map(check, got, want)


# ----------------------------------------------------------------------------------------------------------
# The MoE layer alone


def _routing(shape, seed=0, skew=0.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (E,))
    logits[..., 0] += skew  # skew > 0 piles assignments onto expert 0 (expert shard 0)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
    top_w, top_idx = jax.lax.top_k(probs, K)
    return top_w / top_w.sum(-1, keepdims=True), top_idx.astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _layer_case(dispatch, capacity_factor=1.25, shape=(8, 8), skew=0.0):
    mod = moe.Experts(num_experts=E, ffn_hidden_size=F, dispatch=dispatch, capacity_factor=capacity_factor,
                      init_std=0.3)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape + (D,)), jnp.float32)
    top_w, top_idx = _routing(shape, skew=skew)
    valid = jnp.asarray(rng.random(shape) > 0.2)  # padding tokens are exchanged and computed like the rest
    boxed = mod.init(jax.random.PRNGKey(0), x, top_w, top_idx, valid)
    proj = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(params, x, top_w):
        y, dropped = mod.apply({'params': params}, x, top_w, top_idx, valid)
        return jnp.sum(y * proj), (y, dropped)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return fn, nn.unbox(boxed)['params'], nn.get_partition_spec(boxed)['params'], x, top_w, top_idx, valid


def _run_layer(case, mesh):
    """Compiles under `mesh` (None: one device, no mesh) and returns (outputs, HLO text)."""
    fn, params, logical, x, top_w, _, _ = case
    if mesh is None:
        return fn(params, x, top_w), ''
    args = (_shard(params, logical, mesh), _batch(x, mesh), _batch(top_w, mesh))
    with rules_lib.activate(mesh, RULES):
        compiled = fn.lower(*args).compile()
    return compiled(*args), compiled.as_text()


@pytest.mark.parametrize('mesh_name,dispatch', [('e8', 'blocked'), ('f2e2t2', 'sorted'), ('d2e4', 'blocked'),
                                                ('f2e2t2', 'ragged'),
                                                pytest.param('e8', 'loop', marks=pytest.mark.slow)])
def test_moe_layer_outputs_and_grads_equal_single_device(mesh_name, dispatch):
    case = _layer_case(dispatch)
    (ref_loss, (ref_y, _)), ref_grads = _run_layer(case, None)[0]
    ((loss, (y, dropped)), grads), hlo = _run_layer(case, _mesh(MESHES[mesh_name]))
    assert 'all-to-all' in hlo  # the exchange really is an all-to-all, not a GSPMD gather
    _assert_close(y, ref_y)
    _assert_close(grads, ref_grads)  # params (w1, v1, w2), x, top_w
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(dropped) == 0.0  # dropless


@pytest.mark.parametrize('shape', [{'data': 8}, {'fsdp': 4, 'tensor': 2}])
def test_expert_axis_1_dispatches_per_device_without_exchange(shape):
    # No all-to-all, and none of GSPMD's all-reduces of the whole global dispatch buffer either: each device
    # dispatches its own tokens (the HLO's only token-sized collectives are the tensor psums of [n, D]).
    case = _layer_case('blocked')
    (_, (ref_y, _)), ref_grads = _run_layer(case, None)[0]
    ((_, (y, _)), grads), hlo = _run_layer(case, _mesh(shape))
    assert 'all-to-all' not in hlo
    assert not re.search(r'f32\[\d{3,},16\][^\n]* all-reduce\(', hlo)  # no [>= 100 rows, D] all-reduce
    _assert_close(y, ref_y)
    _assert_close(grads, ref_grads)


def test_context_plan_reads_the_mesh_and_rules():
    assert expert_parallel.context_plan(E) is None  # no mesh in context
    with jax.set_mesh(_mesh({'data': 2, 'expert': 4})):
        plan = expert_parallel.context_plan(E)
        assert (plan.ep, plan.tp, plan.token_axes, plan.embed_axes, plan.token_shards) == (
            4, 1, ('data', 'fsdp', 'expert'), (), 8)
        with pytest.raises(ValueError, match='not divisible'):
            expert_parallel.context_plan(6)
    with rules_lib.activate(_mesh(MESHES['f2e2t2']), RULES):
        plan = expert_parallel.context_plan(E)
        assert (plan.ep, plan.tp, plan.embed_axes, plan.token_shards) == (2, 2, ('fsdp',), 4)
    with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), mesh_lib.AXES)):
        assert expert_parallel.context_plan(E) is None  # one device: the plain single-device program


def test_token_count_not_divisible_by_the_mesh_is_padded():
    # 3 x 5 = 15 tokens on 8 token shards (e.g. one short prompt at inference): padded inside, same answer.
    mod = moe.Experts(num_experts=E, ffn_hidden_size=F, dispatch='sorted', init_std=0.3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, D)), jnp.float32)
    top_w, top_idx = _routing((3, 5), seed=2)
    boxed = mod.init(jax.random.PRNGKey(0), x, top_w, top_idx)
    params = nn.unbox(boxed)['params']
    fn = jax.jit(lambda p, x: mod.apply({'params': p}, x, top_w, top_idx)[0])
    ref = fn(params, x)
    mesh = _mesh(MESHES['e8'])
    with rules_lib.activate(mesh, RULES):  # batch 3 does not split 8 ways: inputs stay replicated
        y = fn(_shard(params, nn.get_partition_spec(boxed)['params'], mesh), x)
    _assert_close(y, ref)


def _np_capacity_reference(x, params, top_w, top_idx, valid, shards, ep, cf):
    """Bucket drops per (token shard, destination expert shard), slot-major priority, padding last."""
    n_all, k = top_idx.shape
    n = n_all // shards
    e_local = E // ep
    cap = expert_parallel.bucket_capacity(n, k, ep, e_local, cf)
    keep = np.zeros((n_all, k), bool)
    for s in range(shards):
        used = np.zeros(ep, int)
        for pad_pass in (False, True):
            for j in range(k):
                for t in range(s * n, (s + 1) * n):
                    if bool(valid[t]) == pad_pass:
                        continue
                    dest = int(top_idx[t, j]) // e_local
                    if used[dest] < cap:
                        keep[t, j] = True
                        used[dest] += 1
    ws = [np.asarray(params[nm], np.float64).reshape(E, F, D) for nm in ('w1', 'v1', 'w2')]
    y = np.zeros((n_all, D))
    for t in range(n_all):
        for j in range(k):
            if keep[t, j]:
                e = int(top_idx[t, j])
                g = x[t] @ ws[0][e].T
                y[t] += float(top_w[t, j]) * ((g / (1 + np.exp(-g)) * (x[t] @ ws[1][e].T)) @ ws[2][e])
    rate = 1.0 - keep[valid].sum() / (valid.sum() * k)
    return y, rate


def test_capacity_dispatch_drops_overflow_and_reports_the_global_rate():
    cf = 0.75
    case = _layer_case('capacity', capacity_factor=cf, skew=2.0)
    _, params, _, x, top_w, top_idx, valid = case
    (_, (y, dropped)), _ = _run_layer(case, _mesh(MESHES['d2e4']))[0]
    flat = lambda a: np.asarray(a).reshape(64, *a.shape[2:])  # noqa: E731
    ref_y, rate = _np_capacity_reference(flat(x), params, flat(top_w), flat(top_idx), flat(valid), 8, 4, cf)
    assert rate > 0.05  # the case really drops
    assert float(dropped) == pytest.approx(rate, abs=1e-6)
    np.testing.assert_allclose(flat(y), ref_y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The whole model and the trainer


TINY = dbrx.DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=64, vocab_size=64,
                       clip_qkv=2.0, rope_theta=10000.0, ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2,
                       initializer_range=0.2, moe_dispatch='auto')


@functools.lru_cache(maxsize=None)
def _model_case():
    model = dbrx.Dbrx(TINY)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (8, 12)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 3 + [0] * 2], 8, 0), jnp.int32)  # 2 docs + padding
    positions = jnp.asarray(np.repeat([list(range(7)) + list(range(3)) + [0, 0]], 8, 0), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    proj = jnp.asarray(rng.normal(size=(8, 12, TINY.vocab_size)), jnp.float32)

    def loss(params, tokens, positions, segment_ids):
        logits, aux = model.apply({'params': params}, tokens, positions, segment_ids)
        return jnp.sum(logits * proj) + aux['moe_lb_loss'] + aux['router_z_loss'], (logits, aux)

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return fn, nn.unbox(boxed)['params'], nn.get_partition_spec(boxed)['params'], (tokens, positions, segment_ids)


# The trainer test below covers {data: 2, expert: 4} end to end; the other model meshes are in the slow run.
@pytest.mark.parametrize('mesh_name', ['f2e2t2', pytest.param('e8', marks=pytest.mark.slow),
                                       pytest.param('d2e4', marks=pytest.mark.slow)])
def test_dbrx_outputs_aux_and_grads_equal_single_device(mesh_name):
    fn, params, logical, inputs = _model_case()
    (ref_loss, (ref_logits, ref_aux)), ref_grads = fn(params, *inputs)
    mesh = _mesh(MESHES[mesh_name])
    args = (_shard(params, logical, mesh),) + tuple(_batch(a, mesh) for a in inputs)
    with rules_lib.activate(mesh, RULES):
        compiled = fn.lower(*args).compile()
    assert 'all-to-all' in compiled.as_text()
    (loss, (logits, aux)), grads = compiled(*args)
    _assert_close(logits, ref_logits)
    _assert_close(aux, ref_aux)
    _assert_close(grads, ref_grads)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_train_step_on_8_devices_gives_the_single_device_loss():
    from mosaicjax.trainer import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import state as state_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel
    cfg = dataclasses.replace(TINY, moe_jitter_eps=0.01, router_z_loss_weight=1e-3)  # jitter rng under shard
    model = dbrx.Dbrx(cfg)
    tx, schedule = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(warmup_steps=1), 2)
    step_fn = step_lib.make_train_step(model, tx, schedule, grad_accum_steps=1, z_loss_weight=1e-4,
                                       moe_loss_weight=cfg.moe_loss_weight,
                                       router_z_loss_weight=cfg.router_z_loss_weight)
    _, _, _, (tokens, positions, segment_ids) = _model_case()
    batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1), 'positions': positions,
             'segment_ids': segment_ids, 'weights': (segment_ids > 0).astype(jnp.float32)}
    example = (jnp.zeros((1, 8), jnp.int32),)
    results = []
    for devices, shape in ((jax.devices()[:1], {}), (jax.devices(), MESHES['d2e4'])):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(
            shape={'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1, **shape}), devices)
        state, shardings = state_lib.create_sharded_state(model, tx, example, 0, mesh, RULES)
        bsh = rules_lib.batch_sharding(mesh, RULES)
        with rules_lib.activate(mesh, RULES):
            jitted = jax.jit(step_fn, in_shardings=(shardings, bsh), out_shardings=(shardings, None))
            metrics = []
            for _ in range(2):  # the second step sees the first update
                state, m = jitted(state, jax.device_put(batch, bsh))
                metrics.append(jax.device_get(m))
        results.append(metrics)
    for single, sharded in zip(*results):
        for key in ('loss', 'z_loss', 'moe_lb_loss', 'router_z_loss', 'grad_norm', 'moe_dropped_fraction'):
            np.testing.assert_allclose(sharded[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
