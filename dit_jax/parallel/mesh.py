"""Device meshes from a config (axes ``data``, ``fsdp``, ``sequence``, ``tensor``), multi-host start-up, and global
batches.

``config.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)``: one entry may be −1 and takes the remaining devices;
an axis left out has size 1; the product must equal the device count. The batch is split over ``data`` × ``fsdp``,
parameters over ``fsdp`` (and ``tensor``), tokens over ``sequence`` (sequence-parallel attention,
``dit_jax.parallel.sequence``), heads and MLP widths over ``tensor``. Axes are listed outermost first: ``tensor``
and ``sequence``, which exchange activations in every layer, are innermost (nearest devices, one process).

For multi-slice pods ``config.dcn_mesh`` gives the across-slice factors (the mesh is then ICI × DCN per axis, built
with ``mesh_utils.create_hybrid_device_mesh``).
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int, *, what: str = "mesh") -> dict[str, int]:
    """Sizes for ``MESH_AXES`` with a −1 entry filled in; one clear error when they cannot cover ``num_devices``."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.{what} has unknown axes {unknown}; expected keys among {MESH_AXES}")
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"config.{what}={dict(mesh_config)} is invalid: sizes must be positive or -1, got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.{what}={dict(mesh_config)} is invalid: at most one axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config.{what}={dict(mesh_config)} cannot cover {num_devices} devices: the fixed axes take {known}, "
                f"which does not divide {num_devices}"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.{what}={dict(mesh_config)} has {math.prod(sizes.values())} devices but {num_devices} are "
            f"available; the product of the axis sizes must equal the device count (use -1 for one axis to fill)"
        )
    return sizes


def create_mesh(
    mesh_config: Mapping[str, int],
    dcn_mesh_config: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A ``Mesh`` over all devices of all processes with ``Auto`` axes (what Linen's logical rules need)."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: int(v) for a, v in (dcn_mesh_config or {}).items()}
    num_slices = math.prod(dcn.values()) if dcn else 1
    if num_slices > 1:
        dcn_shape = resolve_mesh_shape(dcn, num_slices, what="dcn_mesh")
        if len(devices) % num_slices:
            raise ValueError(f"config.dcn_mesh={dcn} has {num_slices} slices, which does not divide {len(devices)}")
        ici_shape = resolve_mesh_shape(mesh_config, len(devices) // num_slices)
        # TPU slices carry slice_index; elsewhere (GPU hosts, CPU tests) each process is one granule
        granule_is_process = len({getattr(d, "slice_index", 0) for d in devices}) < num_slices
        array = mesh_utils.create_hybrid_device_mesh(
            [ici_shape[a] for a in MESH_AXES],
            [dcn_shape[a] for a in MESH_AXES],
            devices,
            process_is_granule=granule_is_process,
        )
    else:
        shape = resolve_mesh_shape(mesh_config, len(devices))
        dims = [shape[a] for a in MESH_AXES]
        if devices[0].platform == "tpu":
            array = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
        else:  # devices are ordered by process, so the innermost axes stay within a process
            array = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe_mesh(mesh: Mesh) -> str:
    """``data=4 fsdp=2 tensor=1 (8 devices, 2 processes, cpu)``; ``sequence`` is shown when it splits tokens."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items() if name != "sequence" or size > 1)
    return f"{axes} ({mesh.size} devices, {jax.process_count()} processes, {mesh.devices.flat[0].platform})"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Start ``jax.distributed`` when asked (explicit flags), or by auto-detection on a multi-host TPU slice, a
    multi-task Slurm job (one task per host, ``launch/slurm_gpu.sbatch``) or an Open MPI launch."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _on_multihost_tpu() or _cluster_processes() > 1:
        jax.distributed.initialize()  # cluster auto-detection (TPU metadata, Slurm or Open MPI environment)
    else:
        return
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _cluster_processes() -> int:
    """Number of processes a Slurm (``srun``) or Open MPI (``mpirun``) launch started, else 1."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit() and (var != "SLURM_NTASKS" or "SLURM_STEP_ID" in os.environ):
            return int(os.environ[var])
    return 1


def _on_multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: the leading axis over the mesh axes of the logical name ``act_batch``."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1))
    return NamedSharding(mesh, P(*spec))


def check_batch_layout(mesh: Mesh) -> None:
    """Each process feeds its own examples, so no batch shard may span processes' devices in a replicated way."""
    if jax.process_count() == 1:
        return
    spec = nn.logical_to_mesh_axes(("act_batch",))[0]
    batch_axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    replicas = math.prod(size for name, size in mesh.shape.items() if name not in batch_axes)
    if jax.local_device_count() % replicas:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: the {replicas} devices that hold the same batch shard must sit in one "
            f"process ({jax.local_device_count()} local devices); shrink the "
            f"non-batch axes {sorted(set(MESH_AXES) - set(batch_axes))}"
        )


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch → global arrays sharded over the batch axes (call inside the logical-rules context)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }


def fit_sharding(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """Drop the mesh axes of any dimension they do not divide (small models stay valid on big meshes)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, (dim, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        if dim % math.prod(sharding.mesh.shape[n] for n in names):
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def example_order(mesh: Mesh, global_batch_size: int) -> tuple[int, ...] | None:
    """Stream index of each position of a global batch assembled from per-process batches (None: identity).

    The data pipeline gives process p of n the stream elements p, p + n, …; its local row j lands at the j-th
    batch position its devices hold. So position q of process p's j-th row holds stream element j·n + p of the
    step. Call inside the logical-rules context.
    """
    n = jax.process_count()
    if n == 1:
        return None
    index_map = batch_sharding(mesh, 1).devices_indices_map((global_batch_size,))
    held: dict[int, set[int]] = {p: set() for p in range(n)}
    for device, (rows,) in index_map.items():
        start, stop, _ = rows.indices(global_batch_size)
        held[device.process_index].update(range(start, stop))
    order = np.empty(global_batch_size, np.int64)
    for p, positions in held.items():
        for j, q in enumerate(sorted(positions)):
            order[q] = j * n + p
    return tuple(int(i) for i in order)
