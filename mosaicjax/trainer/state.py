"""Train state, created directly in its sharded layout.

Parameters and optimizer state never exist whole on one device: `jax.eval_shape` gives their shapes and logical axis
names without allocating, the rules table turns those names into shardings, and one `jax.jit(init, out_shardings=...)`
materialises every shard where it lives.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mosaicjax.parallel import rules as rules_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: Any              # model parameters (float32 master copy)
    opt_state: Any           # optax state, sharded like the parameters it tracks
    rng: jax.Array           # uint32[2] base key; per-step keys are fold_in(rng, step), so resume needs nothing else


def param_logical_specs(model: nn.Module, example_inputs: tuple) -> Any:
    """Logical PartitionSpecs of the parameters, read from the model's annotations without allocating."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs))["params"]
    return nn.get_partition_spec(boxed)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, example_inputs: tuple,
                    mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf of the TrainState."""
    logical = param_logical_specs(model, example_inputs)
    param_sh = rules_lib.logical_to_sharding(logical, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *example_inputs)["params"]))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Optimizer moments mirror the parameters they track; counters and other scalars are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, example_inputs: tuple,
                 seed: int) -> Callable[[], TrainState]:
    def init() -> TrainState:
        rng = jax.random.PRNGKey(seed)
        init_rng, run_rng = jax.random.split(rng)
        params = nn.unbox(model.init(init_rng, *example_inputs)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=run_rng)
    return init


def create_sharded_state(model, tx, example_inputs, seed, mesh, rules) -> tuple[TrainState, TrainState]:
    """Returns (state, shardings): the state initialised shard by shard on `mesh`."""
    shardings = state_shardings(model, tx, example_inputs, mesh, rules)
    with rules_lib.activate(mesh, rules):
        state = jax.jit(make_init_fn(model, tx, example_inputs, seed), out_shardings=shardings)()
    return state, shardings


def abstract_state(model, tx, example_inputs, seed, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restore lays the saved arrays onto."""
    shapes = jax.eval_shape(make_init_fn(model, tx, example_inputs, seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
