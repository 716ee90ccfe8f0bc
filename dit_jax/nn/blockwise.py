"""Memory-efficient attention for any backend: an online softmax over key/value chunks (the flash-attention recurrence
written in ``jax.lax``), with a custom VJP that recomputes each block in the backward pass.

``blockwise_attention(q, k, v, mask, scale)`` equals ``softmax(q kᵀ · scale) v`` to fp32 round-off while holding only
one ``(B, H, q_chunk, kv_chunk)`` block of logits at a time, forward and backward: memory O(tokens × chunk) instead of
O(tokens²). The statistics (running max, normaliser, accumulator) are fp32 whatever the input dtype; the matmuls take
the input dtype with fp32 accumulation, as the materialised reference does.

Masks follow ``dot_product_attention``: None or bool broadcastable to ``(B, H, T, S)`` (True = attend). A masked
logit is ``finfo(float32).min`` as in the reference (a row with every key masked averages all keys, like it); the
padding this function adds to reach whole chunks is excluded exactly.
"""

import functools

import jax
import jax.numpy as jnp

from dit_jax.nn.kernel_inputs import attention_mask

Q_CHUNK = 256  # query rows per block (XLA:CPU: (B, H, 256, 512) fp32 logits stay near the caches)
KV_CHUNK = 512  # key/value rows per block
_MASKED = float(jnp.finfo(jnp.float32).min)


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _slice(x: jax.Array, axis: int, start, size: int) -> jax.Array:
    """``x[..., start:start+size, ...]`` along ``axis`` unless that axis is broadcast (size 1)."""
    if x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _chunks(t: int, s: int, q_chunk: int, kv_chunk: int) -> tuple[int, int, int, int]:
    """Block sizes (never above the sequence) and the padded lengths."""
    tq, tk = min(q_chunk, t), min(kv_chunk, s)
    return tq, tk, -(-t // tq) * tq, -(-s // tk) * tk


def _logits(qb, kb, mb, valid, scale):
    """One block's fp32 logits (B, H, tq, tk) with the user mask (finfo.min) and the padding (−inf, where ``valid``
    is given) applied. Blocks are heads-first: qb (B, H, tq, D), kb (B, H, tk, D)."""
    s = jnp.einsum("bhtd,bhsd->bhts", qb, kb, preferred_element_type=jnp.float32) * scale
    if mb is not None:
        s = jnp.where(mb, s, _MASKED)
    if valid is not None:
        s = jnp.where(valid[None, None, None, :], s, -jnp.inf)
    return s


def _prepare(q, k, v, mask, q_chunk, kv_chunk, *extra):
    """Heads-first, padded copies: (tq, tk, tp, sp, q, k, v, mask, key validity or None, *extra queries-like)."""
    t, s = q.shape[1], k.shape[1]
    tq, tk, tp, sp = _chunks(t, s, q_chunk, kv_chunk)
    heads_first = lambda x, n: _pad(x, 1, n).transpose(0, 2, 1, 3)  # noqa: E731
    qp, kp, vp = heads_first(q, tp), heads_first(k, sp), heads_first(v, sp)
    mp = None
    if mask is not None:
        mp = _pad(_pad(mask, 2, tp if mask.shape[2] > 1 else 1), 3, sp if mask.shape[3] > 1 else 1)
    valid = None if sp == s else jnp.arange(sp) < s
    return (tq, tk, tp, sp, qp, kp, vp, mp, valid, *(heads_first(x, tp) for x in extra))


def _valid_block(valid, j, tk):
    return None if valid is None else jax.lax.dynamic_slice_in_dim(valid, j * tk, tk)


def _forward(q, k, v, mask, scale, q_chunk, kv_chunk):
    """(out (B, T, H, D) in q's dtype, row max and normaliser (B, H, T) fp32: kept apart, not as a logsumexp,
    because a row with every key masked has max finfo.min, which would swallow log(l))."""
    b, t, h, d = q.shape
    tq, tk, tp, sp, qp, kp, vp, mp, valid = _prepare(q, k, v, mask, q_chunk, kv_chunk)

    def q_block(i):
        qb = _slice(qp, 2, i * tq, tq)
        mq = None if mp is None else _slice(mp, 2, i * tq, tq)

        def kv_step(carry, j):
            m, norm, acc = carry
            kb, vb = _slice(kp, 2, j * tk, tk), _slice(vp, 2, j * tk, tk)
            mb = None if mq is None else _slice(mq, 3, j * tk, tk)
            logits = _logits(qb, kb, mb, _valid_block(valid, j, tk), scale)
            m_new = jnp.maximum(m, logits.max(-1))
            alpha = jnp.exp(m - m_new)  # m starts at −inf and m_new is finite: every block has a real key
            p = jnp.exp(logits - m_new[..., None])
            norm = norm * alpha + p.sum(-1)
            pv = jnp.einsum("bhts,bhsd->bhtd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, norm, acc * alpha[..., None] + pv), None

        init = (
            jnp.full((b, h, tq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, tq), jnp.float32),
            jnp.zeros((b, h, tq, d), jnp.float32),
        )
        (m, norm, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(sp // tk))
        return (acc / norm[..., None]).astype(q.dtype), m, norm

    outs, m, norm = jax.lax.map(q_block, jnp.arange(tp // tq))  # (nq, B, H, tq, D), (nq, B, H, tq) ×2
    out = outs.transpose(1, 0, 3, 2, 4).reshape(b, tp, h, d)[:, :t]
    m, norm = (x.transpose(1, 2, 0, 3).reshape(b, h, tp)[..., :t] for x in (m, norm))
    return out, (m, norm)


def _backward(q, k, v, mask, out, stats, g, scale, q_chunk, kv_chunk):
    """Gradients of q, k, v: for each key block, the blocks of every query chunk are recomputed from the saved row
    statistics (P = exp(S − m) / l), as in FlashAttention-2's backward pass. ``stats``: row max and normaliser
    (B, H, T), from ``_forward`` or any kernel that computes the same softmax."""
    b, t, h, d = q.shape
    s = k.shape[1]
    tq, tk, tp, sp, qp, kp, vp, mp, valid, gp, op = _prepare(q, k, v, mask, q_chunk, kv_chunk, g, out)
    # padded query rows have dO = 0, so any finite statistics do there
    m, norm = _pad(stats[0], 2, tp), _pad(stats[1], 2, tp, 1.0)
    # D_i = rowsum(dO ∘ O) in fp32 (B, H, Tp); padded query rows have dO = 0
    delta = jnp.einsum("bhtd,bhtd->bht", op.astype(jnp.float32), gp.astype(jnp.float32))

    def kv_block(dq, j):
        kb, vb = _slice(kp, 2, j * tk, tk), _slice(vp, 2, j * tk, tk)
        valid_j = _valid_block(valid, j, tk)
        mk = None if mp is None else _slice(mp, 3, j * tk, tk)

        def q_step(carry, i):
            dq, dk, dv = carry
            qb, gb = _slice(qp, 2, i * tq, tq), _slice(gp, 2, i * tq, tq)
            mb = None if mk is None else _slice(mk, 2, i * tq, tq)
            logits = _logits(qb, kb, mb, valid_j, scale)
            mi = jax.lax.dynamic_slice_in_dim(m, i * tq, tq, axis=2)[..., None]
            li = jax.lax.dynamic_slice_in_dim(norm, i * tq, tq, axis=2)[..., None]
            p = jnp.exp(logits - mi) / li  # B H tq tk
            dv = dv + jnp.einsum("bhts,bhtd->bhsd", p.astype(g.dtype), gb, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhtd,bhsd->bhts", gb, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - jax.lax.dynamic_slice_in_dim(delta, i * tq, tq, axis=2)[..., None]) * scale
            if mb is not None:  # a masked logit is a constant: no gradient to q, k (rows with every key masked)
                ds = jnp.where(mb, ds, 0.0)
            dk = dk + jnp.einsum("bhts,bhtd->bhsd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bhts,bhsd->bhtd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, 2, i * tq, tq) + dq_i, i * tq, 2)
            return (dq, dk, dv), None

        zeros = jnp.zeros((b, h, tk, d), jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(q_step, (dq, zeros, zeros), jnp.arange(tp // tq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros((b, h, tp, d), jnp.float32), jnp.arange(sp // tk))
    dq = dq.transpose(0, 2, 1, 3)[:, :t]
    dk, dv = (x.transpose(1, 0, 3, 2, 4).reshape(b, sp, h, d)[:, :s] for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, q_chunk, kv_chunk):
    return _forward(q, k, v, mask, scale, q_chunk, kv_chunk)[0]


def _attention_fwd(q, k, v, mask, scale, q_chunk, kv_chunk):
    out, stats = _forward(q, k, v, mask, scale, q_chunk, kv_chunk)
    return out, (q, k, v, mask, out, stats)


def _attention_bwd(scale, q_chunk, kv_chunk, res, g):
    q, k, v, mask, out, stats = res
    dq, dk, dv = _backward(q, k, v, mask, out, stats, g, scale, q_chunk, kv_chunk)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    scale: float | None = None,
    *,
    q_chunk: int = Q_CHUNK,
    kv_chunk: int = KV_CHUNK,
) -> jax.Array:
    """``softmax(q kᵀ · scale) v`` in blocks of ``q_chunk`` queries × ``kv_chunk`` keys (see the module docstring).

    q: B T H D; k, v: B S H D; mask: None or bool broadcastable to (B, H, T, S). Differentiable in q, k, v.
    """
    if q_chunk < 1 or kv_chunk < 1:
        raise ValueError(f"q_chunk and kv_chunk must be positive, got {q_chunk} and {kv_chunk}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = attention_mask("blockwise_attention", mask)
    return _attention(q, k, v, mask, float(scale), int(q_chunk), int(kv_chunk))
