"""Logical-axis rules: the one table that maps the model's named axes onto mesh axes.

Models name every parameter and key activation axis ('embed', 'mlp', 'act_batch', ...) and never mention the mesh;
changing a parallelism layout is editing this table (or binding `logical_axis_rules.rules` in gin), not the model.
Parameter axes and activation axes have separate names because they shard differently: a parameter's 'embed' axis
is split over fsdp (ZeRO-3), while activations are split over the batch and keep 'act_embed' whole.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import gin
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("exp_mlp", "expert"),  # HF-layout expert weights [experts*ffn, d_model]: contiguous experts per shard
    ("layers", None),
    ("norm", None),
    # Activations.
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_exp", "expert"),
    ("act_vocab", "tensor"),
)


@gin.configurable("logical_axis_rules")
def get_rules(rules: Rules = DEFAULT_RULES) -> tuple:
    """The rules table in effect. Bind `logical_axis_rules.rules = (...)` to change the layout."""
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Makes activation constraints inside the model resolve against `mesh` with `rules`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_tree, mesh: Mesh, rules: Rules):
    """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch split as 'act_batch' says, other dims replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))
