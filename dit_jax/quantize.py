"""Weight-only int8 and int4 inference: quantised Dense/Conv kernels with fp32 scales, dequantised per matmul.

``quantize_params(params, config)`` returns the same params tree with every chosen kernel replaced by an
``Int8Kernel`` (``mode="int8"``) or ``Int4Kernel`` (``mode="int4"``) node: a ``QuantizedParams`` tree. The unchanged
Linen modules run on it as on float params, ``module.apply({"params": qparams}, ...)``: a Dense casts its kernel with
``kernel.astype(dtype)`` and a Flax Conv with ``jnp.asarray(kernel, dtype)``, and an ``Int8Kernel`` answers both with
its dequantised weights; an ``Int4Kernel`` is a Flax ``AxisMetadata`` box, which ``Module.param`` unboxes into its
dequantised weights (Flax checks a stored parameter's first leaf against the kernel's shape, and packed int4 codes
have half its elements). Either way, inside jit each layer's weights are dequantised where that layer's matmul reads
them, and ``nn.scan`` slices the children like any parameter on the leading layer axis, so a scanned stack
dequantises one layer per scan step, never the whole stack.

Which kernels (``QuantizeConfig``): leaves named ``kernel`` (Dense and Conv weights; embedding tables, norms, biases
and modulation tables have other names and stay float) whose per-layer size is at least ``min_size`` elements (2^16:
smaller kernels save little and sit at a model's edges, e.g. the patch embedding and output projection of a narrow
DiT; every kernel of SD3.5, Flux and T5-XXL is larger), optionally narrowed by ``targets`` and ``exclude`` (regexes,
``re.search`` over ``/``-joined paths such as ``stage_0/attn/qkv/kernel``).

int8 scales. A kernel is ``(*stack, *in, *out)`` (``stack``: the layer axis of a scanned ``stage_{j}``). Output
channels are its trailing ``bias.ndim − len(stack)`` axes when its layer has a bias (the Dense/Conv layout), else all
axes but the first per-layer one (one input axis, the Dense default; for a bias-free multi-input kernel such as T5's
``(heads, kv, embed)`` out-projection this is finer than per output channel, which only costs scale memory). Per
channel ``c``: ``scale_c = fl32(max|w_c| / 127)`` (0 for an all-zero channel).

int4 scales: group-wise along the contracted axes. Groups are ``group_size`` (default 64) consecutive weights of the
last contracted axis, one fp32 scale per group and output channel, ``fl32(max|w_group| / 7)``: ``scale`` has the
kernel's rank with ``n / group_size`` on that axis and the full size on the other axes (e.g. a ``(4096, 3072)`` Dense
kernel has ``(64, 3072)`` scales). When ``group_size`` does not divide that axis (e.g. the 16 input channels of a
2×2 patch-embedding Conv) or is None, the kernel falls back to one group per output channel over all its contracted
axes (the int8 layout, 1 on those axes). Codes are symmetric in [−7, 7] (−8 never used), stored PACKED two per byte
(``packed`` uint8, offset binary ``q + 8``: low nibble the even, high nibble the odd position) along the last
contracted axis — never the stack axis, so slicing a scanned stack's children per layer gives a valid per-layer
kernel; an odd axis is padded with one zero code (its true length is the node's ``length``).

Rounding. ``q = round_half_to_even(w / scale)`` of the exact real quotient (an fp32 quotient can round a value
within 2^-17 of a half-integer to the wrong side; those are decided exactly, see ``_round_exact``), in [−127, 127]
or [−7, 7]. Hence ``|w − q·scale| ≤ scale / 2`` for every element, exactly. A layer computes with
``dtype(fl32(q·scale))``: the product rounded once to fp32, then cast to the compute dtype (a second rounding in bf16
compute — the same rounding the float model's bf16 cast makes).

Memory. int8: one byte per quantised weight plus 4 per output channel. int4: half a byte per weight plus 4 per group
(fp32 scales: 4/64 = 1/16 byte per weight at the default group size, 0.5625 bytes per weight in all; bf16 scales
would save 1/32 byte per weight but lose the exact error bound's fp32 arithmetic). Temporaries: one layer's
dequantised kernels. A scanned stack has that by construction. An unscanned one has it when the compiler schedules
each dequantisation next to its matmul; XLA:CPU's default concurrency-optimised scheduler instead runs them all
first (as it does the bf16 casts of float weights), so on CPU use ``scan_blocks=True`` or
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` (T5/CLIP are never scanned).

Text encoders. ``pipelines.load(quantize="int4")`` quantises the transformer to int4 and the text encoders to int8
(``text_encoder_config``): T5 is known to lose more than a DiT to 4-bit weights. An int4 text encoder is one call
away: ``pipelines.load_text_encoder(folder, quantize="int4")``, passed as ``text_encoders={"t5": ...}``.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

MODES = ("int8", "int4")
QMAX = 127  # symmetric int8: [-127, 127]
QMAX4 = 7  # symmetric int4: [-7, 7]
GROUP_SIZE = 64  # int4: weights per scale along the contracted axis
MIN_SIZE = 1 << 16
_STAGE = re.compile(r"stage_\d+")  # scanned stacks (dit_jax.nn.stack): one leading layer axis

#: A params tree whose chosen kernels are ``Int8Kernel``/``Int4Kernel`` nodes (``quantize_params``'s result).
QuantizedParams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Which kernels to quantise and how (see the module doc). ``targets``/``exclude``: regexes over parameter paths
    (``re.search``); empty ``targets``: every kernel of at least ``min_size`` elements per layer. ``group_size``
    (int4 only): weights per scale along the last contracted axis (None: one scale per output channel)."""

    mode: str = "int8"
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = MIN_SIZE
    group_size: int | None = GROUP_SIZE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize mode={self.mode!r} is invalid: expected one of {MODES}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"quantize min_size={self.min_size!r} is invalid: expected a non-negative integer")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 2):
            raise ValueError(
                f"quantize group_size={g!r} is invalid: expected an integer ≥ 2 (weights per int4 scale along the "
                "contracted axis) or None (one scale per output channel)"
            )
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
    """``None`` → None (float weights), ``"int8"``/``"int4"`` → the default ``QuantizeConfig`` of that mode, a
    ``QuantizeConfig`` → itself; anything else is one clear error (what ``pipelines.load(quantize=...)`` accepts)."""
    if quantize is None or isinstance(quantize, QuantizeConfig):
        return quantize
    if isinstance(quantize, str) and quantize in MODES:
        return QuantizeConfig(mode=quantize)
    raise ValueError(
        f"quantize={quantize!r} is invalid: expected None (float weights), one of {list(MODES)} or a "
        "dit_jax.quantize.QuantizeConfig"
    )


def text_encoder_config(quantize: Any) -> QuantizeConfig | None:
    """The config ``pipelines.load`` gives the text encoders: int8 when the transformer is int4 (the same targets,
    exclusions and size bar), else ``quantize`` itself."""
    config = quantize_config(quantize)
    if config is not None and config.mode == "int4":
        return dataclasses.replace(config, mode="int8")
    return config


# ---- the quantised kernel ----------------------------------------------------------------------------------------


class _QuantizedKernel:
    """What ``Int8Kernel`` and ``Int4Kernel`` share: sizes derived from ``shape`` and the stored arrays
    (``_stored``), and the float views of ``dequantize``."""

    shape: tuple[int, ...]

    def _stored(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes plus the fp32 scales."""
        return sum(_bytes(x) for x in self._stored())

    def astype(self, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)

    def __jax_array__(self) -> jax.Array:
        return self.dequantize(jnp.float32)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class Int8Kernel(_QuantizedKernel):
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

    def _stored(self) -> tuple[Any, ...]:
        return self.values, self.scale

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """``dtype(fl32(q·scale))`` (the kernel's shape)."""
        return (self.values.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)

    def __repr__(self) -> str:
        return f"Int8Kernel(shape={self.shape}, scale={tuple(np.shape(self.scale))})"


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class Int4Kernel(_QuantizedKernel, meta.AxisMetadata):
    """An int4 kernel: ``packed`` uint8 (two codes a byte along ``axis``), ``scale`` fp32 (the kernel's rank; the
    group count on ``axis``, 1 on contracted axes a scale spans), ``axis`` (the packed axis, counted from the end: a
    scanned stack's leading layer axis never shifts it) and ``length`` (the kernel's size on ``axis``).

    Stands in for the float kernel in a params tree: as a Flax ``AxisMetadata`` box it is unboxed by
    ``Module.param`` into the dequantised weights ``fl32(q·scale)`` (the kernel's shape, which Flax checks), and
    ``astype(dtype)``/``__jax_array__`` give the same. As a pytree it flattens like ``{"packed", "scale"}`` (``axis``
    and ``length`` are static), so ``jit``, ``device_put`` and ``nn.scan`` (which slices both children on the layer
    axis) handle it. The children may also be shapes (``jax.ShapeDtypeStruct``) or shardings.
    """

    packed: Any
    scale: Any
    axis: int = -1
    length: int = 0

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.DictKey
        return ((keys("packed"), self.packed), (keys("scale"), self.scale)), (self.axis, self.length)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.packed.shape)
        shape[self.axis] = self.length
        return tuple(shape)

    def _stored(self) -> tuple[Any, ...]:
        return self.packed, self.scale

    def codes(self) -> jax.Array:
        """The int8 codes in [−7, 7] (the kernel's shape)."""
        return _unpack(self.packed, self.axis % self.ndim, self.length)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """``dtype(fl32(q·scale))`` (the kernel's shape)."""
        shape, a = self.shape, self.axis % self.ndim
        groups = np.shape(self.scale)[a]
        q = self.codes().astype(jnp.float32).reshape(*shape[:a], groups, shape[a] // groups, *shape[a + 1 :])
        w = q * jnp.expand_dims(jnp.asarray(self.scale, jnp.float32), a + 1)
        return w.reshape(shape).astype(dtype)

    # AxisMetadata: what Module.param sees; a transform's added or removed leading axis leaves axis/length as they are
    def unbox(self) -> jax.Array:
        return self.dequantize(jnp.float32)

    def replace_boxed(self, val: Any) -> Any:
        raise TypeError("an Int4Kernel cannot box new values: dequantize it (dit_jax.quantize.dequantize_params)")

    def add_axis(self, index: int, params: dict[Any, Any]) -> "Int4Kernel":
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "Int4Kernel":
        return self

    def __repr__(self) -> str:
        return f"Int4Kernel(shape={self.shape}, scale={tuple(np.shape(self.scale))}, axis={self.axis})"


def _bytes(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _is_kernel(x: Any) -> bool:
    return isinstance(x, (Int8Kernel, Int4Kernel))


# ---- int4 packing ------------------------------------------------------------------------------------------------


def _pack(q: Any, axis: int, xp: Any = jnp) -> Any:
    """int8 codes in [−7, 7] → uint8, two a byte along ``axis`` (≥ 0): ``(q[2j] + 8) | (q[2j+1] + 8) << 4``; an odd
    axis gets one zero code appended."""
    shape = list(q.shape)
    if shape[axis] % 2:
        pad = [(0, 0)] * len(shape)
        pad[axis] = (0, 1)
        q = xp.pad(q, pad)
        shape[axis] += 1
    pairs = (q + xp.int8(8)).astype(xp.uint8).reshape(*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1 :])
    lo = xp.take(pairs, 0, axis=axis + 1)
    hi = xp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << xp.uint8(4))).astype(xp.uint8)


def _unpack(packed: Any, axis: int, length: int, xp: Any = jnp) -> Any:
    """``_pack``'s inverse: int8 codes with ``length`` elements on ``axis`` (≥ 0)."""
    b = xp.asarray(packed)
    lo = (b & xp.uint8(15)).astype(xp.int8) - xp.int8(8)
    hi = (b >> xp.uint8(4)).astype(xp.int8) - xp.int8(8)
    shape = list(b.shape)
    shape[axis] *= 2
    q = xp.stack([lo, hi], axis=axis + 1).reshape(shape)
    if length != shape[axis]:
        q = q[(slice(None),) * axis + (slice(0, length),)]
    return q


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


def _codes(w: Any, scale: Any, xp: Any = jnp, qmax: int = QMAX) -> Any:
    """int8 ``round_half_to_even(w / scale)``, clipped to ±qmax (never reached beyond: |w| ≤ qmax·scale·(1 + 2^-24))."""
    safe = xp.where(scale > 0, scale, xp.float32(1))  # an all-zero channel: q = 0 (its scale stays 0)
    return xp.clip(_round_exact(w.astype(xp.float32), safe, xp), -qmax, qmax).astype(xp.int8)


def _scale(absmax: np.ndarray, qmax: int = QMAX) -> np.ndarray:
    """``fl32(absmax / qmax)``, divided by NumPy: XLA turns a division by a broadcast value into a multiplication by
    its rounded reciprocal, which can differ by one ulp."""
    return (np.asarray(absmax, np.float32) / np.float32(qmax)).astype(np.float32)


_absmax_jit = jax.jit(_absmax, static_argnames=("axes",))
_codes_jit = jax.jit(_codes, static_argnames=("xp", "qmax"))
_pack_jit = jax.jit(_pack, static_argnames=("axis", "xp"))
NUMPY_BELOW = 1 << 20  # smaller host arrays: NumPy (no compile); larger: XLA on the host CPU (fused, threaded)


def quantize_array(
    w: Any, axes: tuple[int, ...], mode: str = "int8", group_size: int | None = GROUP_SIZE
) -> Int8Kernel | Int4Kernel:
    """``w`` (float) → ``Int8Kernel`` with one scale per slice over the contracted ``axes`` (reduced, kept as 1), or
    (``mode="int4"``) ``Int4Kernel`` with one scale per ``group_size`` weights of the last contracted axis (one per
    slice when ``group_size`` does not divide that axis, or is None), packed along that axis.

    A NumPy array is quantised on the host CPU, to NumPy arrays (the float weights never reach an accelerator); a
    ``jax.Array`` where it lives (its scales pass through the host); a ``jax.ShapeDtypeStruct`` gives the shapes."""
    if mode not in MODES:
        raise ValueError(f"quantize mode={mode!r} is invalid: expected one of {MODES}")
    shape = tuple(np.shape(w))
    axes = tuple(sorted(int(a) % len(shape) for a in axes))
    if mode == "int8":
        gshape, reduce, qmax = shape, axes, QMAX
        scale_shape = tuple(1 if i in axes else s for i, s in enumerate(shape))
    else:  # int4: (…, groups, group, …) on the last contracted axis a; the scale reduces the group axis a + 1
        a, qmax = axes[-1], QMAX4
        by_group = bool(group_size) and shape[a] % group_size == 0
        g = group_size if by_group else shape[a]
        gshape = (*shape[:a], shape[a] // g, g, *shape[a + 1 :])
        reduce = (a + 1,) if by_group else (*axes[:-1], a + 1)  # ungrouped: one scale per output channel
        scale_shape = tuple(1 if i in reduce else s for i, s in enumerate(gshape) if i != a + 1)

    def node(values: Any, scale: Any) -> Int8Kernel | Int4Kernel:
        if mode == "int8":
            return Int8Kernel(values, scale)
        return Int4Kernel(values, scale.reshape(scale_shape), a - len(shape), shape[a])

    if isinstance(w, jax.ShapeDtypeStruct):
        if mode == "int8":
            return Int8Kernel(jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(scale_shape, jnp.float32))
        packed = (*shape[:a], -(-shape[a] // 2), *shape[a + 1 :])
        s = jax.ShapeDtypeStruct(scale_shape, jnp.float32)
        return Int4Kernel(jax.ShapeDtypeStruct(packed, jnp.uint8), s, a - len(shape), shape[a])
    if isinstance(w, jax.Array):
        wg = w.reshape(gshape)
        scale = _scale(_absmax_jit(wg, reduce), qmax)
        q = _codes_jit(wg, scale, qmax=qmax).reshape(shape)
        return node(q if mode == "int8" else _pack_jit(q, a), jnp.asarray(scale))
    wg = np.asarray(w).reshape(gshape)
    if wg.size < NUMPY_BELOW:
        with np.errstate(invalid="ignore"):  # non-finite weights are reported by the caller
            scale = _scale(_absmax(wg, reduce, np), qmax)
            q = _codes(wg, scale, np, qmax).reshape(shape)
            return node(q if mode == "int8" else _pack(q, a, np), scale)
    with jax.default_device(jax.devices("cpu")[0]):
        scale = _scale(_absmax_jit(wg, reduce), qmax)
        q = _codes_jit(wg, scale, qmax=qmax).reshape(shape)
        return node(np.asarray(q if mode == "int8" else _pack_jit(q, a)), scale)


# ---- params trees ------------------------------------------------------------------------------------------------


def _unbox(x: Any) -> Any:
    """A logical-axis box's value (an ``Int4Kernel``, itself a box, stays as it is)."""
    return x.value if _is_box(x) else x


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


def quantize_kernel(
    path: str, kernel: Any, bias_shape: tuple[int, ...] | None, config: QuantizeConfig
) -> Int8Kernel | Int4Kernel:
    """The kernel at ``path`` (one ``select`` chose; ``bias_shape``: its sibling bias's shape or None) quantised as
    ``quantize_params`` does; one error if it is not finite. For callers that produce a tree leaf by leaf (the
    checkpoint importers), so the float kernels are never all held at once."""
    qk = quantize_array(
        kernel, contracted_axes(path, tuple(np.shape(kernel)), bias_shape), config.mode, config.group_size
    )
    if not isinstance(qk.scale, jax.ShapeDtypeStruct) and not np.isfinite(np.asarray(qk.scale)).all():
        raise ValueError(f"quantize: {path} has non-finite weights (inf or nan)")
    return qk


def quantize_params(params: Mapping, config: QuantizeConfig | str = "int8") -> QuantizedParams:
    """``params`` with the kernels ``config`` chooses replaced by ``Int8Kernel`` or ``Int4Kernel`` nodes (nested
    dicts; everything else unchanged, boxes of logical-axis metadata removed from the quantised kernels). Already
    quantised kernels stay as they are. One error when nothing is chosen, a ``targets`` pattern matches nothing, or
    a kernel is not finite."""
    config = quantize_config(config)
    if config is None:
        raise ValueError(f"quantize_params needs a mode: one of {list(MODES)} or a QuantizeConfig (None: float)")
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
                bias = tree.get("bias")
                bias_shape = None if bias is None else tuple(np.shape(_unbox(bias)))
                out[name] = quantize_kernel(path, _unbox(value), bias_shape, config)
            else:
                out[name] = value
        return out

    return walk(params, "")


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
    """Every ``Int8Kernel``/``Int4Kernel`` replaced by its dequantised weights ``dtype(fl32(q·scale))`` (all at once:
    a reference for tests, not the inference path; one compiled function for the tree's kernels)."""
    kernels = [x for x in jax.tree.leaves(params, is_leaf=_is_kernel) if _is_kernel(x)]
    dense = iter(_dequantize_all(kernels, jnp.dtype(dtype)))
    return jax.tree.map(lambda x: next(dense) if _is_kernel(x) else x, params, is_leaf=_is_kernel)


_dequantize_all = jax.jit(lambda kernels, dtype: [k.dequantize(dtype) for k in kernels], static_argnums=1)


def quantized_paths(params: Any) -> list[str]:
    """``/``-joined paths of the ``Int8Kernel``/``Int4Kernel`` nodes of a tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_kernel)
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in leaves if _is_kernel(x)]


def nbytes(params: Any) -> int:
    """Bytes of a (possibly quantised, possibly abstract) params tree."""
    leaves = jax.tree.leaves(jax.tree.map(_unbox, params, is_leaf=lambda x: _is_kernel(x) or _is_box(x)))
    return sum(_bytes(x) for x in leaves)


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata) and not _is_kernel(x)


def quantized_shardings(params: Any, shardings: Any) -> Any:
    """Shardings (or ``PartitionSpec``s) for a quantised tree from those of its float tree: an ``Int8Kernel``'s
    ``values`` get the kernel's, its ``scale`` the same with the contracted (size-1) axes unsharded; an
    ``Int4Kernel``'s ``packed`` and ``scale`` get the kernel's less size-1 axes and, for a ``NamedSharding``, less the
    mesh axes that do not divide their sizes (the packed axis is half the kernel's, the group axis has one entry per
    group). Bare ``PartitionSpec``s name no mesh: those sizes are the caller's to check."""
    from jax.sharding import Sharding

    def fit(sharding: Any, p: Any) -> Any:
        if not _is_kernel(p):
            return sharding
        int8 = isinstance(p, Int8Kernel)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        if not isinstance(spec, PartitionSpec):  # a replicated or single-device sharding fits both
            return Int8Kernel(sharding, sharding) if int8 else dataclasses.replace(p, packed=sharding, scale=sharding)
        axes = tuple(spec) + (None,) * (p.ndim - len(spec))
        mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None

        def fitted(shape: tuple[int, ...]) -> Any:
            out = []
            for a, n in zip(axes, shape):
                names = (a,) if isinstance(a, str) else tuple(a or ())
                size = int(np.prod([mesh.shape[m] for m in names])) if mesh is not None and names else 1
                out.append(None if n == 1 or n % size else a)
            return PartitionSpec(*out) if mesh is None else NamedSharding(mesh, PartitionSpec(*out))

        if int8:
            return Int8Kernel(sharding, fitted(np.shape(p.scale)))
        return dataclasses.replace(p, packed=fitted(np.shape(p.packed)), scale=fitted(np.shape(p.scale)))

    is_leaf = lambda x: isinstance(x, (Sharding, PartitionSpec))  # noqa: E731
    return jax.tree.map(fit, shardings, params, is_leaf=is_leaf)
