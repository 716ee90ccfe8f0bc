"""Pallas flash attention (``dit_jax.nn.pallas_attention``) in interpret mode on CPU: the same kernel code as on TPU,
equal to the materialised reference at the true head_dims 64, 72, 88, 128, with key masks (incl. a row with every key
masked), cross-attention with a key count that is not a multiple of the block, bf16, and gradients through the
backward kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.nn import pallas_attention as pa
from dit_jax.nn.attention import dot_product_attention

F32_TOL = 2e-6  # fp32 round-off of a different summation order
BLOCKS = dict(block_q=128, block_k=128)  # the smallest legal blocks: several of them at these token counts


def _qkv(seed, b, t, s, h, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((b, n, h, d)), dtype) for n in (t, s, s))


def _key_mask(seed, b, s):
    """(B, S) caption masks; batch row 0 masks every key (the reference then averages all keys)."""
    m = np.random.default_rng(seed).uniform(size=(b, s)) < 0.7
    m[0] = False
    return jnp.asarray(m)


def _loss(fn, d):
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))
    return lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * weights).sum()


@pytest.fixture
def no_fallback(monkeypatch):
    """The kernel itself must answer: the blockwise fallback (for masks over heads/queries) is switched off."""

    def fail(*args, **kwargs):
        raise AssertionError("pallas_attention fell back to blockwise_attention")

    monkeypatch.setattr(pa, "blockwise_attention", fail)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("d", [64, 72, 88, 128])
def test_pallas_equals_the_reference_at_true_head_dims(d, masked, no_fallback):
    b, t, h = 2, 200, 2  # 200 tokens: two query and two key blocks of 128, the last ones padded
    q, k, v = _qkv(d, b, t, t, h, d)
    mask = _key_mask(1, b, t) if masked else None
    ref = dot_product_attention(q, k, v, mask, backend="dense")  # scale: the true head_dim
    got = jax.jit(lambda q, k, v: pa.pallas_attention(q, k, v, None if mask is None else mask[:, None, None], **BLOCKS))
    np.testing.assert_allclose(got(q, k, v), ref, rtol=0, atol=F32_TOL)


def test_cross_attention_keys_not_a_multiple_of_the_block(no_fallback):
    """PixArt's caption cross-attention: S = 300 keys (3 blocks of 128, 84 padded), T ≠ S, and one key mask shared
    by the batch (1, 1, 1, S) as well as a per-example one with an all-masked row."""
    b, t, s, h, d = 2, 136, 300, 2, 72
    q, k, v = _qkv(3, b, t, s, h, d)
    for mask in (None, _key_mask(4, b, s), _key_mask(5, b, s)[1:]):
        ref = dot_product_attention(q, k, v, mask if mask is None or mask.shape[0] == b else mask.repeat(b, 0),
                                    backend="dense")  # fmt: skip
        got = pa.pallas_attention(q, k, v, None if mask is None else mask[:, None, None], **BLOCKS)
        np.testing.assert_allclose(got, ref, rtol=0, atol=F32_TOL)
    # a single block wider than the sequence, with the default block sizes
    np.testing.assert_allclose(
        pa.pallas_attention(q[:, :40], k[:, :77], v[:, :77]),
        dot_product_attention(q[:, :40], k[:, :77], v[:, :77], backend="dense"),
        rtol=0,
        atol=F32_TOL,
    )


def test_row_statistics_are_the_softmax_max_and_normaliser():
    b, t, s, h, d = 1, 136, 300, 2, 88
    q, k, v = _qkv(6, b, t, s, h, d)
    mask = _key_mask(7, 2, s)[1:]
    _, (m, norm) = pa._forward(q, k, v, mask, d**-0.5, 128, 128, True)
    assert m.shape == norm.shape == (b, h, 256) and m.dtype == norm.dtype == jnp.float32
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * d**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    np.testing.assert_allclose(m[..., :t], logits.max(-1), rtol=1e-6)
    np.testing.assert_allclose(norm[..., :t], jnp.exp(logits - logits.max(-1, keepdims=True)).sum(-1), rtol=1e-5)


def test_bf16_within_bf16_rounding_of_the_reference(no_fallback):
    """bf16 matmuls with fp32 accumulation and fp32 statistics; the probabilities are rounded to bf16 before the
    normalisation here and after it in the reference: ≤ 2 bf16 ulps of the output scale."""
    b, t, s, h, d = 2, 200, 300, 2, 72
    q, k, v = _qkv(8, b, t, s, h, d, jnp.bfloat16)
    mask = _key_mask(9, b, s)
    got = pa.pallas_attention(q, k, v, mask[:, None, None], **BLOCKS)
    assert got.dtype == jnp.bfloat16
    ref = dot_product_attention(q, k, v, mask, backend="dense").astype(jnp.float32)
    err = float(jnp.abs(got.astype(jnp.float32) - ref).max())
    assert err <= 2 * 2**-8 * float(jnp.abs(ref).max()), err


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
def test_gradients_through_the_custom_vjp(masked, no_fallback):
    b, t, s, h, d = 2, 136, 200, 2, 72
    q, k, v = _qkv(10, b, t, s, h, d)
    mask = _key_mask(11, b, s) if masked else None
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask, backend="dense")  # noqa: E731
    got = lambda q, k, v: pa.pallas_attention(q, k, v, None if mask is None else mask[:, None, None], **BLOCKS)  # noqa: E731
    g_ref = jax.grad(_loss(ref, d), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(_loss(got, d), argnums=(0, 1, 2)))(q, k, v)
    for name, a, c in zip("qkv", g_got, g_ref):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("d", [64, 88, 128])
def test_backward_kernels_equal_the_reference_at_true_head_dims(d, no_fallback):
    """The backward pass is the two Pallas kernels (dK/dV over query blocks, dQ over key blocks), not an XLA
    recomputation: their names are in the gradient's jaxpr and they equal the reference's gradients at each head_dim
    (72 is in the test above), with queries and keys padded to whole blocks and a key mask with an all-masked row."""
    b, t, s, h = 2, 200, 136, 2
    q, k, v = _qkv(20 + d, b, t, s, h, d)
    mask = _key_mask(21, b, s)
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask, backend="dense")  # noqa: E731
    got = lambda q, k, v: pa.pallas_attention(q, k, v, mask[:, None, None], **BLOCKS)  # noqa: E731
    grad = jax.grad(_loss(got, d), argnums=(0, 1, 2))
    jaxpr = str(jax.make_jaxpr(grad)(q, k, v))
    assert "dit_flash_attention_dkv" in jaxpr and "dit_flash_attention_dq" in jaxpr
    assert "scan" not in jaxpr and "while" not in jaxpr  # no XLA recomputation loop beside them
    g_ref = jax.grad(_loss(ref, d), argnums=(0, 1, 2))(q, k, v)
    for name, a, c in zip("qkv", jax.jit(grad)(q, k, v), g_ref):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5, err_msg=f"d{name}")


def test_bf16_gradients_within_bf16_rounding_of_the_reference(no_fallback):
    """bf16 inputs: the kernels' matmuls take bf16 operands with fp32 accumulation and fp32 statistics, gradients come
    back in bf16, within a few bf16 ulps of each gradient's scale of the fp32 reference's."""
    b, t, s, h, d = 1, 200, 300, 2, 72
    q, k, v = _qkv(22, b, t, s, h, d, jnp.bfloat16)
    mask = _key_mask(23, 2, s)[1:]
    got = lambda q, k, v: pa.pallas_attention(q, k, v, mask[:, None, None], **BLOCKS)  # noqa: E731
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask, backend="dense")  # noqa: E731
    grads = jax.jit(jax.grad(_loss(got, d), argnums=(0, 1, 2)))(q, k, v)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    for name, a, c in zip("qkv", grads, jax.grad(_loss(ref, d), argnums=(0, 1, 2))(*f32)):
        assert a.dtype == jnp.bfloat16
        err = float(jnp.abs(a.astype(jnp.float32) - c).max())
        assert err <= 4 * 2**-8 * float(jnp.abs(c).max()), (name, err)


def test_lowered_for_a_tpu_the_kernels_are_mosaic_custom_calls():
    """``interpret=None`` decides at lowering: exported for a TPU (``jax.export``, no TPU or libtpu needed) the
    forward and both backward kernels are Mosaic custom calls (so ``dit_jax.plan --topology`` compiles the real
    kernels on a CPU host); lowered for the CPU they are interpreted (no custom call)."""
    from jax import export

    b, t, s, h, d = 1, 256, 384, 2, 72
    q, k, v = _qkv(24, b, t, s, h, d, jnp.bfloat16)
    mask = _key_mask(25, b, s)[:, None, None]
    grad = jax.jit(jax.grad(_loss(lambda q, k, v: pa.pallas_attention(q, k, v, mask, **BLOCKS), d), argnums=(0, 1, 2)))
    tpu = export.export(grad, platforms=["tpu"])(q, k, v).mlir_module()
    assert tpu.count("tpu_custom_call") == 3, tpu.count("tpu_custom_call")
    for name in ("dit_flash_attention", "dit_flash_attention_dkv", "dit_flash_attention_dq"):
        assert f'"{name}"' in tpu or f"{name}" in tpu
    cpu = export.export(grad, platforms=["cpu"])(q, k, v).mlir_module()
    assert "tpu_custom_call" not in cpu


def test_a_mask_over_queries_falls_back_to_blockwise():
    b, t, s, h, d = 1, 40, 50, 2, 64
    q, k, v = _qkv(12, b, t, s, h, d)
    mask = jnp.asarray(np.random.default_rng(13).uniform(size=(b, h, t, s)) < 0.6)
    np.testing.assert_allclose(
        pa.pallas_attention(q, k, v, mask), dot_product_attention(q, k, v, mask, backend="dense"), rtol=0, atol=F32_TOL
    )


def test_block_sizes_are_validated():
    q, k, v = _qkv(14, 1, 8, 8, 1, 8)
    with pytest.raises(ValueError, match="multiples of 128"):
        pa.pallas_attention(q, k, v, block_q=100)
    with pytest.raises(ValueError, match="multiples of 128"):
        pa.pallas_attention(q, k, v, block_k=64)


def test_under_a_mesh_each_device_runs_the_kernel_on_its_batch_and_heads(no_fallback):
    """XLA cannot partition a Mosaic kernel: under a mesh the call runs in shard_map, batch split as ``act_batch``
    and heads as ``act_heads``, equal to the unsharded reference forward and backward."""
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "sequence", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = [("act_batch", "data"), ("act_length", "sequence"), ("act_heads", "tensor")]
    b, t, s, h, d = 2, 136, 200, 2, 72
    q, k, v = _qkv(15, b, t, s, h, d)
    mask = _key_mask(16, b, s)
    got = lambda q, k, v: pa.pallas_attention(q, k, v, mask[:, None, None], **BLOCKS)  # noqa: E731
    ref = lambda q, k, v: dot_product_attention(q, k, v, mask, backend="dense")  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert "shard_map" in str(jax.make_jaxpr(got)(q, k, v))
        sharded = jax.device_put((q, k, v), NamedSharding(mesh, P("data", None, "tensor", None)))
        out = jax.jit(got)(*sharded)
        grads = jax.jit(jax.grad(_loss(got, d), argnums=(0, 1, 2)))(*sharded)
    np.testing.assert_allclose(out, ref(q, k, v), rtol=0, atol=F32_TOL)
    for name, a, c in zip("qkv", grads, jax.grad(_loss(ref, d), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5, err_msg=f"d{name}")
