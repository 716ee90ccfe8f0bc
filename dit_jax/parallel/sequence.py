"""Sequence (context) parallelism for attention: tokens split over the mesh axes of the logical name ``act_length``.

With the default rules ``act_length`` maps to the mesh axis ``sequence`` (size 1 unless ``config.mesh`` says
otherwise, so nothing changes by default). When that axis has n > 1 devices, ``dot_product_attention`` runs its backend
inside ``jax.shard_map`` over it, with queries split along tokens, in one of three ways:

  ulysses  (DeepSpeed-Ulysses) one ``all_to_all`` turns token shards of q, k, v into head shards (H/n heads over the
           full sequence), the backend (dense, blockwise, cuDNN, …) runs locally, a second ``all_to_all`` turns the
           output back into token shards. Needs the heads divisible by n.
  ring     (ring attention) queries stay local; the n key/value blocks travel around the ring with ``ppermute`` and
           are merged with the online-softmax recurrence (fp32 max, normaliser, accumulator; each block's logits are
           recomputed in the backward pass). Any head count. The key mask is sliced to the block being held.
  local    keys that are not split over the sequence (cross-attention to a short caption, ``kv_sharded=False``, or a
           key count not divisible by n) are gathered whole on each device: queries stay local and nothing else moves.

``sequence_mode("auto" | "ulysses" | "ring")`` chooses between the first two; ``auto`` (the default) takes Ulysses
when the heads divide by n, else ring. Like ``nn.logical_axis_rules`` it is a context read when a function is traced
(a function jitted under one mode keeps it). A token count not divisible by n runs without sequence parallelism (XLA
gathers the tokens). All paths are differentiable: the transposes of ``all_to_all`` and ``ppermute`` are the reverse
exchanges.

Ring attention holds one (T/n × S/n) block of logits per device; Ulysses holds the local backend's (T × S for H/n
heads with ``dense``, blockwise memory with ``blockwise``/``xla``/cuDNN).
"""

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

SEQUENCE_MODES = ("auto", "ulysses", "ring")
_MASKED = float(jnp.finfo(jnp.float32).min)  # the masked logit of the dense reference

_state = threading.local()

# backend(q, k, v, mask, scale) -> out, as in dit_jax.nn.attention
LocalAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, float], jax.Array]


@contextlib.contextmanager
def sequence_mode(mode: str) -> Iterator[None]:
    """Within the context, sequence-parallel attention uses ``mode`` (one of ``SEQUENCE_MODES``)."""
    if mode not in SEQUENCE_MODES:
        raise ValueError(f"sequence mode {mode!r} is invalid: expected one of {SEQUENCE_MODES}")
    previous = current_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def current_mode() -> str:
    return getattr(_state, "mode", "auto")


def sequence_axes() -> tuple[str, ...]:
    """Mesh axes (size > 1) that tokens are split over here: those of ``act_length`` under the logical rules in
    context that the mesh in context has as automatic axes; ``()`` without a mesh or rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return ()
    axes = nn.logical_to_mesh_axes(("act_length",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return tuple(a for a in axes if a in types and types[a] != AxisType.Manual and mesh.shape[a] > 1)


def attention(
    local: LocalAttention,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float,
    *,
    kv_sharded: bool = True,
) -> jax.Array:
    """``local(q, k, v, mask, scale)`` split over the sequence axes in context (see the module docstring).

    q: B T H D; k, v: B S H D; mask: None or bool broadcastable to (B, H, T, S). ``kv_sharded``: whether the keys
    are a token stream split like the queries (self/joint attention, KV-compressed keys) rather than a short
    context that every device holds whole (cross-attention).
    """
    axes = sequence_axes()
    n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    t, s, h = q.shape[1], k.shape[1], q.shape[2]
    if n == 1 or t % n:
        return local(q, k, v, mask, scale)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mode = current_mode()
    if mode == "auto":
        mode = "ulysses" if h % n == 0 else "ring"
    ax = axes[0] if len(axes) == 1 else axes
    tokens = P(None, ax)
    if not kv_sharded or s % n:
        body, kv_spec, mask_spec = local, P(), _mask_spec(mask, t, ax)
    elif mode == "ulysses":
        if h % n:
            raise ValueError(
                f"Ulysses sequence parallelism needs the {h} attention heads divisible by the {n} devices of mesh "
                f"axes {axes}; use sequence_mode('ring') or 'auto'"
            )
        body, kv_spec, mask_spec = _ulysses(local, ax), tokens, P()
    else:
        body, kv_spec, mask_spec = _ring(ax, n), tokens, _mask_spec(mask, t, ax)

    def run(q, k, v, mask):
        return body(q, k, v, mask, scale)

    return jax.shard_map(
        run,
        in_specs=(tokens, kv_spec, kv_spec, mask_spec),
        out_specs=tokens,
        axis_names=set(axes),  # only the sequence axes are manual: XLA keeps the batch/heads sharding of the rest
        check_vma=False,  # the backends' scans start from constants, which the varying-axes check rejects
    )(q, k, v, mask)


def _mask_spec(mask: jax.Array | None, t: int, ax) -> P | None:
    """A mask with a query axis is split with the queries; key axes stay whole (sliced per key block)."""
    if mask is None:
        return None
    return P(None, None, ax) if mask.shape[2] == t else P()


def _ulysses(local: LocalAttention, ax) -> LocalAttention:
    def body(q, k, v, mask, scale):
        i = jax.lax.axis_index(ax)
        to_heads = lambda x: jax.lax.all_to_all(x, ax, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
        q, k, v = to_heads(q), to_heads(k), to_heads(v)  # B T H/n D, B S H/n D
        if mask is not None and mask.shape[1] > 1:
            hl = q.shape[2]
            mask = jax.lax.dynamic_slice_in_dim(mask, i * hl, hl, axis=1)
        out = local(q, k, v, mask, scale)  # B T H/n D
        return jax.lax.all_to_all(out, ax, split_axis=1, concat_axis=2, tiled=True)  # B T/n H D

    return body


@jax.checkpoint
def _block(q, k, v, mask, scale):
    """One key block: (row max, normaliser (B, H, T) and unnormalised output (B, H, T, D)), all fp32."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    m = logits.max(-1)
    p = jnp.exp(logits - m[..., None])
    acc = jnp.einsum("bhts,bshd->bhtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, p.sum(-1), acc


def _merge(a, b):
    """The online-softmax merge of two blocks' statistics (a block whose keys are all masked has max finfo.min, so it
    drops out against any real key and averages with the others when every key is masked, as in the reference)."""
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = jnp.maximum(m1, m2)
    a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * a1 + l2 * a2, acc1 * a1[..., None] + acc2 * a2[..., None]


def _ring(ax, n: int) -> LocalAttention:
    shift = [(j, (j + 1) % n) for j in range(n)]  # device j passes its key block to j + 1

    def body(q, k, v, mask, scale):
        i = jax.lax.axis_index(ax)
        sl = k.shape[1]

        def key_mask(j):  # the mask of the key block held at step j: the one that started on device i − j
            if mask is None or mask.shape[3] == 1:
                return mask
            return jax.lax.dynamic_slice_in_dim(mask, ((i - j) % n) * sl, sl, axis=3)

        def step(carry, j):
            k, v, stats = carry
            k, v = jax.lax.ppermute(k, ax, shift), jax.lax.ppermute(v, ax, shift)
            return (k, v, _merge(stats, _block(q, k, v, key_mask(j), scale))), None

        stats = _block(q, k, v, key_mask(0), scale)
        (_, _, (_, norm, acc)), _ = jax.lax.scan(step, (k, v, stats), jnp.arange(1, n))
        out = acc / norm[..., None]  # B H T/n D
        return out.transpose(0, 2, 1, 3).astype(q.dtype)

    return body
