"""Weight-only int8 inference: int8 Dense/Conv kernels with per-output-channel fp32 scales, dequantised per matmul.

``quantize_params(params, config)`` returns the same params tree with every chosen kernel replaced by an
``Int8Kernel`` node (``values`` int8 of the kernel's shape, ``scale`` fp32 of the kernel's rank with 1 on the
contracted axes): a ``QuantizedParams`` tree. The unchanged Linen modules run on it as on float params,
``module.apply({"params": qparams}, ...)``: a Dense casts its kernel with ``kernel.astype(dtype)`` and a Flax Conv
with ``jnp.asarray(kernel, dtype)``, and an ``Int8Kernel`` answers both with its dequantised weights — so inside jit
each layer's weights are dequantised where that layer's matmul reads them, and ``nn.scan`` slices ``values`` and
``scale`` like any parameter, so a scanned stack dequantises one layer per scan step, never the whole stack.

Which kernels (``QuantizeConfig``): leaves named ``kernel`` (Dense and Conv weights; embedding tables, norms, biases
and modulation tables have other names and stay float) whose per-layer size is at least ``min_size`` elements (2^16:
smaller kernels save little and sit at a model's edges, e.g. the patch embedding and output projection of a narrow
DiT; every kernel of SD3.5, Flux and T5-XXL is larger), optionally narrowed by ``targets`` and ``exclude`` (regexes,
``re.search`` over ``/``-joined paths such as ``stage_0/attn/qkv/kernel``).

Scales. A kernel is ``(*stack, *in, *out)`` (``stack``: the layer axis of a scanned ``stage_{j}``). Output channels
are its trailing ``bias.ndim − len(stack)`` axes when its layer has a bias (the Dense/Conv layout), else all axes but
the first per-layer one (one input axis, the Dense default; for a bias-free multi-input kernel such as T5's
``(heads, kv, embed)`` out-projection this is finer than per output channel, which only costs scale memory). Per
channel ``c``: ``scale_c = fl32(max|w_c| / 127)`` (0 for an all-zero channel).

Rounding. ``q = round_half_to_even(w / scale)`` of the exact real quotient (an fp32 quotient can round a value
within 2^-17 of a half-integer to the wrong side; those are decided exactly, see ``_round_exact``), in [−127, 127]
(−128 is never used: symmetric). Hence ``|w − q·scale| ≤ scale / 2`` for every element, exactly. A layer computes
with ``dtype(fl32(q·scale))``: the product rounded once to fp32, then cast to the compute dtype (a second rounding
in bf16 compute — the same rounding the float model's bf16 cast makes).

Memory. One byte per quantised weight plus 4 per output channel; temporaries of one layer's dequantised kernels. A
scanned stack has that by construction. An unscanned one has it when the compiler schedules each dequantisation
next to its matmul; XLA:CPU's default concurrency-optimised scheduler instead runs them all first (as it does the
bf16 casts of float weights), so on CPU use ``scan_blocks=True`` or
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` (T5/CLIP are never scanned).
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MODES = ("int8",)
QMAX = 127  # symmetric int8: [-127, 127]
MIN_SIZE = 1 << 16
_STAGE = re.compile(r"stage_\d+")  # scanned stacks (dit_jax.nn.stack): one leading layer axis

#: A params tree whose chosen kernels are ``Int8Kernel`` nodes (``quantize_params``'s result).
QuantizedParams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Which kernels to quantise and how (see the module doc). ``targets``/``exclude``: regexes over parameter paths
    (``re.search``); empty ``targets``: every kernel of at least ``min_size`` elements per layer."""

    mode: str = "int8"
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = MIN_SIZE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize mode={self.mode!r} is invalid: expected one of {MODES}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"quantize min_size={self.min_size!r} is invalid: expected a non-negative integer")
        for field in ("targets", "exclude"):
            patterns = getattr(self, field)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"quantize {field} pattern {pattern!r} is not a regular expression: {e}") from e
            object.__setattr__(self, field, patterns)


def quantize_config(quantize: Any) -> QuantizeConfig | None:
    """``None`` → None (float weights), ``"int8"`` → the default ``QuantizeConfig``, a ``QuantizeConfig`` → itself;
    anything else is one clear error (what ``pipelines.load(quantize=...)`` accepts)."""
    if quantize is None or isinstance(quantize, QuantizeConfig):
        return quantize
    if isinstance(quantize, str) and quantize in MODES:
        return QuantizeConfig(mode=quantize)
    raise ValueError(
        f"quantize={quantize!r} is invalid: expected None (float weights), one of {list(MODES)} or a "
        "dit_jax.quantize.QuantizeConfig"
    )


# ---- the quantised kernel ----------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class Int8Kernel:
    """An int8 kernel: ``values`` int8 (the kernel's shape), ``scale`` fp32 (same rank, 1 on the contracted axes).

    Stands in for the float kernel in a params tree: ``astype(dtype)`` (what ``dit_jax.nn.layers.Dense`` calls) and
    ``__jax_array__`` (what ``jnp.asarray`` in a Flax Conv calls) give the dequantised weights ``fl32(q·scale)``. As a
    pytree it flattens like the dict ``{"values", "scale"}`` (values first: Flax checks the first leaf's shape against
    the kernel's), so ``jit``, ``device_put`` and ``nn.scan`` (which slices both on the layer axis) handle it. The
    children may also be shapes (``jax.ShapeDtypeStruct``) or shardings.
    """

    values: Any
    scale: Any

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.DictKey
        return ((keys("values"), self.values), (keys("scale"), self.scale)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held: the int8 values plus the fp32 scales."""
        return _bytes(self.values) + _bytes(self.scale)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """``dtype(fl32(q·scale))`` (the kernel's shape)."""
        return (self.values.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)

    def astype(self, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)

    def __jax_array__(self) -> jax.Array:
        return self.dequantize(jnp.float32)

    def __repr__(self) -> str:
        return f"Int8Kernel(shape={self.shape}, scale={tuple(np.shape(self.scale))})"


def _bytes(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _is_kernel(x: Any) -> bool:
    return isinstance(x, Int8Kernel)


# ---- rounding ----------------------------------------------------------------------------------------------------


def _round_exact(w: Any, scale: Any, xp: Any = jnp) -> Any:
    """``round_half_to_even(w / scale)`` of the exact quotient (fp32 ``w``; fp32 ``scale`` > 0, broadcastable), with
    ``xp`` NumPy or ``jax.numpy`` (the same IEEE float32 operations either way).

    The fp32 quotient ``t`` is within 2^-17 of the real one (|t| ≤ 127.5), so ``rint(t)`` is right unless ``t`` lies
    within 2^-8 of a half-integer ``c``. There the sign of ``w − c·scale`` decides, computed exactly in fp32: with
    ``scale = hi + lo`` (``hi`` its leading 12 significant bits, ``lo`` the rest, ≤ 12 bits) and ``c`` a half-integer
    of at most 8 significant bits, ``c·hi`` and ``c·lo`` are exact; ``w − c·hi`` is exact because ``w`` and ``c·hi``
    are within a factor 2 of each other (Sterbenz); comparing it with ``c·lo`` is exact. (Exactness assumes normal,
    not subnormal, scales.)
    """
    t = w / scale
    lo = xp.floor(t)
    c = lo + xp.float32(0.5)
    if xp is np:
        hi = (scale.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
    else:
        bits = jax.lax.bitcast_convert_type(scale, jnp.uint32) & jnp.uint32(0xFFFFF000)
        hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    a, b = w - c * hi, c * (scale - hi)  # w − c·scale = a − b, both exact
    even = xp.where(xp.fmod(lo, xp.float32(2)) == 0, lo, lo + 1)
    decided = xp.where(a > b, lo + 1, xp.where(a < b, lo, even))
    return xp.where(xp.abs(t - c) < xp.float32(2.0**-8), decided, xp.rint(t))


def _absmax(w: Any, axes: tuple[int, ...], xp: Any = jnp) -> Any:
    return xp.max(xp.abs(w.astype(xp.float32)), axis=axes, keepdims=True)


def _codes(w: Any, scale: Any, xp: Any = jnp) -> Any:
    """int8 ``round_half_to_even(w / scale)``, clipped to ±127 (never reached beyond: |w| ≤ 127·scale·(1 + 2^-24))."""
    safe = xp.where(scale > 0, scale, xp.float32(1))  # an all-zero channel: q = 0 (its scale stays 0)
    return xp.clip(_round_exact(w.astype(xp.float32), safe, xp), -QMAX, QMAX).astype(xp.int8)


def _scale(absmax: np.ndarray) -> np.ndarray:
    """``fl32(absmax / 127)``, divided by NumPy: XLA turns a division by a broadcast value into a multiplication by
    its rounded reciprocal, which can differ by one ulp."""
    return (np.asarray(absmax, np.float32) / np.float32(QMAX)).astype(np.float32)


_absmax_jit = jax.jit(_absmax, static_argnames=("axes",))
_codes_jit = jax.jit(_codes)
NUMPY_BELOW = 1 << 20  # smaller host arrays: NumPy (no compile); larger: XLA on the host CPU (fused, threaded)


def quantize_array(w: Any, axes: tuple[int, ...]) -> Int8Kernel:
    """``w`` (float) → ``Int8Kernel`` with one scale per slice over the contracted ``axes`` (reduced, kept as 1).

    A NumPy array is quantised on the host CPU, to NumPy arrays (the float weights never reach an accelerator); a
    ``jax.Array`` where it lives (its scales pass through the host); a ``jax.ShapeDtypeStruct`` gives the shapes."""
    axes = tuple(sorted(int(a) % len(np.shape(w)) for a in axes))
    scale_shape = tuple(1 if i in axes else s for i, s in enumerate(np.shape(w)))
    if isinstance(w, jax.ShapeDtypeStruct):
        return Int8Kernel(jax.ShapeDtypeStruct(w.shape, jnp.int8), jax.ShapeDtypeStruct(scale_shape, jnp.float32))
    if isinstance(w, jax.Array):
        scale = _scale(_absmax_jit(w, axes))
        return Int8Kernel(_codes_jit(w, scale), jnp.asarray(scale))
    w = np.asarray(w)
    if w.size < NUMPY_BELOW:
        with np.errstate(invalid="ignore"):  # non-finite weights are reported by the caller
            scale = _scale(_absmax(w, axes, np))
            return Int8Kernel(_codes(w, scale, np), scale)
    with jax.default_device(jax.devices("cpu")[0]):
        scale = _scale(_absmax_jit(w, axes))
        return Int8Kernel(np.asarray(_codes_jit(w, scale)), scale)


# ---- params trees ------------------------------------------------------------------------------------------------


def _unbox(x: Any) -> Any:
    from flax.linen import meta

    return x.value if isinstance(x, meta.AxisMetadata) else x


def contracted_axes(path: str, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The axes of the kernel at ``path`` that its scale reduces over (see the module doc)."""
    n_stack = 1 if any(_STAGE.fullmatch(p) for p in path.split("/")) else 0
    ndim = len(kernel_shape)
    n_out = ndim - n_stack - 1
    if bias_shape is not None:
        k = len(bias_shape) - n_stack
        if 1 <= k < ndim - n_stack and tuple(kernel_shape[ndim - k :]) == tuple(bias_shape[n_stack:]):
            n_out = k
    return tuple(range(n_stack, ndim - n_out))


def _kernels(tree: Mapping, prefix: str = ""):
    """``(path, kernel, bias or None)`` of every leaf named ``kernel`` (bias: its sibling ``bias``)."""
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            yield from _kernels(value, path)
        elif name == "kernel":
            yield path, value, tree.get("bias")


def _per_layer_size(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(per-layer ndim, per-layer size) of a kernel (the layer axis of a scanned stack left out)."""
    n_stack = 1 if any(_STAGE.fullmatch(p) for p in path.split("/")) else 0
    layer = shape[n_stack:]
    return len(layer), int(np.prod(layer, dtype=np.int64))


def select(params: Mapping, config: QuantizeConfig | str = "int8") -> list[str]:
    """The sorted paths of the kernels ``quantize_params`` quantises (one error if a ``config.targets`` pattern
    matches no kernel)."""
    config = quantize_config(config)
    if not isinstance(params, Mapping):
        raise TypeError(f"quantize: expected a params tree (nested dicts), got {type(params).__name__}")
    chosen, kernels = [], list(_kernels(params))
    for pattern in config.targets:
        if not any(re.search(pattern, path) for path, _, _ in kernels):
            some = ", ".join(path for path, _, _ in kernels[:4])
            raise ValueError(f"quantize target {pattern!r} matches no kernel (kernels are e.g. {some})")
    for path, kernel, _ in kernels:
        kernel = _unbox(kernel)
        if _is_kernel(kernel) or not jnp.issubdtype(kernel.dtype, jnp.floating):
            continue
        ndim, size = _per_layer_size(path, tuple(np.shape(kernel)))
        if ndim < 2 or size < config.min_size:
            continue
        if config.targets and not any(re.search(p, path) for p in config.targets):
            continue
        if any(re.search(p, path) for p in config.exclude):
            continue
        chosen.append(path)
    return sorted(chosen)


def quantize_params(params: Mapping, config: QuantizeConfig | str = "int8") -> QuantizedParams:
    """``params`` with the kernels ``config`` chooses replaced by ``Int8Kernel`` nodes (nested dicts; everything else
    unchanged, boxes of logical-axis metadata removed from the quantised kernels). Already quantised kernels stay as
    they are. One error when nothing is chosen, a ``targets`` pattern matches nothing, or a kernel is not finite."""
    config = quantize_config(config)
    if config is None:
        raise ValueError("quantize_params needs a mode: 'int8' or a QuantizeConfig (None means float weights)")
    chosen = set(select(params, config))
    if not chosen:
        if quantized_paths(params):
            return params  # quantised already
        sizes = [_per_layer_size(p, tuple(np.shape(_unbox(k)))) for p, k, _ in _kernels(params)]
        largest = max((s for _, s in sizes), default=0)
        raise ValueError(
            f"quantize: no kernel to quantise: of {len(sizes)} kernels the largest has {largest} elements per layer; "
            f"min_size={config.min_size}, targets={list(config.targets)}, exclude={list(config.exclude)}"
        )

    def walk(tree: Mapping, prefix: str) -> dict[str, Any]:
        out = {}
        for name, value in tree.items():
            path = f"{prefix}/{name}" if prefix else str(name)
            if isinstance(value, Mapping):
                out[name] = walk(value, path)
            elif path in chosen:
                kernel, bias = _unbox(value), tree.get("bias")
                bias_shape = None if bias is None else tuple(np.shape(_unbox(bias)))
                qk = quantize_array(kernel, contracted_axes(path, tuple(np.shape(kernel)), bias_shape))
                if not isinstance(qk.scale, jax.ShapeDtypeStruct) and not np.isfinite(np.asarray(qk.scale)).all():
                    raise ValueError(f"quantize: {path} has non-finite weights (inf or nan)")
                out[name] = qk
            else:
                out[name] = value
        return out

    return walk(params, "")


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
    """Every ``Int8Kernel`` replaced by its dequantised weights ``dtype(fl32(q·scale))`` (all at once: a reference
    for tests, not the inference path)."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if _is_kernel(x) else x, params, is_leaf=_is_kernel)


def quantized_paths(params: Any) -> list[str]:
    """``/``-joined paths of the ``Int8Kernel`` nodes of a tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_kernel)
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in leaves if _is_kernel(x)]


def nbytes(params: Any) -> int:
    """Bytes of a (possibly quantised, possibly abstract) params tree."""
    leaves = jax.tree.leaves(jax.tree.map(_unbox, params, is_leaf=lambda x: _is_kernel(x) or _is_box(x)))
    return sum(_bytes(x) for x in leaves)


def _is_box(x: Any) -> bool:
    from flax.linen import meta

    return isinstance(x, meta.AxisMetadata)


def quantized_shardings(params: Any, shardings: Any) -> Any:
    """Shardings (or ``PartitionSpec``s) for a quantised tree from those of its float tree: an ``Int8Kernel``'s
    ``values`` get the kernel's, its ``scale`` the same with the contracted (size-1) axes unsharded."""
    from jax.sharding import Sharding

    def fit(sharding: Any, p: Any) -> Any:
        if not _is_kernel(p):
            return sharding
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        if not isinstance(spec, PartitionSpec):  # a replicated or single-device sharding fits both
            return Int8Kernel(sharding, sharding)
        axes = tuple(spec) + (None,) * (p.ndim - len(spec))
        scale = PartitionSpec(*(None if n == 1 else a for a, n in zip(axes, np.shape(p.scale))))
        if isinstance(sharding, NamedSharding):
            return Int8Kernel(sharding, NamedSharding(sharding.mesh, scale))
        return Int8Kernel(spec, scale)

    is_leaf = lambda x: isinstance(x, (Sharding, PartitionSpec))  # noqa: E731
    return jax.tree.map(fit, shardings, params, is_leaf=is_leaf)
