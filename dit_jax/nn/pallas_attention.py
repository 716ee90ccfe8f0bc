"""Flash attention for TPU written in Pallas, exact at any head_dim the models use (64, 72, 88, 128).

A Pallas TPU block's last dimension may equal the array's full dimension, so a ``(block_q, head_dim)`` tile with
head_dim 72 is legal as is: q, k and v keep their true head_dim (no 72 → 128 zero padding as in maxdiffusion), only
the sequences are padded to whole blocks, and padded keys are excluded exactly. The softmax scale is the true
``head_dim ** -0.5`` unless given. This saves the pad and slice passes over q, k, v and the output and 1.78× (D=72)
of the logical matmul FLOPs; TPU tiles still lay a 72-wide minor dimension out on 128 lanes in VMEM (and in HBM
when head_dim is the minor dimension), so the time saved on the MXU is to be measured on a TPU, not assumed.

The kernel runs an online softmax over a grid (batch, heads, query blocks, key blocks): the key-block axis is
sequential, the running max ``m``, normaliser ``l`` and accumulator stay in VMEM scratch (fp32), the matmuls take the
input dtype with fp32 accumulation. It also returns ``m`` and ``l`` per query row, which the backward pass reuses:
two more kernels (FlashAttention-2's split) recompute each block's probabilities from them, one accumulating dK and dV
over the query blocks, one dQ over the key blocks, so training memory is O(tokens × block) as well. Off TPU the same
kernels run in Pallas interpret mode (chosen when the computation is lowered for its platform).

Masks follow ``dot_product_attention``: None or bool broadcastable to ``(B, H, T, S)`` (True = attend). A key mask
(shape ``(B|1, 1, 1, S)``) goes into the kernel as a ``(B, S)`` row; any other mask falls back to
``blockwise_attention``. A masked logit is ``finfo(float32).min`` as in the reference (a row with every key masked
averages all real keys, like it).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dit_jax.nn.blockwise import blockwise_attention
from dit_jax.nn.kernel_inputs import attention_mask, check_qkv, key_mask_row, per_device

BLOCK_Q = 512  # query rows per block (a multiple of 128: the row statistics are stored lane-dense)
BLOCK_K = 512  # key rows per block (a multiple of 128: it is the lane dimension of the logits and of the key mask)
_MASKED = float(jnp.finfo(jnp.float32).min)
_LANES = 128
_SUBLANES = 8
_TRANS_B = (((1,), (1,)), ((), ()))  # a · bᵀ: contract both operands' last dimension


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _kernel(*refs, scale: float, s_len: int, block_k: int, has_mask: bool, pad_keys: bool, with_stats: bool):
    """One (batch, head, query block) × key block step of the online softmax; refs are per-block tiles:
    q (bq, D), k/v (bk, D), [key mask (1, bk) int32], out (bq, D), [m/l out (1, bq)]; scratch m/l (bq, 1), acc (bq, D).
    """
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    km_ref = refs[3] if has_mask else None
    o_ref, *rest = refs[3 + has_mask :]
    m_out, l_out = rest[:2] if with_stats else (None, None)
    m_sc, l_sc, acc_sc = rest[-3:]
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = jax.lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale  # bq bk
    if km_ref is not None:
        s = jnp.where(km_ref[...] != 0, s, _MASKED)
    if pad_keys:  # keys past the sequence: −inf, so they drop out exactly (also from all-masked rows)
        col = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < s_len, s, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # finite: every key block holds a real key
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        if with_stats:  # column (bq, 1) → lane-dense row (1, bq): a (bq, 1) HBM array would be tiled to 128 lanes
            for ref, sc in ((m_out, m_sc), (l_out, l_sc)):
                ref[...] = jnp.broadcast_to(sc[...], (sc.shape[0], _LANES)).T[:1, :]


def _heads_first(x: jax.Array, n: int) -> jax.Array:
    """(B, N, H, D) → (B, H, n, D), the sequence zero-padded to ``n``: the layout every kernel's blocks index."""
    return _pad(x, 1, n).transpose(0, 2, 1, 3)


def _key_mask_rows(key_mask: jax.Array, b: int, s: int, sp: int) -> jax.Array:
    """The (B|1, S) key mask as (B, 1, Sp) int32 rows (padded keys 0), lane-dense as the kernels read it."""
    return _pad(jnp.broadcast_to(key_mask, (b, s)).astype(jnp.int32), 1, sp)[:, None, :]


def _blocks(t: int, s: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
    """Block sizes (never beyond the rounded-up sequence) and the padded lengths."""
    bq = min(block_q, _round_up(t, _SUBLANES))  # one block: any multiple of 8; several: block_q (× 128)
    bk = min(block_k, _round_up(s, _LANES))
    return bq, bk, _round_up(t, bq), _round_up(s, bk)


def _forward(q, k, v, key_mask, scale, block_q, block_k, interpret, with_stats=True):
    """(out (B, T, H, D), (m, l) fp32 (B, H, Tp) over the queries padded to whole blocks of ``bq``, or None)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    bq, bk, tp, sp = _blocks(t, s, block_q, block_k)
    qp, kp, vp = _heads_first(q, tp), _heads_first(k, sp), _heads_first(v, sp)
    has_mask = key_mask is not None

    sq = pl.squeezed
    q_spec = pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda bi, hi, i, j: (bi, hi, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [qp, kp, vp]
    if has_mask:
        km = _key_mask_rows(key_mask, b, s, sp)
        in_specs.append(pl.BlockSpec((sq, 1, bk), lambda bi, hi, i, j: (bi, 0, j)))
        args.append(km)
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, d), q.dtype)]
    out_specs = [pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0))]
    if with_stats:  # B H 1 Tp fp32: lane-dense rows
        out_shape += [jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32)] * 2
        out_specs += [pl.BlockSpec((sq, sq, 1, bq), lambda bi, hi, i, j: (bi, hi, 0, i))] * 2
    itemsize = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * b * h * tp * sp * d,
        transcendentals=b * h * tp * sp,
        bytes_accessed=itemsize * b * h * d * (2 * tp + 2 * sp * (tp // bq)) + 8 * b * h * tp * with_stats,
    )
    kernel = functools.partial(
        _kernel, scale=scale, s_len=s, block_k=bk, has_mask=has_mask, pad_keys=sp != s, with_stats=with_stats
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, tp // bq, sp // bk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="dit_flash_attention",
    )(*args)
    out = outs[0].transpose(0, 2, 1, 3)[:, :t]  # B T H D
    return out, ((outs[1][:, :, 0], outs[2][:, :, 0]) if with_stats else None)


def _row_to_column(row: jax.Array, n: int) -> jax.Array:
    """A lane-dense (1, n) row as an (n, 1) column (the reverse of the forward's store of ``m`` and ``l``)."""
    return jnp.broadcast_to(row, (_LANES, n)).T[:, :1]


def _p_and_ds(a, b, da, db, keep, stats, *, key_axis: int, first_key, s_len: int, scale: float, pad_keys: bool):
    """One block's probabilities P and logit gradients dS, both laid out as ``a · bᵀ`` (queries × keys for the dQ
    kernel, keys × queries for the dK/dV one; ``key_axis`` says which axis holds the keys): S = a bᵀ · scale with the
    key mask ``keep`` (None: no mask) and the keys past ``s_len`` excluded, P = exp(S − m) / l from the forward's
    statistics ``stats = (m, l, delta)``, dS = P ∘ (da dbᵀ − delta) · scale, zero where a key is masked (a masked
    logit is a constant)."""
    m, norm, delta = stats
    s = jax.lax.dot_general(a, b, _TRANS_B, preferred_element_type=jnp.float32) * scale
    if keep is not None:
        s = jnp.where(keep, s, _MASKED)
    if pad_keys:
        key = first_key + jax.lax.broadcasted_iota(jnp.int32, s.shape, key_axis)
        s = jnp.where(key < s_len, s, -jnp.inf)
    p = jnp.exp(s - m) / norm
    ds = p * (jax.lax.dot_general(da, db, _TRANS_B, preferred_element_type=jnp.float32) - delta) * scale
    if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
    return p, ds


def _dkv_kernel(*refs, scale: float, s_len: int, block_k: int, has_mask: bool, pad_keys: bool):
    """One (batch, head, key block) × query block step of dK, dV. Keys are on the rows and queries on the lanes
    (``Sᵀ = k qᵀ``), so the lane-dense row statistics broadcast as they are and every matmul is a plain or a
    ``trans_b`` one. refs: q, dO (bq, D), k, v (bk, D), m, l, delta (1, bq), [key mask (1, bk) int32],
    dk, dv out (bk, D); scratch [key mask column (bk, 1)], dk/dv accumulators (bk, D) fp32."""
    refs = list(refs)
    q_ref, do_ref, k_ref, v_ref, m_ref, l_ref, delta_ref = refs[:7]
    km_ref = refs[7] if has_mask else None
    dk_ref, dv_ref, *scratch = refs[7 + has_mask :]
    km_sc = scratch.pop(0) if has_mask else None
    dk_sc, dv_sc = scratch
    j, i = pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        if has_mask:  # the key block's mask as a column, once per key block
            km_sc[...] = _row_to_column(km_ref[...], bk)

    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    keep = km_sc[...] != 0 if has_mask else None
    stats = m_ref[...], l_ref[...], delta_ref[...]  # rows: they broadcast over the key rows as they are
    pt, dst = _p_and_ds(k, q, v, do, keep, stats, key_axis=0, first_key=j * block_k, s_len=s_len, scale=scale,
                        pad_keys=pad_keys)  # fmt: skip
    dv_sc[...] += jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, scale: float, s_len: int, block_k: int, has_mask: bool, pad_keys: bool):
    """One (batch, head, query block) × key block step of dQ. refs as in ``_dkv_kernel`` but dq out (bq, D); scratch
    m, l, delta columns (bq, 1) (made once per query block) and the dq accumulator (bq, D) fp32."""
    refs = list(refs)
    q_ref, do_ref, k_ref, v_ref, m_ref, l_ref, delta_ref = refs[:7]
    km_ref = refs[7] if has_mask else None
    dq_ref, m_sc, l_sc, delta_sc, dq_sc = refs[7 + has_mask :]
    j = pl.program_id(3)
    bq = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        for sc, ref in ((m_sc, m_ref), (l_sc, l_ref), (delta_sc, delta_ref)):
            sc[...] = _row_to_column(ref[...], bq)

    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    keep = km_ref[...] != 0 if has_mask else None
    stats = m_sc[...], l_sc[...], delta_sc[...]  # columns: they broadcast over the key lanes
    _, ds = _p_and_ds(q, k, do, v, keep, stats, key_axis=1, first_key=j * block_k, s_len=s_len, scale=scale,
                      pad_keys=pad_keys)  # fmt: skip
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _backward(q, k, v, key_mask, out, stats, g, scale, block_q, block_k, interpret):
    """dq, dk, dv with two kernels (FlashAttention-2's backward): one walks the query blocks for each key block
    (dK, dV), one the key blocks for each query block (dQ); each recomputes P = exp(S − m) / l from the forward's
    row statistics, and delta = rowsum(dO ∘ O) comes from one XLA reduction."""
    b, t, h, d = q.shape
    s = k.shape[1]
    bq, bk, tp, sp = _blocks(t, s, block_q, block_k)  # the forward's blocks: its statistics cover tp rows
    qp, gp, kp, vp = (_heads_first(x, n) for x, n in ((q, tp), (g.astype(q.dtype), tp), (k, sp), (v, sp)))
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), g.astype(jnp.float32))
    m, norm, delta = (x[:, :, None, :] for x in (*stats, _pad(delta, 2, tp)))  # B H 1 Tp: lane-dense rows
    has_mask = key_mask is not None
    args = [qp, gp, kp, vp, m, norm, delta]
    if has_mask:
        args.append(_key_mask_rows(key_mask, b, s, sp))

    sq = pl.squeezed
    itemsize = jnp.dtype(q.dtype).itemsize
    common = dict(scale=scale, s_len=s, block_k=bk, has_mask=has_mask, pad_keys=sp != s)
    semantics = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    def specs(qi, kj):  # the inputs' blocks, given which grid axes index the query and the key blocks
        q_spec = pl.BlockSpec((sq, sq, bq, d), lambda *g: (g[0], g[1], g[qi], 0))
        kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda *g: (g[0], g[1], g[kj], 0))
        row_spec = pl.BlockSpec((sq, sq, 1, bq), lambda *g: (g[0], g[1], 0, g[qi]))
        mask_spec = [pl.BlockSpec((sq, 1, bk), lambda *g: (g[0], 0, g[kj]))] if has_mask else []
        return [q_spec, q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, *mask_spec]

    kv_out = pl.BlockSpec((sq, sq, bk, d), lambda bi, hi, j, i: (bi, hi, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        out_shape=[jax.ShapeDtypeStruct((b, h, sp, d), k.dtype)] * 2,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, sp // bk, tp // bq),
            in_specs=specs(3, 2),
            out_specs=[kv_out, kv_out],
            scratch_shapes=[pltpu.VMEM((bk, 1), jnp.int32)] * has_mask + [pltpu.VMEM((bk, d), jnp.float32)] * 2,
        ),
        compiler_params=semantics,
        cost_estimate=pl.CostEstimate(
            flops=8 * b * h * tp * sp * d,
            transcendentals=b * h * tp * sp,
            bytes_accessed=itemsize * b * h * d * (4 * sp + 2 * tp * (sp // bk)) + 12 * b * h * tp * (sp // bk),
        ),
        interpret=interpret,
        name="dit_flash_attention_dkv",
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, d), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, tp // bq, sp // bk),
            in_specs=specs(2, 3),
            out_specs=pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32)] * 3 + [pltpu.VMEM((bq, d), jnp.float32)],
        ),
        compiler_params=semantics,
        cost_estimate=pl.CostEstimate(
            flops=6 * b * h * tp * sp * d,
            transcendentals=b * h * tp * sp,
            bytes_accessed=itemsize * b * h * d * (3 * tp + 2 * sp * (tp // bq)) + 12 * b * h * tp,
        ),
        interpret=interpret,
        name="dit_flash_attention_dq",
    )(*args)
    tokens_first = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]  # noqa: E731
    return tokens_first(dq, t), tokens_first(dk, s), tokens_first(dv, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, key_mask, scale, block_q, block_k, interpret):
    return _forward(q, k, v, key_mask, scale, block_q, block_k, interpret, with_stats=False)[0]


def _flash_fwd(q, k, v, key_mask, scale, block_q, block_k, interpret):
    out, stats = _forward(q, k, v, key_mask, scale, block_q, block_k, interpret)
    return out, (q, k, v, key_mask, out, stats)


def _flash_bwd(scale, block_q, block_k, interpret, res, g):
    q, k, v, key_mask, out, stats = res
    dq, dk, dv = _backward(q, k, v, key_mask, out, stats, g, scale, block_q, block_k, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    scale: float | None = None,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret: bool | None = None,
) -> jax.Array:
    """``softmax(q kᵀ · scale) v`` with the Pallas flash kernel (see the module docstring).

    q: B T H D; k, v: B S H D; mask: None or bool broadcastable to (B, H, T, S). Differentiable in q, k, v (the
    backward pass is the two Pallas kernels). ``interpret=None``: Mosaic when lowered for a TPU, interpret mode
    elsewhere (decided at lowering; see ``_flash_call``).
    """
    if block_q < 1 or block_q % _LANES or block_k < 1 or block_k % _LANES:
        raise ValueError(
            f"pallas_attention: block_q and block_k must be positive multiples of {_LANES}, got {block_q} and {block_k}"
        )
    check_qkv("pallas_attention", q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dtype = jnp.result_type(q, k, v)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    key_mask = None
    mask = attention_mask("pallas_attention", mask)
    if mask is not None:
        key_mask = key_mask_row(mask)
        if key_mask is None:  # a mask over heads or queries: the portable blockwise path
            return blockwise_attention(q, k, v, mask, scale)
    flash = functools.partial(_flash_call, scale=float(scale), block_q=int(block_q), block_k=int(block_k),
                              interpret=interpret)  # fmt: skip
    return per_device(flash, q, k, v, key_mask)


def _flash_call(q, k, v, key_mask, *, scale, block_q, block_k, interpret):
    """The kernels compiled by Mosaic (``interpret=False``), interpreted (``True``), or — ``None`` — whichever the
    platform the computation is lowered for takes: Mosaic for TPU, interpreted for any other. The choice is made at
    lowering, not from this process's default backend, so a step compiled ahead of time for a TPU topology on a CPU
    host (``dit_jax.plan --topology``) holds the real kernels."""
    run = lambda interpret: lambda q, k, v, km: _flash(q, k, v, km, scale, block_q, block_k, interpret)  # noqa: E731
    if interpret is not None:
        return run(bool(interpret))(q, k, v, key_mask)
    return jax.lax.platform_dependent(q, k, v, key_mask, tpu=run(False), default=run(True))
