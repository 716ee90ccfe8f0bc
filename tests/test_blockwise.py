"""Blockwise (online-softmax) attention: equal to the materialised reference, forward and backward, with masks,
cross-attention, KV-compressed keys and chunks that do not divide the sequence; memory linear in the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.nn import attention
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.blockwise import blockwise_attention

F32_TOL = 2e-6  # fp32 round-off of a different summation order


def _qkv(seed, b, t, s, h, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((b, n, h, d)), dtype) for n in (t, s, s))


def _mask(kind, seed, b, h, t, s):
    r = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "key":  # (B, S) caption masks; batch row 0 masks every key (the reference averages all keys)
        m = r.uniform(size=(b, s)) < 0.7
        m[0] = False
        return jnp.asarray(m)
    if kind == "full":
        return jnp.asarray(r.uniform(size=(b, h, t, s)) < 0.6)
    return jnp.asarray(r.uniform(size=(t, s)) < 0.6)  # broadcast over batch and heads


def _loss(fn, d):
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))
    return lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * weights).sum()


CASES = [  # (b, t, s, h, d, mask, q_chunk, kv_chunk)
    (2, 37, 37, 3, 8, None, 8, 8),  # self-attention, chunks that do not divide the tokens
    (2, 37, 29, 3, 8, "key", 8, 16),  # cross-attention with caption masks
    (2, 37, 29, 3, 8, "full", 16, 8),  # full (B, H, T, S) mask
    (1, 40, 40, 2, 16, "grid", 32, 7),  # a (T, S) mask broadcast over batch and heads
    (1, 64, 16, 2, 72, None, 16, 8),  # KV-compressed keys (S = T / 4), PixArt's head_dim 72
    (1, 50, 7, 2, 16, "key", 1024, 512),  # one block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}-{c[5]}-{c[6]}x{c[7]}")
def test_blockwise_equals_the_materialised_reference(case):
    b, t, s, h, d, kind, qc, kc = case
    q, k, v = _qkv(0, b, t, s, h, d)
    mask = _mask(kind, 1, b, h, t, s)
    scale = d**-0.5
    # dot_product_attention reads a 2-D mask as (B, S) key padding; blockwise_attention as (T, S) (numpy broadcasting)
    ref_mask = mask[None, None] if kind == "grid" else mask
    got_mask = mask[:, None, None, :] if kind == "key" else mask
    ref = lambda q, k, v: dot_product_attention(q, k, v, ref_mask, backend="dense", scale=scale)  # noqa: E731
    got = lambda q, k, v: blockwise_attention(q, k, v, got_mask, scale, q_chunk=qc, kv_chunk=kc)  # noqa: E731
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=0, atol=F32_TOL)
    g_ref = jax.grad(_loss(ref, d), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(_loss(got, d), argnums=(0, 1, 2)))(q, k, v)
    for name, a, c in zip("qkv", g_got, g_ref):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5, err_msg=f"d{name}")


def test_blockwise_bf16_within_bf16_rounding_of_the_reference():
    """bf16 inputs: both paths multiply in bf16 with fp32 accumulation and keep fp32 softmax statistics; they differ
    by where the probabilities are rounded to bf16 (per block here, once there): ≤ 2 bf16 ulps of the output scale."""
    q, k, v = _qkv(2, 1, 96, 96, 2, 32, jnp.bfloat16)
    ref = dot_product_attention(q, k, v, backend="dense").astype(jnp.float32)
    got = blockwise_attention(q, k, v, q_chunk=32, kv_chunk=16).astype(jnp.float32)
    assert got.dtype == ref.dtype
    err = float(jnp.abs(got - ref).max())
    assert err <= 2 * 2**-8 * float(jnp.abs(ref).max()), err


def test_the_xla_backend_goes_blockwise_above_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a: calls.append(a[0].shape) or a[0])
    q, k, v = _qkv(3, 1, 32, 32, 1, 8)
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_LOGITS", 32 * 32 + 1)
    dot_product_attention(q, k, v, backend="xla")
    assert calls == []
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_LOGITS", 32 * 32)
    dot_product_attention(q, k, v, backend="xla")
    assert calls == [(1, 32, 1, 8)]
    assert {"dense", "blockwise", "xla"} <= set(attention.available_backends())


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporaries_grow_linearly_in_tokens():
    """Forward and backward of blockwise attention at 2,048 and 4,096 tokens: the compiled temporaries double (the
    dense logits alone would quadruple, 2 heads × 4,096² × 4 B = 128 MiB)."""
    h, d = 2, 16

    def step(q, k, v):
        return jax.grad(_loss(lambda q, k, v: blockwise_attention(q, k, v), d), argnums=(0, 1, 2))(q, k, v)

    temps = []
    for t in (2048, 4096):
        spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
        temps.append(_temp_bytes(step, spec, spec, spec))
    assert temps[1] <= 2.3 * temps[0], temps
    dense = 2 * 4096 * 4096 * 4
    assert temps[1] < dense / 4, temps
