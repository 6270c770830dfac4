"""The project mesh: sizes from config, -1, named layouts, and clear errors before compiling."""
import jax
import pytest
from jax.sharding import AxisType

from jaxcourse.errors import UserError
from jaxcourse.parallel import mesh as mesh_lib


def test_minus_one_takes_the_rest():
    assert mesh_lib.mesh_shape({"tensor": 2, "data": -1}, 8) == {
        "data": 4, "pipeline": 1, "fsdp": 1, "expert": 1, "tensor": 2}
    assert mesh_lib.mesh_shape({}, 1)["data"] == 1


@pytest.mark.parametrize("sizes, devices, message", [
    ({"data": 3, "fsdp": -1}, 8, "do not divide the 8 devices"),
    ({"data": 2, "tensor": 2}, 8, "needs 4 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, 8, "only one axis may be -1"),
    ({"tensor": 0}, 8, "mesh.tensor=0"),
    ({"model": 2}, 8, "unknown mesh axis 'model'"),
])
def test_bad_mesh_is_one_clear_error(sizes, devices, message):
    with pytest.raises(UserError, match=message):
        mesh_lib.mesh_shape(sizes, devices)


def test_make_mesh_has_five_auto_axes_for_every_layout():
    for name in mesh_lib.LAYOUTS:
        devices = jax.devices()[:1] if name == "single" else jax.devices()
        mesh = mesh_lib.make_mesh(mesh_lib.layout_config(name), devices)
        assert mesh.axis_names == mesh_lib.AXES
        assert set(mesh.axis_types) == {AxisType.Auto}
        assert mesh.size == len(devices)
    mesh = mesh_lib.make_mesh(mesh_lib.layout_config("fsdp_tp"))
    assert (mesh.shape["fsdp"], mesh.shape["tensor"]) == (4, 2)
    assert mesh_lib.describe(mesh) == "fsdp=4 x tensor=2"


def test_batch_must_split_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh_lib.batch_shards(mesh) == 4
    mesh_lib.check_batch(8, mesh)
    with pytest.raises(UserError, match=r"batch_size=6 is not divisible by data=2 x fsdp=2"):
        mesh_lib.check_batch(6, mesh)
    with pytest.raises(UserError, match=r"x 4 microbatches \(= 16\)"):
        mesh_lib.check_batch(8, mesh, microbatches=4)


def test_unknown_layout_and_axis_names():
    with pytest.raises(UserError, match="unknown layout 'zero3'"):
        mesh_lib.layout_config("zero3")
    with pytest.raises(UserError, match="unknown mesh axis 'model'"):
        mesh_lib.mesh_config(model=2)
    assert dict(mesh_lib.mesh_config(tensor=2)) == {
        "data": 1, "pipeline": 1, "fsdp": 1, "expert": 1, "tensor": 2, "rules": "gpt",
        "devices": 0}


def test_mesh_on_the_first_devices():
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_config(data=-1, devices=4))
    assert mesh.shape["data"] == 4 and list(mesh.devices.flat) == jax.devices()[:4]
    with pytest.raises(UserError, match="mesh.devices=9: there are 8 devices"):
        mesh_lib.make_mesh(mesh_lib.mesh_config(devices=9))
