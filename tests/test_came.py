"""CAME against a float64 numpy reference written from the paper's Algorithm 1 (row/column sums, not means)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dit_jax.train.came import came

B1, B2, B3, EPS1, EPS2, D = 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0


def rms(x):
    return np.sqrt(np.mean(x**2))


class PaperCame:
    """Luo et al. 2023, Algorithm 1 for one parameter; vectors keep an unfactored v and skip the confidence term."""

    def __init__(self, shape, lr, weight_decay):
        self.lr, self.wd = lr, weight_decay
        self.factored = len(shape) >= 2
        self.m = np.zeros(shape)
        if self.factored:
            self.r = np.zeros(shape[:-1])
            self.c = np.zeros(shape[:-2] + shape[-1:])
            self.R = np.zeros(shape[:-1])
            self.C = np.zeros(shape[:-2] + shape[-1:])
        else:
            self.v = np.zeros(shape)

    def step(self, theta, g):
        g2 = g**2 + EPS1
        if self.factored:
            self.r = B2 * self.r + (1 - B2) * g2.sum(-1)  # (G² + ε1) 1_m
            self.c = B2 * self.c + (1 - B2) * g2.sum(-2)  # 1_nᵀ (G² + ε1)
            v = self.r[..., :, None] * self.c[..., None, :] / self.r.sum(-1)[..., None, None]  # r cᵀ / (1ᵀ r)
        else:
            self.v = B2 * self.v + (1 - B2) * g2
            v = self.v
        u = g / np.sqrt(v)
        u = u / max(1.0, rms(u) / D)
        self.m = B1 * self.m + (1 - B1) * u
        if self.factored:
            U = (u - self.m) ** 2 + EPS2
            self.R = B3 * self.R + (1 - B3) * U.sum(-1)
            self.C = B3 * self.C + (1 - B3) * U.sum(-2)
            S = self.R[..., :, None] * self.C[..., None, :] / self.R.sum(-1)[..., None, None]
            update = self.m / np.sqrt(S)
        else:
            update = self.m
        return theta - self.lr * update - self.lr * self.wd * theta


@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_came_matches_the_paper_update_rule(weight_decay):
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "b": (5,), "conv": (2, 3, 4, 7)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    lr = 1e-2
    tx = came(lr, b1=B1, b2=B2, b3=B3, eps1=EPS1, eps2=EPS2, clip_threshold=D, weight_decay=weight_decay)
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(jparams)
    refs = {k: PaperCame(s, lr, weight_decay) for k, s in shapes.items()}
    ref_params = dict(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        grads = {k: rng.normal(size=s) * rng.uniform(0.1, 3.0) for k, s in shapes.items()}
        updates, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        ref_params = {k: refs[k].step(ref_params[k], grads[k]) for k in shapes}
    for k in shapes:
        np.testing.assert_allclose(np.asarray(jparams[k]), ref_params[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # the factored statistics really are factored: O(n + m) memory for a matrix
    assert state[0].v_row["w"].shape == (6,) and state[0].v_col["w"].shape == (5,)
    assert state[0].v["w"].shape == ()
