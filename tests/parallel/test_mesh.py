import jax
import pytest
from jax.sharding import PartitionSpec as P

from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib


def test_fill_axis_takes_remaining_devices():
    assert mesh_lib.resolve_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1}
    assert mesh_lib.resolve_shape({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}, 8)["tensor"] == 2


@pytest.mark.parametrize("shape, fragment", [
    ({"data": -1, "fsdp": 3}, "does not divide the 8 available devices"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
    ({"data": -1, "model": 2}, "unknown axes ['model']"),
    ({"data": 0}, "must be positive"),
])
def test_bad_shapes_name_the_problem(shape, fragment):
    with pytest.raises(mesh_lib.MeshError) as e:
        mesh_lib.resolve_shape(shape, 8)
    assert fragment in str(e.value)
    assert "mesh.shape" in str(e.value)


def test_make_mesh_axes_and_batch_shards():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}))
    assert mesh.axis_names == mesh_lib.AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert mesh_lib.batch_shards(mesh) == 4
    one = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert mesh_lib.batch_shards(one) == 1


def test_rules_map_logical_to_mesh_axes():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}))
    rules = rules_lib.get_rules()
    sh = rules_lib.logical_to_sharding({"w": P("embed", "mlp"), "e": P("exp_mlp", "embed")}, mesh, rules)
    assert sh["w"].spec == P("fsdp", "tensor")
    assert sh["e"].spec == P("expert", "fsdp")
    assert rules_lib.batch_sharding(mesh, rules).spec == P(("data", "fsdp", "expert"), None)
