"""What the hand-written attention kernels share (``pallas_attention`` for TPU, ``cpu_attention`` for XLA:CPU): the
checks on their inputs, the key row of a mask, and running a kernel XLA cannot partition on each device's part."""

import math

import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


def check_qkv(name: str, q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """q (B, T, H, D) and k, v (B, S, H, D), or one ValueError naming the kernel and the shapes."""
    if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"{name}: expected q (B, T, H, D) and k, v (B, S, H, D), got {q.shape}, {k.shape}, {v.shape}")


def attention_mask(name: str, mask: jax.Array | None) -> jax.Array | None:
    """A mask broadcastable to (B, H, T, S) as a 4-d bool array without gradient (None stays None)."""
    if mask is None:
        return None
    mask = jax.numpy.asarray(mask).astype(bool)
    if mask.ndim > 4:
        raise ValueError(f"{name}: mask must broadcast to (B, H, T, S), got shape {mask.shape}")
    return jax.lax.stop_gradient(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))


def key_mask_row(mask: jax.Array) -> jax.Array | None:
    """The (B|1, S) key row of a 4-d mask, or None when it varies over heads or queries."""
    if mask.shape[1] == 1 and mask.shape[2] == 1:
        return mask[:, 0, 0, :]
    return None


def _logical_axes(name: str, auto: list[str], mesh, size: int) -> tuple[str, ...] | None:
    """The automatic mesh axes that the logical ``name`` maps to under the rules in context, if they divide ``size``."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        return None
    axes = nn.logical_to_mesh_axes((name,), rules)[0]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in auto)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def per_device(fn, q, k, v, key_mask):
    """``fn(q, k, v, key_mask)`` on each device's part. XLA cannot partition a custom kernel, so under a mesh with
    automatic axes it runs inside ``shard_map`` over all of them: batch split as ``act_batch`` and heads as
    ``act_heads`` (under the logical rules in context, where they divide), every other axis replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, key_mask)
    auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual]
    if not auto:
        return fn(q, k, v, key_mask)
    batch = _logical_axes("act_batch", auto, mesh, q.shape[0])
    heads = _logical_axes("act_heads", auto, mesh, q.shape[2])
    spec = P(batch, None, heads, None)
    mask_spec = None if key_mask is None else P(batch if key_mask.shape[0] > 1 else None, None)
    return jax.shard_map(
        fn, in_specs=(spec, spec, spec, mask_spec), out_specs=spec, axis_names=set(auto), check_vma=False
    )(q, k, v, key_mask)
