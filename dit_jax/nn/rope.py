"""Rotary position embedding (RoPE) over N position axes, with interleaved rotation pairs.

Each token has integer position ids ``(n_axes,)`` (Flux: ``(0, row, col)``; a video DiT: ``(frame, row, col)``).
Axis ``a`` owns ``axes_dims[a]`` channels of the head: ``axes_dims[a] / 2`` frequencies
``omega = 1 / theta ** (arange(0, d, 2) / d)``, and the angles ``id_a · omega`` of all axes are concatenated, so
``sum(axes_dims)`` is the head dim (Flux: 16 + 56 + 56 = 128). Channel pairs ``(x[2i], x[2i+1])`` are rotated by
angle ``i`` (BFL's ``apply_rope`` and diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1)``; not the
"rotate half" layout of GPT-NeoX/Llama).

The angles are host constants computed in float64 with numpy, then cos/sin are cast to float32, as diffusers'
``FluxPosEmbed`` (BFL's ``rope`` takes the ids' dtype; the two models agree to 2.9e-6, MODELS.md §4.1). The rotation
itself runs in float32 and is cast back to the input dtype. Axis dims and theta are arguments, so the same functions
serve other RoPE models (video DiTs: ids ``(frame, row, col)``).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(
    ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 of shape ``(..., L, sum(axes_dims) // 2)`` for integer position ``ids (..., L, n_axes)``.

    Entry ``i`` of the last axis is the angle of rotation pair ``(x[2i], x[2i+1])``; the pairs of axis 0 come first.
    """
    ids = np.asarray(ids)
    if ids.ndim < 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(
            f"RoPE position ids of shape {ids.shape} do not match {len(axes_dims)} axes {tuple(axes_dims)}"
        )
    odd = [d for d in axes_dims if d % 2 or d <= 0]
    if odd:
        raise ValueError(f"RoPE axis dims must be positive and even, got {tuple(axes_dims)}")
    angles = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        angles.append(ids[..., a : a + 1].astype(np.float64) * omega)  # (..., L, d/2)
    angle = np.concatenate(angles, axis=-1)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def grid_ids(sizes: Sequence[int], leading: Sequence[int] = ()) -> np.ndarray:
    """Integer ids ``(prod(sizes), len(leading) + len(sizes))`` of a row-major grid: the constant ``leading`` ids
    then each grid coordinate (Flux image tokens: ``grid_ids((h, w), leading=(0,))`` → ``(0, row, col)``)."""
    coords = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
    grid = np.stack([c.reshape(-1) for c in coords], axis=-1)
    lead = np.broadcast_to(np.asarray(leading, grid.dtype), (grid.shape[0], len(leading)))
    return np.concatenate([lead, grid], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the interleaved channel pairs of ``x (B, L, H, D)`` by the angles of ``cos``/``sin`` ``(L, D/2)`` (or
    ``(B, L, D/2)``): ``out[2i] = x[2i]·cos_i − x[2i+1]·sin_i``, ``out[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i``.
    Computed in float32, returned in ``x.dtype``."""
    *lead, d = x.shape
    if cos.shape[-1] * 2 != d:
        raise ValueError(f"RoPE angles for {cos.shape[-1] * 2} channels, but the heads have {d}")
    pairs = x.astype(jnp.float32).reshape(*lead, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = jnp.asarray(cos, jnp.float32)[..., None, :]  # broadcast over heads
    s = jnp.asarray(sin, jnp.float32)[..., None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
