"""The C++ flash-attention kernel for XLA:CPU (``dit_jax.nn.cpu_attention``): built with the host's compiler, equal to
a float64 reference at every head_dim path (half-vector remainders, grouped P·V tiles), with key masks (incl. a row
with every key masked), cross-attention and lengths that fill no block; gradients through the kernel's row
statistics; the fallbacks; one clear error when it cannot be built; the command that builds it ahead of time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.nn import attention as attn_lib
from dit_jax.nn import cpu_attention as ca
from dit_jax.nn.attention import dot_product_attention

pytestmark = pytest.mark.skipif(not ca.available(), reason="no C++ compiler for the CPU attention kernel")


def _qkv(seed, b, t, s, h, d, dtype=jnp.float32, spread=2.0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(spread * r.standard_normal((b, n, h, d)), dtype) for n in (t, s, s))


def _key_mask(seed, b, s):
    """(B, S) caption masks; batch row 0 masks every key (the reference then averages all keys)."""
    m = np.random.default_rng(seed).uniform(size=(b, s)) < 0.7
    m[0] = False
    return jnp.asarray(m)


def _reference(q, k, v, mask, scale):
    """softmax(q kᵀ · scale) v in float64 with the dense path's mask convention (finfo(float32).min)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if mask is not None:
        logits = np.where(np.asarray(mask)[:, None, None, :], logits, np.finfo(np.float32).min)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _assert_as_exact_as_dense(out, q, k, v, mask, scale, what=""):
    """The kernel's error against float64 is within 4× that of the fp32 materialised (dense) path: fp32 round-off."""
    want = _reference(q, k, v, mask, scale)
    dense = dot_product_attention(q, k, v, mask, backend="dense", scale=scale)
    err, dense_err = np.abs(out - want).max(), np.abs(np.asarray(dense, np.float64) - want).max()
    assert err < max(4 * dense_err, 1e-6), (what, err, dense_err)


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


# head_dim paths: half vector only (8), 2 whole + half (40), 4 whole (64), 4 + half (72, DiT/PixArt), 5 + half
# (88, Hunyuan), 3 + 3 (96), 4 + 4 (128, Flux/Wan/SD3.5), padded to whole vectors (12, 100)
@pytest.mark.parametrize("d", [8, 12, 40, 64, 72, 88, 96, 100, 128])
def test_kernel_equals_the_float64_reference_at_each_head_dim(d):
    b, t, s, h = 2, 131, 300, 3  # no length fills a block: partial query and key blocks, a padded key tile
    q, k, v = _qkv(d, b, t, s, h, d)
    mask = _key_mask(d + 1, b, s)
    for m in (None, mask):
        out = jax.jit(lambda q, k, v, m=m: ca.cpu_attention(q, k, v, None if m is None else m[:, None, None]))(q, k, v)
        _assert_as_exact_as_dense(out, q, k, v, m, d**-0.5, f"head_dim {d}, mask {m is not None}")
    assert "dit_jax_cpu_attention" in _hlo(lambda q, k, v: ca.cpu_attention(q, k, v), q, k, v)


def test_cross_attention_single_key_single_query_and_explicit_scale():
    for t, s in ((1, 77), (257, 1), (1, 1), (600, 64)):
        q, k, v = _qkv(t + s, 1, t, s, 2, 72)
        out = ca.cpu_attention(q, k, v, scale=0.05)
        _assert_as_exact_as_dense(out, q, k, v, None, 0.05, f"{t} queries × {s} keys")


def test_bf16_inputs_run_in_fp32_and_come_back_bf16():
    q, k, v = _qkv(3, 2, 200, 120, 2, 72, jnp.bfloat16)
    out = ca.cpu_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = _reference(q, k, v, None, 72**-0.5)  # of the same bf16 inputs
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0, atol=2e-2)  # one bf16 rounding of |out|≤4
    np.testing.assert_array_equal(out, ca.cpu_attention(*(x.astype(jnp.float32) for x in (q, k, v))).astype(out.dtype))


def test_gradients_equal_the_dense_reference_through_the_kernel_statistics():
    b, t, s, h, d = 2, 150, 90, 2, 72
    q, k, v = _qkv(5, b, t, s, h, d, spread=1.0)
    mask = _key_mask(6, b, s)[:, None, None]
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))
    loss = lambda fn: lambda q, k, v: (fn(q, k, v, mask) * weights).sum()  # noqa: E731
    got = jax.jit(jax.grad(loss(ca.cpu_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v, m: dot_product_attention(q, k, v, m, backend="dense")), argnums=(0, 1, 2))
    for name, a, c in zip("qkv", got, ref(q, k, v)):
        np.testing.assert_allclose(a, c, rtol=0, atol=2e-5, err_msg=f"d{name}")
    # the backward pass reuses the kernel's statistics: one kernel call, no second (blockwise) forward
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(ca.cpu_attention)))(q, k, v))
    assert jaxpr.count("dit_jax_cpu_attention") == 1


def test_auto_takes_the_kernel_on_cpu_and_the_model_layers_use_it():
    q, k, v = _qkv(7, 1, 64, 64, 2, 72)
    assert attn_lib._auto_backend(q) == "cpu"
    assert "dit_jax_cpu_attention" in _hlo(lambda q, k, v: dot_product_attention(q, k, v), q, k, v)
    _assert_as_exact_as_dense(dot_product_attention(q, k, v), q, k, v, None, 72**-0.5)


def test_shapes_the_kernel_does_not_take_run_blockwise():
    q, k, v = _qkv(8, 1, 40, 40, 2, 160)  # head_dim above 128
    assert "dit_jax_cpu_attention" not in _hlo(lambda q, k, v: ca.cpu_attention(q, k, v), q, k, v)
    _assert_as_exact_as_dense(ca.cpu_attention(q, k, v), q, k, v, None, 160**-0.5)
    q, k, v = _qkv(9, 1, 40, 40, 2, 72)
    causal = jnp.tril(jnp.ones((40, 40), bool))[None, None]  # a mask over queries
    assert "dit_jax_cpu_attention" not in _hlo(lambda q, k, v: ca.cpu_attention(q, k, v, causal), q, k, v)
    want = dot_product_attention(q, k, v, causal, backend="dense")
    np.testing.assert_allclose(ca.cpu_attention(q, k, v, causal), want, rtol=0, atol=1e-5)


def test_vmap_and_a_mesh_give_the_unbatched_unsharded_result():
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    q, k, v = _qkv(10, 4, 70, 50, 4, 64)
    mask = _key_mask(11, 4, 50)
    want = ca.cpu_attention(q, k, v, mask[:, None, None])
    per_item = jax.vmap(lambda q, k, v, m: ca.cpu_attention(q[None], k[None], v[None], m[None, None, None])[0])
    np.testing.assert_allclose(per_item(q, k, v, mask), want, rtol=0, atol=1e-6)
    mesh = jax.make_mesh((2, 2, 2), ("data", "sequence", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = [("act_batch", "data"), ("act_heads", "tensor")]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.device_put((q, k, v), NamedSharding(mesh, P("data", None, "tensor", None)))
        out = jax.jit(lambda q, k, v: ca.cpu_attention(q, k, v, mask[:, None, None]))(*sharded)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_lowered_for_another_platform_it_is_the_blockwise_path():
    q, k, v = _qkv(12, 1, 64, 64, 2, 72)
    fn = jax.jit(lambda q, k, v: ca.cpu_attention(q, k, v))
    assert "dit_jax_cpu_attention" in fn.lower(q, k, v).as_text()
    cuda = jax.export.export(fn, platforms=["cuda"])(q, k, v)  # no GPU needed to lower for one
    assert "dit_jax_cpu_attention" not in cuda.mlir_module()


def test_unavailable_kernel_is_one_clear_error_and_auto_keeps_xla(monkeypatch):
    monkeypatch.setattr(ca, "_state", {"reason": "disabled by DIT_JAX_CPU_KERNEL"})
    q, k, v = _qkv(13, 1, 16, 16, 2, 72)
    with pytest.raises(NotImplementedError, match="DIT_JAX_CPU_KERNEL"):
        dot_product_attention(q, k, v, backend="cpu")
    assert attn_lib._auto_backend(q) == "xla"
    np.testing.assert_array_equal(dot_product_attention(q, k, v), dot_product_attention(q, k, v, backend="xla"))


def test_a_failing_compiler_is_reported_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "c++ -DDIT_JAX_NO_SUCH_FLAG=1 -fno-such-option")
    with pytest.raises(RuntimeError, match="(?s)C\\+\\+ compiler failed.*no-such-option"):
        ca._build()
    assert not list((tmp_path / "kernels").glob("*.so"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="could not run the C\\+\\+ compiler"):
        ca._build()


def _prebuild(tmp_path, **env):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIT_JAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu", **env}
    cmd = [sys.executable, "-m", "dit_jax.nn.cpu_attention"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_prebuild_command_builds_into_the_cache_and_checks_the_kernel(tmp_path):
    proc = _prebuild(tmp_path)
    assert proc.returncode == 0, proc.stderr
    built = list((tmp_path / "kernels").glob("cpu_attention-*.so"))
    assert len(built) == 1 and proc.stdout.splitlines()[0] == str(built[0])
    assert "checked against the reference attention" in proc.stdout
    from dit_jax.nn import cpu_dense

    if cpu_dense.available():  # the dense-layer kernel is built and checked by the same command
        assert len(list((tmp_path / "kernels").glob("cpu_dense-*.so"))) == 1
        assert "checked against XLA's dot" in proc.stdout
    again = _prebuild(tmp_path)  # found in the cache: nothing compiled the second time
    assert again.returncode == 0 and "compiling" not in again.stderr and again.stdout == proc.stdout


def test_prebuild_command_fails_with_the_reason(tmp_path):
    proc = _prebuild(tmp_path, DIT_JAX_CPU_KERNEL="0")
    assert proc.returncode == 1 and "disabled by DIT_JAX_CPU_KERNEL" in proc.stderr
    assert not (tmp_path / "kernels").exists()
