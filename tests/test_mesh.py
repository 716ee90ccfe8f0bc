"""Meshes from config: −1 fills, one clear error for sizes that cannot cover the devices, Auto axes, batch layout."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from dit_jax.parallel.mesh import create_mesh, describe_mesh, example_order, global_batch, resolve_mesh_shape
from dit_jax.parallel.rules import logical_rules


def test_minus_one_takes_the_remaining_devices():
    assert resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == dict(data=2, fsdp=2, sequence=1, tensor=2)
    assert resolve_mesh_shape(dict(data=-1), 8) == dict(data=8, fsdp=1, sequence=1, tensor=1)
    assert resolve_mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == dict(data=1, fsdp=8, sequence=1, tensor=1)
    assert resolve_mesh_shape(dict(data=-1, sequence=4), 8) == dict(data=2, fsdp=1, sequence=4, tensor=1)


@pytest.mark.parametrize(
    "mesh,match",
    [
        (dict(data=4, fsdp=1, tensor=1), "has 4 devices but 8 are available"),
        (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
        (dict(data=-1, fsdp=3), "does not divide 8"),
        (dict(data=0), "sizes must be positive or -1"),
        (dict(data=2, model=4), "unknown axes"),
    ],
)
def test_bad_mesh_sizes_get_one_clear_error(mesh, match):
    with pytest.raises(ValueError, match=match):
        resolve_mesh_shape(mesh, 8)


def test_mesh_over_all_devices_with_auto_axes():
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=1, tensor=2)
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert set(mesh.devices.flat) == set(jax.devices())
    assert describe_mesh(mesh).startswith("data=2 fsdp=2 tensor=2 (8 devices")  # sequence=1 is not shown


def test_sequence_axis_is_inside_data_and_fsdp():
    """The default sequence=1 leaves the device layout as it was; sequence > 1 takes neighbouring devices (inner to
    data and fsdp, outer to tensor) and is reported."""
    devices = np.asarray(jax.devices(), dtype=object)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    np.testing.assert_array_equal(mesh.devices.reshape(2, 2, 2), devices.reshape(2, 2, 2))
    mesh = create_mesh(dict(data=2, sequence=2, tensor=2))
    np.testing.assert_array_equal(mesh.devices.reshape(2, 2, 2), devices.reshape(2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert describe_mesh(mesh).startswith("data=2 fsdp=1 sequence=2 tensor=2 (8 devices")


def test_global_batch_is_replicated_over_sequence():
    """Batch rows are split over data × fsdp only: the devices of one sequence group hold the same rows (and split
    the tokens in the model)."""
    mesh = create_mesh(dict(data=2, sequence=4))
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        batch = global_batch({"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}, mesh)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(4, 3)}
    assert batch["x"].sharding.spec[0] == ("data", "fsdp")


def test_global_batch_is_sharded_over_data_and_fsdp():
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        batch = global_batch({"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}, mesh)
        assert example_order(mesh, 8) is None  # one process: positions are stream order
    x = batch["x"]
    assert x.shape == (8, 3)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))


def test_cluster_launches_are_detected(monkeypatch):
    """srun / mpirun process counts start jax.distributed without flags; a plain Slurm batch step does not."""
    from dit_jax.parallel import mesh as mesh_lib

    for var in ("SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert mesh_lib._cluster_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert mesh_lib._cluster_processes() == 1  # the batch script itself, not an srun step
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert mesh_lib._cluster_processes() == 4
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert mesh_lib._cluster_processes() == 2
