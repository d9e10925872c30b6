import jax
import pytest
from jax.sharding import AxisType

from ernie_jax.sharding import MESH_AXES, MeshConfig, make_mesh


def test_minus_one_takes_the_rest():
    assert MeshConfig(data=2, fsdp=-1).resolve(8) == {"data": 2, "pipeline": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert MeshConfig(fsdp=1, tensor=-1, expert=2).resolve(8)["tensor"] == 4


@pytest.mark.parametrize("cfg, n, match", [
    (MeshConfig(data=3, fsdp=-1), 8, "does not divide"),
    (MeshConfig(data=2, fsdp=2), 8, "multiply to 4"),
])
def test_bad_sizes(cfg, n, match):
    with pytest.raises(ValueError, match=match):
        cfg.resolve(n)


def test_bad_config():
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=">= 1 or -1"):
        MeshConfig(tensor=0)


@pytest.mark.parametrize("cfg", [MeshConfig(), MeshConfig(data=2, fsdp=2, tensor=2),
                                 MeshConfig(pipeline=2, expert=2, fsdp=-1), MeshConfig(fsdp=1, data=-1)])
def test_mesh_on_8_devices_is_auto(cfg):
    assert jax.device_count() == 8
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert mesh.devices.size == 8
    assert dict(mesh.shape) == cfg.resolve(8)


def test_mesh_on_a_subset_of_devices():
    mesh = make_mesh(MeshConfig(fsdp=-1), devices=jax.devices()[:2])
    assert mesh.shape["fsdp"] == 2
