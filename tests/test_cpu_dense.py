"""The BLAS dense-layer kernel for XLA:CPU (``dit_jax.nn.cpu_dense``): equal to a float64 reference for every
transpose and for outputs cut into row or column slabs (sizes that fill no slab evenly, a single row, K = 0), through
``Dense`` with several input and output axes, and in gradients; the ``dots`` remat policies still save its products;
a whole PixArt forward and gradient on it equal XLA's; where it stays out (bf16, small products, a sharding mesh,
another platform, unavailable); numpy's own OpenBLAS keeps its threads."""

import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import PIXART, pixart_inputs, random_params

from dit_jax import models
from dit_jax.nn import cpu_dense as cd
from dit_jax.nn.layers import Dense

pytestmark = pytest.mark.skipif(not cd.available(), reason=f"no CPU dense kernel here: {cd._state.get('reason')}")

KERNEL = "dit_jax_cpu_dense"


def _rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _assert_as_exact_as_xla(got, a, b, trans_a, trans_b):
    """The kernel's error against float64 is within 4× that of XLA's fp32 dot: fp32 round-off."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    xla = cd._xla_product(a, b, trans_a, trans_b)
    err, xla_err = np.abs(np.asarray(got) - want).max(), np.abs(np.asarray(xla, np.float64) - want).max()
    assert got.shape == want.shape and err <= max(4 * xla_err, 1e-6), (err, xla_err)


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


# (M, K, N): rows split (M ≥ N), columns split (N > M), slabs that do not divide evenly, one row, K = 0
@pytest.mark.parametrize("m,k,n", [(200, 48, 72), (40, 96, 300), (97, 33, 65), (1, 64, 80), (70, 0, 50)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_products_equal_the_float64_reference(m, k, n, trans_a, trans_b):
    a = _rand(1, *((k, m) if trans_a else (m, k)))
    b = _rand(2, *((n, k) if trans_b else (k, n)))
    got = jax.jit(cd._product, static_argnums=(2, 3))(a, b, trans_a, trans_b)
    _assert_as_exact_as_xla(got, a, b, trans_a, trans_b)


def test_dense_layer_with_several_axes_and_its_gradients_equal_xla(monkeypatch):
    """x (B, T, H, D) contracted over (H, D) into (F, G), as attention output projections do; gradients too."""
    x = _rand(3, 2, 300, 4, 16)  # 4.6M multiply-adds: above the threshold
    layer = Dense(features=(6, 20), names=(None,) * 4, axis=(-2, -1))
    params = layer.init(jax.random.key(0), x)

    def loss(p, x):
        return jnp.sum(jnp.sin(layer.apply(p, x)))

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert KERNEL in jax.jit(layer.apply).lower(params, x).as_text()
    (value, grads) = run(params, x)
    monkeypatch.setattr(cd, "_state", {"reason": "off for the reference"})
    assert KERNEL not in jax.jit(layer.apply).lower(params, x).as_text()
    (want_value, want_grads) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy,calls", [("dots", 3), ("dots_no_batch", 3), ("full", 4)])
def test_dots_remat_policies_keep_saving_the_kernel_products(policy, calls):
    """One forward product and two backward ones (dx, dW) under the dots policies; ``full`` recomputes the forward."""
    from dit_jax.nn.stack import REMAT_POLICIES

    x, w = _rand(4, 64, 96), _rand(5, 96, 80)
    block = jax.checkpoint(lambda x, w: jnp.tanh(cd.matmul(x, w)), policy=REMAT_POLICIES[policy])
    hlo = _hlo(jax.value_and_grad(lambda x, w: jnp.sum(block(x, w)), argnums=(0, 1)), x, w)
    assert hlo.count(f"@{KERNEL}(") == calls


def test_a_pixart_forward_and_gradient_on_the_kernel_equal_xla(monkeypatch):
    monkeypatch.setattr(cd, "MIN_MACS", 0)  # the tiny model's products are all below the thresholds
    monkeypatch.setattr(cd, "MIN_ROWS", 0)
    params = random_params(PIXART, 7)
    x, t, caption, mask, res, aspect = (jnp.asarray(a) for a in pixart_inputs())
    model = models.build(PIXART)

    def loss(p):
        out = model.apply({"params": p}, x, t, caption, mask, res, aspect)
        return jnp.mean(jnp.square(out)), out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    assert KERNEL in jax.jit(run).lower(params).as_text()
    (_, out), grads = run(params)
    monkeypatch.setattr(cd, "_state", {"reason": "off for the reference"})
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * max(float(jnp.abs(ref).max()), 1e-3))


def test_where_the_kernel_stays_out():
    x, w = _rand(6, 2, 512, 96), _rand(7, 96, 128)  # 12.6M multiply-adds: above the threshold
    product = lambda x, w: cd.dense_product(x, w, (2,))  # noqa: E731
    assert KERNEL in _hlo(product, x, w)
    assert KERNEL not in _hlo(product, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # not fp32
    assert KERNEL not in _hlo(product, x[:, :16], w)  # below MIN_MACS
    assert KERNEL not in _hlo(product, x[:1, :256], jnp.tile(w, (1, 4)))  # 12.6M multiply-adds but below MIN_ROWS
    assert KERNEL not in _hlo(lambda x, w: cd.dense_product(x, w[:2], (0,)), x, w)  # not the trailing axes
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):  # XLA partitions its own dot, never a custom call
        assert KERNEL not in _hlo(product, x, w)
    one = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        assert KERNEL in _hlo(product, x, w)
    cuda = jax.export.export(jax.jit(product), platforms=["cuda"])(x, w)  # no GPU needed to lower for one
    assert KERNEL not in cuda.mlir_module()
    np.testing.assert_allclose(jax.jit(product)(x, w), jnp.einsum("btk,kn->btn", x, w), rtol=1e-5, atol=1e-4)


def test_vmap_gives_the_unbatched_result():
    x, w = _rand(8, 3, 40, 24), _rand(9, 3, 24, 56)
    got = jax.jit(jax.vmap(cd.matmul))(x, w)
    np.testing.assert_allclose(got, jnp.einsum("bmk,bkn->bmn", x, w), rtol=1e-5, atol=1e-5)


def test_unavailable_kernel_keeps_xla(monkeypatch):
    monkeypatch.setattr(cd, "_state", {"reason": "disabled by DIT_JAX_CPU_DENSE"})
    x, w = _rand(10, 2, 512, 96), _rand(11, 96, 128)
    assert not cd.available() and "DIT_JAX_CPU_DENSE" in cd.describe()
    assert KERNEL not in _hlo(lambda x, w: cd.dense_product(x, w, (2,)), x, w)


def test_numpy_keeps_its_own_openblas_threads():
    """The kernel's BLAS is a private copy set to one thread; numpy's own instance keeps its threads."""
    threads = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads")
    shared, private = ctypes.CDLL(str(cd._state["blas"])), ctypes.CDLL(str(cd._state["blas_copy"]))
    get_shared = next(getattr(shared, s) for s in threads if hasattr(shared, s))
    get_private = next(getattr(private, s) for s in threads if hasattr(private, s))
    jax.block_until_ready(jax.jit(cd.matmul)(_rand(12, 256, 256), _rand(13, 256, 256)))
    assert get_private() == 1
    if (os.cpu_count() or 1) > 1 and not os.environ.get("OPENBLAS_NUM_THREADS"):
        assert get_shared() > 1
