"""Attention: one entry point with pluggable backends, self/cross attention modules, KV token compression.

Layouts are ``B T H D`` (batch, tokens, heads, head_dim) as in ``jax.nn.dot_product_attention``. The softmax scale is
always ``head_dim ** -0.5`` of the *true* head_dim, so kernels that need a padded head_dim (TPU: multiples of 128)
stay exact when the padding is zeros.

Backends: ``dense`` materialises the (B, H, T, S) logits (the reference); ``blockwise`` runs an online softmax over
key/value blocks with O(T × chunk) memory forward and backward (``dit_jax.nn.blockwise``); ``xla`` is the portable
choice: ``dense`` below ``BLOCKWISE_MIN_LOGITS`` logits per head, ``blockwise`` from there; ``cudnn`` is cuDNN flash
attention (GPU, bf16/fp16); ``pallas`` is a Pallas flash-attention kernel for TPU at the true head_dim (64, 72, 88,
128 without padding it to 128; ``dit_jax.nn.pallas_attention``, interpreted elsewhere); ``cpu`` is a C++ flash
kernel for XLA:CPU built on first use (``dit_jax.nn.cpu_attention``); ``auto`` takes ``pallas`` on TPU, cuDNN on GPU
where it applies, ``cpu`` on CPU when the kernel builds, else ``xla``. Under a mesh whose ``sequence`` axis
splits the tokens, every backend runs sequence-parallel (Ulysses or ring, ``dit_jax.parallel.sequence``).
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.nn.blockwise import blockwise_attention
from dit_jax.nn.cpu_attention import available as cpu_attention_available
from dit_jax.nn.cpu_attention import cpu_attention
from dit_jax.nn.layers import LayerNorm, dense, partitioned, zeros
from dit_jax.nn.pallas_attention import pallas_attention
from dit_jax.parallel import sequence
from dit_jax.parallel.rules import constrain

# backend(q, k, v, mask, scale) -> out; mask is None or bool broadcastable to (B, H, T, S), True = attend.
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, float], jax.Array]
_BACKENDS: dict[str, AttentionFn] = {}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` available as ``backend=name`` (the seam for TPU Pallas kernels and others)."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return ["auto", *sorted(_BACKENDS)]


def joint_attention(
    streams: Sequence[tuple[jax.Array, jax.Array, jax.Array]], *, backend: str = "auto", scale: float | None = None
) -> list[jax.Array]:
    """One attention over several token streams joined along the sequence (MM-DiT joint attention): ``streams`` are
    ``(q, k, v)`` triples (B, T_i, H, D) in the order they are joined (SD3: [image, text]; Flux: [text, image]);
    returns each stream's output (B, T_i, H, D). Positions (RoPE) are applied by the caller before."""
    lengths = [q.shape[1] for q, _, _ in streams]
    q, k, v = (jnp.concatenate([s[i] for s in streams], axis=1) for i in range(3))
    out = dot_product_attention(q, k, v, backend=backend, scale=scale)
    bounds = np.cumsum(lengths)[:-1].tolist()
    return jnp.split(out, bounds, axis=1)


# T × S at and above which the portable path runs blockwise: at 1,024 tokens it is already faster than the dense
# path on XLA:CPU (BENCHMARKS.md), and beyond it the dense logits grow quadratically
BLOCKWISE_MIN_LOGITS = 1024 * 1024


def _dense_attention(q, k, v, mask, scale):
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # fp32 softmax
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, mask, scale):
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs a CUDA GPU; this process runs on {jax.default_backend()}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' needs bfloat16/float16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")


def _xla_attention(q, k, v, mask, scale):
    if q.shape[1] * k.shape[1] >= BLOCKWISE_MIN_LOGITS:
        return blockwise_attention(q, k, v, mask, scale)
    return _dense_attention(q, k, v, mask, scale)


register_backend("dense", _dense_attention)
register_backend("blockwise", blockwise_attention)
register_backend("xla", _xla_attention)
register_backend("cudnn", _cudnn_attention)
register_backend("pallas", pallas_attention)
register_backend("cpu", cpu_attention)


def _auto_backend(q: jax.Array) -> str:
    head_dim = q.shape[-1]
    if jax.default_backend() == "tpu":
        return "pallas"
    if jax.default_backend() == "cpu" and cpu_attention_available():
        return "cpu"
    if (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    kv_sharded: bool = True,
) -> jax.Array:
    """Multi-head attention ``softmax(q kᵀ · scale) v``.

    q: B T H D; k, v: B S H D; mask: None, a key mask ``(B, S)`` (1 = keep) or a bool array broadcastable to
    ``(B, H, T, S)``. ``backend``: ``auto`` (Pallas on TPU, cuDNN flash attention on GPU in bf16/fp16, the C++ kernel
    on CPU, else ``xla``), ``xla`` (dense below ``BLOCKWISE_MIN_LOGITS``, else blockwise), ``dense``, ``blockwise``,
    ``cudnn``, ``pallas``, ``cpu`` or any registered name (see the module docstring). When the mesh in context splits
    tokens (``act_length``) over devices, the backend runs sequence-parallel (``dit_jax.parallel.sequence``);
    ``kv_sharded=False`` marks keys that are a short context held whole on every device (cross-attention) rather than
    a token stream split like the queries.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if mask is not None:
        mask = mask.astype(bool)
        if mask.ndim == 2:  # key padding mask (B, S)
            mask = mask[:, None, None, :]
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {available_backends()}")
    local = functools.partial(_local_attention, backend)
    return sequence.attention(local, q, k, v, mask, scale, kv_sharded=kv_sharded)


def _local_attention(backend: str, q, k, v, mask, scale):
    """The backend on the arrays as given (each device's part under sequence parallelism)."""
    if backend == "auto":
        name = _auto_backend(q)
        if name != "xla":
            try:
                return _BACKENDS[name](q, k, v, mask, scale)
            except (NotImplementedError, ValueError, RuntimeError):
                pass  # unsupported shape/version: fall back to the portable path
        return _xla_attention(q, k, v, mask, scale)
    return _BACKENDS[backend](q, k, v, mask, scale)


class KVCompress(nn.Module):
    """PixArt-Σ key/value token compression over ``ratio × ratio`` windows of the token grid.

    ``op``: ``conv`` — depthwise R×R conv with stride R initialised to 1/R² ("Conv Avg Init"), then an affine
    LayerNorm (eps 1e-5), both shared by keys and values; ``avg`` — true R×R average pooling; ``discard`` — keep
    every R-th token along each axis. Grids not divisible by R are rejected (no silent truncation).

    Names vs the original PixArt-Σ ``sampling``: ``conv`` is ``conv``; ``discard`` is ``uniform`` and also the
    original's ``ave``, which (despite its name) is nearest-neighbour downsampling, i.e. the same stride; our
    ``avg`` (a real average) has no original counterpart.
    """

    ratio: int
    op: str
    grid: tuple[int, int]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        b, n, c = t.shape  # B N C
        h, w = self.grid
        r = self.ratio
        if h * w != n:
            raise ValueError(f"KV compression: grid {h}x{w} does not match {n} tokens")
        if h % r or w % r:
            raise ValueError(
                f"KV compression with ratio {r} needs a token grid divisible by {r}; got {h}x{w} "
                f"(latent {h}·patch x {w}·patch). Choose a size whose token grid is a multiple of {r}."
            )
        x = t.reshape(b, h, w, c)
        if self.op == "conv":
            x = nn.Conv(
                c,
                (r, r),
                strides=(r, r),
                padding="VALID",
                feature_group_count=c,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=partitioned(nn.initializers.constant(1.0 / (r * r)), (None, None, None, "heads")),
                bias_init=partitioned(zeros, ("heads",)),
                name="sr",
            )(x)
            x = x.reshape(b, -1, c)
            return LayerNorm(eps=1e-5, names=("heads",), name="norm")(x)
        if self.op == "avg":
            x = x.astype(jnp.float32).reshape(b, h // r, r, w // r, r, c).mean((2, 4)).astype(t.dtype)
        elif self.op == "discard":
            x = x[:, ::r, ::r]
        else:
            raise ValueError(f"unknown KV compression op {self.op!r}; expected 'conv', 'avg' or 'discard'")
        return x.reshape(b, -1, c)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional qk LayerNorm and KV compression.

    Parameters: ``qkv`` (D, 3, H, Dh), ``proj`` (H, Dh, D); with ``qk_norm`` the PixArt LayerNorms ``q_norm``/
    ``k_norm`` over the full width (eps 1e-5, affine); with ``kv_compress=(R, op)`` the ``KVCompress`` parameters.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    qk_norm: bool = False
    kv_compress: tuple[int, str] | None = None
    grid: tuple[int, int] | None = None
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape  # B N D
        h = self.num_heads
        dh = d // h
        if self.kv_compress is not None and self.grid is None:
            raise ValueError("SelfAttention with kv_compress needs the token grid (h, w)")
        qkv = dense(
            (3, h, dh),
            ("embed", None, "heads", "kv"),
            dtype=self.dtype,
            name="qkv",
        )(x)  # B N 3 H Dh
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = LayerNorm(eps=1e-5, names=("heads",), name="q_norm")(q.reshape(b, n, d)).reshape(b, n, h, dh)
            k = LayerNorm(eps=1e-5, names=("heads",), name="k_norm")(k.reshape(b, n, d)).reshape(b, n, h, dh)
        if self.kv_compress is not None:
            ratio, op = self.kv_compress
            compress = KVCompress(ratio, op, self.grid, dtype=self.dtype, name="compress")
            k = compress(k.reshape(b, n, d)).reshape(b, -1, h, dh)
            v = compress(v.reshape(b, n, d)).reshape(b, -1, h, dh)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, backend=self.backend)  # B N H Dh
        return dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), name="proj")(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to a context (captions) with a key mask.

    Parameters: ``q`` (D, H, Dh), ``kv`` (Dc, 2, H, Dh), ``proj`` (H, Dh, D).
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"
    zero_init_proj: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        dh = d // h
        q = dense((h, dh), ("embed", "heads", "kv"), dtype=self.dtype, name="q")(x)  # B N H Dh
        kv = dense(
            (2, h, dh),
            ("embed", None, "heads", "kv"),
            dtype=self.dtype,
            name="kv",
        )(context)  # B L 2 H Dh
        out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask, backend=self.backend, kv_sharded=False)
        init = zeros if self.zero_init_proj else None
        return dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), kernel_init=init, name="proj")(out)
