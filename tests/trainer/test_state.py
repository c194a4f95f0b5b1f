"""Parameters and optimizer state are created already sharded, exactly as the rules table says."""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mosaicjax.models import dbrx
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib
from mosaicjax.trainer import optimizer as optimizer_lib
from mosaicjax.trainer import state as state_lib

CFG = dbrx.DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=64, vocab_size=64,
                      ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2)


@pytest.fixture(scope="module")
def sharded():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}))
    rules = rules_lib.get_rules()
    tx, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), 10)
    state, shardings = state_lib.create_sharded_state(dbrx.Dbrx(CFG), tx, (jnp.zeros((1, 8), jnp.int32),), 0,
                                                      mesh, rules)
    return state, shardings, tx


def test_params_follow_the_rules(sharded):
    state, _, _ = sharded
    p = state.params
    assert p["wte"]["embedding"].sharding.spec == P("tensor", "fsdp")            # [vocab, embed]
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")          # [embed, vocab]
    w1 = p["blocks"]["experts"]["w1"]                                           # [layers, experts*ffn, embed]
    assert w1.sharding.spec == P(None, "expert", "fsdp")
    assert w1.addressable_shards[0].data.shape == (2, 4 * 16 // 2, 32 // 2)
    wqkv = p["blocks"]["attn"]["Wqkv"]["kernel"]                                # [layers, embed, qkv]
    assert wqkv.sharding.spec == P(None, "fsdp", "tensor")
    # No device holds a whole expert tensor: each has 1/4 of it.
    assert all(s.data.size * 4 == w1.size for s in w1.addressable_shards)


def test_optimizer_moments_are_sharded_like_their_params(sharded):
    state, _, tx = sharded
    mus = optax.tree_map_params(tx, lambda p: p, state.opt_state, transform_non_params=lambda _: None)
    found = []

    def check(path, leaf):
        if hasattr(leaf, "sharding") and leaf.ndim == 3 and leaf.shape[1] == 4 * 16:
            found.append(leaf.sharding.spec)
    jax.tree_util.tree_map_with_path(check, mus)
    assert found and all(spec == P(None, "expert", "fsdp") for spec in found)


def test_init_matches_single_device_init(sharded):
    state, _, tx = sharded
    one = mesh_lib.make_mesh(devices=jax.devices()[:1])
    ref, _ = state_lib.create_sharded_state(dbrx.Dbrx(CFG), tx, (jnp.zeros((1, 8), jnp.int32),), 0, one,
                                            rules_lib.get_rules())
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert jnp.array_equal(jax.device_get(a), jax.device_get(b))
