"""Flash attention for TPU written in Pallas, exact at any head_dim the models use (64, 72, 88, 128).

A Pallas TPU block's last dimension may equal the array's full dimension, so a ``(block_q, head_dim)`` tile with
head_dim 72 is legal as is: q, k and v keep their true head_dim (no 72 → 128 zero padding as in maxdiffusion), only
the sequences are padded to whole blocks, and padded keys are excluded exactly. The softmax scale is the true
``head_dim ** -0.5`` unless given. This saves the pad and slice passes over q, k, v and the output and 1.78× (D=72)
of the logical matmul FLOPs; TPU tiles still lay a 72-wide minor dimension out on 128 lanes in VMEM (and in HBM
when head_dim is the minor dimension), so the time saved on the MXU is to be measured on a TPU, not assumed.

The kernel runs an online softmax over a grid (batch, heads, query blocks, key blocks): the key-block axis is
sequential, the running max ``m``, normaliser ``l`` and accumulator stay in VMEM scratch (fp32), the matmuls take the
input dtype with fp32 accumulation. It also returns ``m`` and ``l`` per query row, which the backward pass (the
blockwise recomputation of ``dit_jax.nn.blockwise``) reuses. Off TPU the same kernel runs in Pallas interpret mode.

Masks follow ``dot_product_attention``: None or bool broadcastable to ``(B, H, T, S)`` (True = attend). A key mask
(shape ``(B|1, 1, 1, S)``) goes into the kernel as a ``(B, S)`` row; any other mask falls back to
``blockwise_attention``. A masked logit is ``finfo(float32).min`` as in the reference (a row with every key masked
averages all real keys, like it).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dit_jax.nn import blockwise
from dit_jax.nn.blockwise import blockwise_attention

BLOCK_Q = 512  # query rows per block (a multiple of 128: the row statistics are stored lane-dense)
BLOCK_K = 512  # key rows per block (a multiple of 128: it is the lane dimension of the logits and of the key mask)
_MASKED = float(jnp.finfo(jnp.float32).min)
_LANES = 128
_SUBLANES = 8


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
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale  # bq bk
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
    heads_first = lambda x, n: _pad(x, 1, n).transpose(0, 2, 1, 3)  # noqa: E731  B H N D
    qp, kp, vp = heads_first(q, tp), heads_first(k, sp), heads_first(v, sp)
    has_mask = key_mask is not None

    sq = pl.squeezed
    q_spec = pl.BlockSpec((sq, sq, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda bi, hi, i, j: (bi, hi, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [qp, kp, vp]
    if has_mask:
        km = _pad(jnp.broadcast_to(key_mask, (b, s)).astype(jnp.int32), 1, sp)[:, None, :]  # B 1 Sp
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


def _backward_stats(stats, t, s, q_chunk, kv_chunk):
    """Row statistics re-blocked for ``blockwise._backward``: (B, H, Tp') over its own padding of the queries.
    Padded rows get m = 0, l = 1 (finite; their gradient is zero because dO is zero there)."""
    tp = blockwise._chunks(t, s, q_chunk, kv_chunk)[2]
    m, norm = (x[..., :t] for x in stats)
    extra = [(0, 0), (0, 0), (0, tp - t)]
    return jnp.pad(m, extra), jnp.pad(norm, extra, constant_values=1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, key_mask, scale, block_q, block_k, interpret):
    return _forward(q, k, v, key_mask, scale, block_q, block_k, interpret, with_stats=False)[0]


def _flash_fwd(q, k, v, key_mask, scale, block_q, block_k, interpret):
    out, stats = _forward(q, k, v, key_mask, scale, block_q, block_k, interpret)
    return out, (q, k, v, key_mask, out, stats)


def _flash_bwd(scale, block_q, block_k, interpret, res, g):
    q, k, v, key_mask, out, stats = res
    t, s = q.shape[1], k.shape[1]
    q_chunk, kv_chunk = blockwise.Q_CHUNK, blockwise.KV_CHUNK
    mask = None if key_mask is None else jnp.broadcast_to(key_mask, (q.shape[0], s))[:, None, None, :]
    stats = _backward_stats(stats, t, s, q_chunk, kv_chunk)
    dq, dk, dv = blockwise._backward(q, k, v, mask, out, stats, g, scale, q_chunk, kv_chunk)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _key_mask(mask: jax.Array) -> jax.Array | None:
    """The (B|1, S) key row of a mask broadcastable to (B, H, T, S), or None when it varies over heads or queries."""
    if mask.shape[1] == 1 and mask.shape[2] == 1:
        return mask[:, 0, 0, :]
    return None


def _logical_axes(name: str, auto: list[str], mesh, size: int) -> tuple[str, ...] | None:
    """The automatic mesh axes that the logical ``name`` maps to under the rules in context, if they divide ``size``."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        return None
    axes = nn.logical_to_mesh_axes((name,), rules)[0]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in auto)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def _per_device(fn, q, k, v, key_mask):
    """``fn(q, k, v, key_mask)`` on each device's part. A Mosaic kernel cannot be partitioned by XLA, so under a mesh
    with automatic axes it runs inside ``shard_map`` over all of them: batch split as ``act_batch`` and heads as
    ``act_heads`` (under the logical rules in context, where they divide), every other axis replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, key_mask)
    auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual]
    if not auto:
        return fn(q, k, v, key_mask)
    batch = _logical_axes("act_batch", auto, mesh, q.shape[0])
    heads = _logical_axes("act_heads", auto, mesh, q.shape[2])
    spec = P(batch, None, heads, None)
    mask_spec = None if key_mask is None else P(batch if key_mask.shape[0] > 1 else None, None)
    return jax.shard_map(
        fn, in_specs=(spec, spec, spec, mask_spec), out_specs=spec, axis_names=set(auto), check_vma=False
    )(q, k, v, key_mask)


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
    backward pass is the blockwise recomputation). ``interpret=None``: interpret mode unless running on TPU.
    """
    if block_q < 1 or block_q % _LANES or block_k < 1 or block_k % _LANES:
        raise ValueError(
            f"pallas_attention: block_q and block_k must be positive multiples of {_LANES}, got {block_q} and {block_k}"
        )
    if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"pallas_attention: expected q (B, T, H, D) and k, v (B, S, H, D), got {q.shape}, "
                         f"{k.shape}, {v.shape}")  # fmt: skip
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dtype = jnp.result_type(q, k, v)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    key_mask = None
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        if mask.ndim > 4:
            raise ValueError(f"pallas_attention: mask must broadcast to (B, H, T, S), got shape {mask.shape}")
        mask = jax.lax.stop_gradient(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
        key_mask = _key_mask(mask)
        if key_mask is None:  # a mask over heads or queries: the portable blockwise path
            return blockwise_attention(q, k, v, mask, scale)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    flash = functools.partial(_flash_call, scale=float(scale), block_q=int(block_q), block_k=int(block_k),
                              interpret=bool(interpret))  # fmt: skip
    return _per_device(flash, q, k, v, key_mask)


def _flash_call(q, k, v, key_mask, *, scale, block_q, block_k, interpret):
    return _flash(q, k, v, key_mask, scale, block_q, block_k, interpret)
