"""CAME (Luo et al., 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization") as optax transforms.

Per parameter G with at least two dimensions (factored over the last two, rows r and columns c):
  r_t = β2·r + (1−β2)·mean_cols(G² + ε1),   c_t = β2·c + (1−β2)·mean_rows(G² + ε1)
  v_t = r_t c_tᵀ / mean(r_t),   u_t = G / sqrt(v_t),   û_t = u_t / max(1, RMS(u_t) / d)
  m_t = β1·m + (1−β1)·û_t
  U_t = (û_t − m_t)² + ε2   (instability)
  R_t = β3·R + (1−β3)·mean_cols(U_t),   C_t = β3·C + (1−β3)·mean_rows(U_t),   S_t = R_t C_tᵀ / mean(R_t)
  update = m_t / sqrt(S_t)
Vectors keep an unfactored v_t and use m_t as the update (no confidence term), as in the authors' code. Means
instead of the paper's sums give the same v_t and S_t. There is no bias correction.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByCameState(NamedTuple):
    """Moments: ``mu`` (full), row/column second moments, unfactored ``v``, row/column instability moments.

    Leaves a parameter does not need are 0-d placeholders.
    """

    count: jax.Array
    mu: Any
    v_row: Any
    v_col: Any
    v: Any
    res_row: Any
    res_col: Any


def _factored(p) -> bool:
    return p.ndim >= 2


def _placeholder():
    return jnp.zeros((), jnp.float32)


def _approx_inv_sqrt(row: jax.Array, col: jax.Array) -> jax.Array:
    """1 / sqrt(row colᵀ / mean(row)) for factored statistics of a (..., n, m) tensor."""
    r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., :, None]
    return r * jax.lax.rsqrt(col)[..., None, :]


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
    """The CAME update direction (multiply by −lr, e.g. with ``optax.scale_by_learning_rate``)."""

    def init_fn(params):
        def row(p):
            return jnp.zeros(p.shape[:-1], jnp.float32) if _factored(p) else _placeholder()

        def col(p):
            return jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32) if _factored(p) else _placeholder()

        def full_if_vector(p):
            return _placeholder() if _factored(p) else jnp.zeros(p.shape, jnp.float32)

        return ScaleByCameState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            v_row=jax.tree.map(row, params),
            v_col=jax.tree.map(col, params),
            v=jax.tree.map(full_if_vector, params),
            res_row=jax.tree.map(row, params),
            res_col=jax.tree.map(col, params),
        )

    def update_one(g, mu, v_row, v_col, v, res_row, res_col):
        g = g.astype(jnp.float32)
        g2 = jnp.square(g) + eps1
        if g.ndim >= 2:
            v_row = b2 * v_row + (1 - b2) * jnp.mean(g2, axis=-1)
            v_col = b2 * v_col + (1 - b2) * jnp.mean(g2, axis=-2)
            u = g * _approx_inv_sqrt(v_row, v_col)
        else:
            v = b2 * v + (1 - b2) * g2
            u = g * jax.lax.rsqrt(v)
        rms = jnp.sqrt(jnp.mean(jnp.square(u)))
        u = u / jnp.maximum(1.0, rms / clip_threshold)
        mu = b1 * mu + (1 - b1) * u
        if g.ndim >= 2:
            res = jnp.square(u - mu) + eps2
            res_row = b3 * res_row + (1 - b3) * jnp.mean(res, axis=-1)
            res_col = b3 * res_col + (1 - b3) * jnp.mean(res, axis=-2)
            out = mu * _approx_inv_sqrt(res_row, res_col)
        else:
            out = mu
        return out, (mu, v_row, v_col, v, res_row, res_col)

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        leaves = [
            treedef.flatten_up_to(t)
            for t in (updates, state.mu, state.v_row, state.v_col, state.v, state.res_row, state.res_col)
        ]
        results = [update_one(*args) for args in zip(*leaves)]
        out = treedef.unflatten([r[0] for r in results])
        fields = [treedef.unflatten([r[1][i] for r in results]) for i in range(6)]
        return out, ScaleByCameState(optax.safe_increment(state.count), *fields)

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """CAME with decoupled weight decay: ``p ← p − lr·(update + weight_decay·p)`` (the authors' PyTorch step)."""
    return optax.chain(
        scale_by_came(b1, b2, b3, eps1, eps2, clip_threshold),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
