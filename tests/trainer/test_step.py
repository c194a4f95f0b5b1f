"""The train step: gradient accumulation equals one big batch; z-loss and MoE losses enter the objective."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mosaicjax.models import dbrx
from mosaicjax.trainer import optimizer as optimizer_lib
from mosaicjax.trainer import state as state_lib
from mosaicjax.trainer import step as step_lib

CFG = dbrx.DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=32, vocab_size=64,
                      ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2, moe_jitter_eps=0.0)


def _batch(b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2                                    # two documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    weights = np.ones((b, t), np.float32)
    weights[:, t // 2 - 1] = 0                             # no target across the document boundary
    weights[-1, :] = 0                                     # a padded row
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos, jnp.int32),
            "weights": jnp.asarray(weights)}


def _run(accum, z_loss=0.0, sgd=False):
    model = dbrx.Dbrx(CFG)
    tx, schedule = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(warmup_steps=0), 10)
    if sgd:  # the update is then the gradient itself, so parameters compare gradients
        tx, schedule = optax.sgd(1.0), (lambda step: 1.0)
    init = state_lib.make_init_fn(model, tx, (jnp.zeros((1, 8), jnp.int32),), 0)
    state = jax.jit(init)()
    fn = jax.jit(step_lib.make_train_step(model, tx, schedule, grad_accum_steps=accum, z_loss_weight=z_loss,
                                          moe_loss_weight=0.0, router_z_loss_weight=0.0))
    new_state, metrics = fn(state, _batch())
    return new_state, jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch():
    s1, m1 = _run(1, sgd=True)
    s4, m4 = _run(4, sgd=True)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_loss_is_token_weighted_cross_entropy():
    _, m = _run(1)
    model = dbrx.Dbrx(CFG)
    state = jax.jit(state_lib.make_init_fn(model, optimizer_lib.make_optimizer(
        optimizer_lib.OptimizerConfig(), 10)[0], (jnp.zeros((1, 8), jnp.int32),), 0))()
    b = _batch()
    logits, _ = model.apply({"params": state.params}, b["inputs"], b["positions"], b["segment_ids"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    expected = float(jnp.sum(nll * b["weights"]) / jnp.sum(b["weights"]))
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["num_tokens"] == float(jnp.sum(b["weights"]))


def test_z_loss_changes_the_update_not_the_reported_loss():
    s0, m0 = _run(1)
    s1, m1 = _run(1, z_loss=1e-2)
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6)
    assert m1["z_loss"] > 0
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)))
    assert diff > 0
