"""Embeddings: timestep sinusoid and MLP, class labels, captions, micro-conditions, patches, 2-D sin-cos positions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.nn.layers import dense, gelu_tanh, normal, partitioned, xavier_uniform


def timestep_embedding(
    t: jax.Array, dim: int = 256, *, max_period: float = 10000.0, freq_shift: float = 0.0
) -> jax.Array:
    """GLIDE sinusoid ``[cos(t·f), sin(t·f)]`` with ``f_i = exp(-ln(max_period)·i / (dim/2 − freq_shift))``.

    ``freq_shift`` is 0 in every original repo and 1 in diffusers' DiT (``downscale_freq_shift``). Computed in fp32.
    """
    half = dim // 2
    # Frequencies are host constants: the fp32 exponent (as torch computes it), exp correctly rounded to fp32. This
    # agrees with torch's fp32 exp on all but 1-2 of 128 entries, XLA's exp differs by 1 ulp on ~15, and t ≈ 1000
    # magnifies each ulp to ~3e-5 in the embedding.
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid(freq_dim) → Linear → SiLU → Linear (``linear_1``, ``linear_2``)."""

    hidden_size: int
    freq_dim: int = 256
    freq_shift: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift).astype(self.dtype)
        emb = dense(self.hidden_size, ("freq", "mlp"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_1")(emb)
        emb = nn.silu(emb)
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_2")(
            emb
        )


class SizeEmbedder(nn.Module):
    """PixArt-α micro-condition embedder: each scalar of ``s (B, k)`` → TimestepEmbedder → concat to (B, k·D)."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array, batch: int) -> jax.Array:
        s = jnp.asarray(s, jnp.float32)
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != batch:
            if batch % s.shape[0]:
                raise ValueError(f"micro-condition of batch {s.shape[0]} does not divide the batch {batch}")
            s = jnp.tile(s, (batch // s.shape[0], 1))
        b, k = s.shape
        emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="mlp")(s.reshape(-1))
        return emb.reshape(b, k * self.hidden_size)


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, index ``num_classes``, the null class used for guidance."""

    num_classes: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            partitioned(normal(0.02), ("classes", "embed")),
            (self.num_classes + 1, self.hidden_size),
            jnp.float32,
        )
        return jnp.take(table, y, axis=0).astype(self.dtype)


class CaptionProjection(nn.Module):
    """Caption MLP ``fc1 → GELU(tanh) → fc2`` mapping text-encoder features to the model width."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, caption: jax.Array) -> jax.Array:
        x = dense(self.hidden_size, ("caption", "mlp"), dtype=self.dtype, kernel_init=normal(0.02), name="fc1")(
            caption.astype(self.dtype)
        )
        x = gelu_tanh(x)
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, kernel_init=normal(0.02), name="fc2")(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens: NHWC (B, H, W, C) → (B, H/p · W/p, D)."""

    patch_size: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        b, h, w, _ = x.shape
        if h % p or w % p:
            raise ValueError(f"input of spatial size {h}x{w} is not divisible by the patch size {p}")
        x = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(xavier_uniform((0, 1, 2), 3), (None, None, None, "embed")),
            bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)),
            name="proj",
        )(x.astype(self.dtype))
        return x.reshape(b, (h // p) * (w // p), self.hidden_size)


@functools.lru_cache(maxsize=64)
def _sincos_2d(h: int, w: int, dim: int, base_size: float, interpolation: float) -> np.ndarray:
    grid_h = np.arange(h, dtype=np.float32) / (h / base_size) / interpolation
    grid_w = np.arange(w, dtype=np.float32) / (w / base_size) / interpolation
    gw, gh = np.meshgrid(grid_w, grid_h)  # (h, w) each; w first, as in the MAE/DiT code

    def sincos_1d(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([sincos_1d(gw, dim // 2), sincos_1d(gh, dim // 2)], axis=1)
    return emb.astype(np.float32)


def sincos_pos_embed(
    h: int, w: int, dim: int, *, base_size: float | None = None, interpolation: float = 1.0
) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding for an h×w token grid, (h·w, dim), row-major tokens.

    Positions are ``arange(n) / (n / base_size) / interpolation`` per axis (PixArt's ``base_size`` and
    ``pe_interpolation``; DiT is the case ``base_size = h = w``, ``interpolation = 1``). The first half of the
    channels encodes the column (w), the second half the row (h).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    if base_size is None:
        base_size = h
    return _sincos_2d(h, w, dim, float(base_size), float(interpolation))


def unpatchify(x: jax.Array, h: int, w: int, patch_size: int, channels: int) -> jax.Array:
    """(B, h·w, p·p·c) tokens laid out (p, q, c) → NHWC image (B, h·p, w·p, c)."""
    b = x.shape[0]
    p = patch_size
    x = x.reshape(b, h, w, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # B h p w q c
    return x.reshape(b, h * p, w * p, channels)


class CaptionEmbedder(nn.Module):
    """PixArt caption embedder: optional learned null caption ``y_embedding (L, C)`` and the ``y_proj`` MLP.

    ``drop`` (B,) bool replaces a row's caption by the null caption (classifier-free guidance training and
    PixArt-α's unconditional branch). Without ``project`` the caption passes through unchanged.
    """

    hidden_size: int
    caption_channels: int | None
    caption_length: int
    learned_null: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, caption: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        if self.learned_null:
            c = caption.shape[-1]
            init = lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype) / c**0.5  # noqa: E731
            null = self.param(
                "y_embedding", partitioned(init, (None, "caption")), (self.caption_length, c), jnp.float32
            )
            if drop is not None:
                if caption.shape[1] != self.caption_length:
                    raise ValueError(
                        f"caption length {caption.shape[1]} differs from the learned null caption's "
                        f"{self.caption_length} tokens; pad captions to {self.caption_length}"
                    )
                caption = jnp.where(jnp.asarray(drop, bool)[:, None, None], null[None].astype(caption.dtype), caption)
        elif drop is not None:
            raise ValueError("this model has no learned null caption; pass the null caption's embedding instead")
        if self.caption_channels is None:
            return caption.astype(self.dtype)
        return CaptionProjection(self.hidden_size, dtype=self.dtype, name="y_proj")(caption)
