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


def test_fit_to_shapes_keeps_indivisible_dimensions_whole():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}))
    sh = rules_lib.logical_to_sharding({"a": P(None, None, "conv_in", "conv_out"), "b": P(None, None, "conv_in")},
                                       mesh, rules_lib.get_rules())
    assert sh["a"].spec == P(None, None, "fsdp", None)
    shapes = {"a": jax.ShapeDtypeStruct((3, 3, 4, 32), "float32"), "b": jax.ShapeDtypeStruct((3, 3, 64), "float32")}
    fitted = rules_lib.fit_to_shapes(sh, shapes)
    assert fitted["a"].spec == P(None, None, None, None)  # 4 input channels cannot split 8 ways
    assert fitted["b"].spec == P(None, None, "fsdp")
    two_axes = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}))
    c = rules_lib.fit_to_shapes(jax.sharding.NamedSharding(two_axes, P(("fsdp", "tensor"))),
                                jax.ShapeDtypeStruct((12,), "float32"))
    assert c.spec == P(None)  # 12 is not divisible by 4 x 2


def test_unet_conv_kernels_split_over_fsdp():
    """fsdp shards the UNet's convolutions, its bulk, not only its dense kernels; jax accepts every sharding."""
    from mosaicjax.models import unet
    cfg = unet.UNetConfig(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                          layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                          up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
                          cross_attention_dim=32, norm_num_groups=8)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}))
    shapes = unet.param_shapes(cfg)
    sh = rules_lib.fit_to_shapes(rules_lib.logical_to_sharding(unet.param_logical_axes(cfg), mesh,
                                                               rules_lib.get_rules()), shapes)
    assert sh["conv_in"]["kernel"].spec == P(None, None, None, None)  # 4 latent channels stay whole
    assert sh["down_blocks_0"]["resnets_0"]["conv1"]["kernel"].spec == P(None, None, "fsdp", None)
    assert sh["conv_out"]["kernel"].spec == P(None, None, "fsdp", None)
    params = jax.jit(lambda: unet.init_params(cfg, jax.random.key(0)), out_shardings=sh)()
    kernel = params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (3, 3, 4, 32)
