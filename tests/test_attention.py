"""The attention entry point: the xla backend against a plain softmax, masks, backend selection and registration."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.nn import attention as attn_lib
from dit_jax.nn.attention import SelfAttention, available_backends, dot_product_attention, register_backend

B, T, S, H, DH = 2, 5, 7, 3, 8


def _inputs(seed=0):
    rs = np.random.RandomState(seed)
    q, k, v = (rs.randn(B, n, H, DH).astype(np.float32) for n in (T, S, S))
    return q, k, v


def _reference(q, k, v, mask=None):
    """softmax(q kᵀ / sqrt(Dh)) v in float64 numpy; mask bool broadcastable to (B, H, T, S), True = attend."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


KEY_MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0, 0]], np.int32)  # (B, S), 1 = keep
CAUSALISH = np.tril(np.ones((T, S), bool), k=2)[None, None]  # (1, 1, T, S)


@pytest.mark.parametrize(
    "mask, ref_mask",
    [
        (None, None),
        (KEY_MASK, KEY_MASK.astype(bool)[:, None, None, :]),
        (CAUSALISH, CAUSALISH),
        (KEY_MASK.astype(bool)[:, None, None, :] & CAUSALISH, KEY_MASK.astype(bool)[:, None, None, :] & CAUSALISH),
    ],
    ids=["none", "key_mask", "broadcast_1_1_T_S", "key_and_broadcast"],
)
def test_xla_matches_softmax_reference(mask, ref_mask):
    q, k, v = _inputs()
    want = _reference(q, k, v, ref_mask)
    got = np.asarray(dot_product_attention(q, k, v, mask, backend="xla"))
    err = np.abs(got - want).max()
    print(f"xla fp32 vs float64 softmax: max abs err {err:.2e}")
    assert err < 1e-5

    # bf16 inputs: softmax stays fp32; the error is bf16 rounding of q, k, v, probabilities, output (~5e-3 rel).
    got16 = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), mask, backend="xla")
    assert got16.dtype == jnp.bfloat16
    err16 = np.abs(np.asarray(got16, np.float32) - want).max() / np.abs(want).max()
    print(f"xla bf16 vs float64 softmax: max rel err {err16:.2e}")
    assert err16 < 1.5e-2


def test_key_mask_ignores_masked_values():
    """Values at masked keys must not leak into the output."""
    q, k, v = _inputs(1)
    v2 = v.copy()
    v2[1, 2] += 100.0  # a masked key of row 1
    a = np.asarray(dot_product_attention(q, k, v, KEY_MASK, backend="xla"))
    b = np.asarray(dot_product_attention(q, k, v2, KEY_MASK, backend="xla"))
    np.testing.assert_array_equal(a, b)


def test_cudnn_on_cpu_raises():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs())
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        dot_product_attention(q, k, v, backend="cudnn")


def test_auto_falls_back_to_xla_on_cpu_without_the_cpu_kernel(monkeypatch):
    from dit_jax.nn import cpu_attention

    monkeypatch.setattr(cpu_attention, "_state", {"reason": "disabled by DIT_JAX_CPU_KERNEL"})
    assert jax.default_backend() == "cpu"
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs())  # bf16: what would pick cuDNN on a GPU
    assert attn_lib._auto_backend(q) == "xla"
    got = dot_product_attention(q, k, v, KEY_MASK, backend="auto")
    want = dot_product_attention(q, k, v, KEY_MASK, backend="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_unknown_backend_names_the_available_ones():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'") as e:
        dot_product_attention(q, k, v, backend="nope")
    for name in ("auto", "xla", "cudnn"):
        assert name in str(e.value)
    assert {"auto", "xla", "cudnn"} <= set(available_backends())


def test_register_backend_is_called(monkeypatch):
    monkeypatch.setattr(attn_lib, "_BACKENDS", dict(attn_lib._BACKENDS))  # undone after the test
    calls = []

    def spy(q, k, v, mask, scale):
        calls.append((q.shape, k.shape, None if mask is None else mask.shape, scale))
        return jnp.zeros_like(q)  # distinguishable from real attention

    register_backend("spy", spy)
    assert "spy" in available_backends()
    q, k, v = _inputs()
    out = dot_product_attention(q, k, v, KEY_MASK, backend="spy")
    assert calls == [((B, T, H, DH), (B, S, H, DH), (B, 1, 1, S), DH**-0.5)]
    np.testing.assert_array_equal(np.asarray(out), 0.0)

    # the module seam: SelfAttention(backend=...) routes through the registered function.
    x = jnp.ones((B, T, H * DH))
    module = SelfAttention(H, backend="spy")
    params = flax.linen.meta.unbox(module.init(jax.random.key(0), x))
    calls.clear()
    y = module.apply(params, x)
    assert len(calls) == 1 and calls[0][0] == (B, T, H, DH)
    bias = np.asarray(params["params"]["proj"]["bias"])
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(bias, y.shape))  # proj(0) = bias
