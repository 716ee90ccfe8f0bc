"""Small layer helpers: partitioned initialisers, Dense factories, fp32 LayerNorm, tanh-GELU.

Numerics are written out on purpose (DESIGN.md rule 5): Flax and torch disagree on LayerNorm eps and on the GELU
approximation, so nothing here relies on a library default.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.nn import cpu_dense

Names = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def xavier_uniform(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
    """torch.nn.init.xavier_uniform_ on the matrix (fan_in = prod(in_axis), fan_out = prod(out_axis))."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def partitioned(init, names: Names):
    """Attach logical axis names to an initialiser."""
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """``y = x·W + b`` contracting ``axis`` of x with the leading kernel axes; kernel (*in_dims, *features).

    Parameters are float32 and carry the logical ``names`` (input axes first, then output axes; the bias takes the
    output part). The default init is torch's xavier_uniform with fan_in = prod(in_dims), fan_out = prod(features).
    Large fp32 products on CPU run on the BLAS kernel of ``dit_jax.nn.cpu_dense``, the rest on XLA's dot.
    """

    features: tuple[int, ...]
    names: Names
    axis: tuple[int, ...] = (-1,)
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = zeros
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(a % x.ndim for a in self.axis)
        n_in, n_out = len(axes), len(self.features)
        if len(self.names) != n_in + n_out:
            raise ValueError(f"{self.name}: {len(self.names)} axis names for a rank-{n_in + n_out} kernel")
        shape = tuple(x.shape[a] for a in axes) + tuple(self.features)
        init = self.kernel_init or xavier_uniform(tuple(range(n_in)), tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", partitioned(init, self.names), shape, jnp.float32)
        y = cpu_dense.dense_product(x.astype(self.dtype), kernel.astype(self.dtype), axes)
        if self.use_bias:
            bias = self.param("bias", partitioned(self.bias_init, self.names[n_in:]), self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(
    features: int | Sequence[int],
    names: Names,
    *,
    dtype,
    axis: int | Sequence[int] = -1,
    kernel_init: Initializer | None = None,
    bias_init: Initializer = zeros,
    use_bias: bool = True,
    name: str | None = None,
) -> Dense:
    """Shorthand for ``Dense`` accepting ints for ``features``/``axis``."""
    return Dense(
        features=(features,) if isinstance(features, int) else tuple(features),
        names=names,
        axis=(axis,) if isinstance(axis, int) else tuple(axis),
        dtype=dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        use_bias=use_bias,
        name=name,
    )


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters; statistics in fp32, result in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm (torch semantics, explicit eps); statistics in fp32, fp32 scale/bias."""

    eps: float
    names: Names = ("embed",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(ones, self.names), (d,), jnp.float32)
        bias = self.param("bias", partitioned(zeros, self.names), (d,), jnp.float32)
        y = layer_norm(x.astype(jnp.float32), self.eps) * scale + bias
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm ``scale · x / √(mean(x²) + eps)`` (T5's LayerNorm; SD3.5/Flux qk-norm over head_dim): no mean
    subtraction, no bias; fp32 statistics and scale, output in ``dtype`` (None: the input's)."""

    eps: float = 1e-6
    dtype: jnp.dtype | None = jnp.float32
    names: Names = ("embed",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(ones, self.names), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype or x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch ``approximate="tanh"``)."""
    return jax.nn.gelu(x, approximate=True)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale are (B, D) or already broadcastable."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


#: dtype names a config, a call or a command line may use → the canonical name
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def dtype_names(allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> list[str]:
    """The names (long and short) of the ``allowed`` canonical dtypes, sorted."""
    return sorted(k for k, v in DTYPE_NAMES.items() if v in allowed)


def canonical_dtype(name: str, *, allowed: tuple[str, ...] = ("float32", "bfloat16", "float16"), what="dtype") -> str:
    """``"bf16"`` → ``"bfloat16"`` etc.; a name outside ``allowed`` is one error naming ``what``."""
    if name not in dtype_names(allowed):
        raise ValueError(f"{what}={name!r} is invalid: expected one of {dtype_names(allowed)}")
    return DTYPE_NAMES[name]


def compute_dtype(name: str):
    """Map a config dtype name (``float32``/``fp32``/``bfloat16``/``bf16``/``float16``/``fp16``) to a JAX dtype."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return getattr(jnp, DTYPE_NAMES[name])
