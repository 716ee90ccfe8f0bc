"""Device meshes, logical-axis sharding rules and multi-host helpers."""

from dit_jax.parallel.mesh import (
    batch_sharding,
    create_mesh,
    global_batch,
    initialize_distributed,
    resolve_mesh_shape,
)
from dit_jax.parallel.rules import DEFAULT_RULES, logical_rules

__all__ = [
    "DEFAULT_RULES",
    "batch_sharding",
    "create_mesh",
    "global_batch",
    "initialize_distributed",
    "logical_rules",
    "resolve_mesh_shape",
]
