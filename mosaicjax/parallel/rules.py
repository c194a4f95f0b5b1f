"""Logical-axis rules: the one table that maps the model's named axes onto mesh axes.

Models name every parameter and key activation axis ('embed', 'mlp', 'act_batch', ...) and never mention the mesh;
changing a parallelism layout is editing this table (or binding `logical_axis_rules.rules` in gin), not the model.
Parameter axes and activation axes have separate names because they shard differently: a parameter's 'embed' axis
is split over fsdp (ZeRO-3), while activations are split over the batch and keep 'act_embed' whole.
"""
from __future__ import annotations

import contextlib
import math
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
    # Convolution kernels [kh, kw, in, out] (UNet, VAE): input channels over fsdp like a dense kernel's 'embed'
    # (listed after 'embed', so a ('conv_in', 'embed') kernel splits its 'embed' side). Most of a UNet's weights are
    # convolutions (589M of SD1.5's 860M), so without this rule fsdp left them whole on every device.
    ("conv_in", "fsdp"),
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


def fit_to_shapes(shardings, shapes):
    """Each NamedSharding with the mesh axes dropped from any dimension of its array they do not divide.

    jax refuses uneven shards; a few small dimensions (the UNet's 4 input channels under fsdp=8) are better left
    whole than forcing a smaller mesh on everything else. `shapes`: a matching tree of arrays or ShapeDtypeStructs.
    """
    def fit(sharding: NamedSharding, like) -> NamedSharding:
        spec = list(sharding.spec) + [None] * (len(like.shape) - len(sharding.spec))
        for i, (dim, axes) in enumerate(zip(like.shape, spec)):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if names and dim % math.prod(sharding.mesh.shape[a] for a in names):
                spec[i] = None
        return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    return jax.tree.map(fit, shardings, shapes)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch split as 'act_batch' says, other dims replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))
