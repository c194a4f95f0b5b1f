"""The device mesh: four named axes whose sizes come from the experiment config.

Axes (outermost first, so the innermost, most communication-heavy axis lands on the fastest links):
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  MoE experts split across devices; acts as data parallelism for the non-expert layers
  tensor  Megatron-style tensor parallelism inside attention and MLPs
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from mosaicjax.config import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")
# The mesh axes a global batch is split over: every axis except tensor sees different examples.
BATCH_AXES = ("data", "fsdp", "expert")


class MeshError(ConfigError):
    """A mesh shape that cannot be laid over the available devices."""


@gin.configurable("mesh")
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Size of each mesh axis, keyed by axis name ('data', 'fsdp', 'expert', 'tensor'). One axis may be -1: it
    # takes all devices the others leave. Missing axes have size 1. The product must equal the device count.
    shape: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills the -1 axis and checks the product; errors name the binding and the fix."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise MeshError(f"mesh.shape has unknown axes {sorted(unknown)}; valid axes are {list(AXES)}")
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh.shape={dict(shape)}: only one axis may be -1, got {free}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise MeshError(f"mesh.shape['{a}']={s}: axis sizes must be positive (or -1 to fill)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh.shape={dict(shape)}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices; choose sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh.shape={dict(shape)} needs {fixed} devices but {num_devices} are available; set one axis to -1 "
            f"(e.g. --gin_param=\"mesh.shape={{'data': -1, ...}}\") or make the product {num_devices}")
    return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_shape(config.shape, len(devices))
    dims = tuple(sizes[a] for a in AXES)
    try:
        # Topology-aware placement on TPU/GPU slices (keeps inner axes on the fastest interconnect).
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU and irregular device sets: plain row-major order is as good as any.
        grid = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(grid, AXES)


def batch_shards(mesh: Mesh) -> int:
    """How many ways a global batch is split (the data-parallel size)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
