"""adaLN modulation (DiT's adaLN-Zero, PixArt's adaLN-single) and the final layers built on it."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.nn.layers import dense, layer_norm, modulate, partitioned, zeros
from dit_jax.parallel.rules import constrain


class AdaLNZero(nn.Module):
    """``SiLU → Linear(D, n·D)`` initialised to zero, split into ``n`` (B, D) modulation vectors.

    With n = 6 the chunks are (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); with n = 2,
    (shift, scale).
    """

    chunks: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        d = c.shape[-1]
        out = dense(self.chunks * d, ("embed", "modulation"), dtype=self.dtype, kernel_init=zeros, name="linear")(
            nn.silu(c)
        )
        # reshape + index, not jnp.split: XLA's SPMD partitioner (jax 0.10) produced wrong values for a split of
        # this tensor-sharded axis; tests/test_models.py checks sharded == unsharded.
        out = out.reshape(out.shape[0], self.chunks, d)  # B n D
        return tuple(out[:, i] for i in range(self.chunks))


def scale_shift_table(module: nn.Module, t0: jax.Array, chunks: int) -> tuple[jax.Array, ...]:
    """adaLN-single: ``module``'s learned ``scale_shift_table (n, D)`` plus ``t0 (B, n·D)``, split into n (B, D).

    The table is created in the calling module (parameter name ``scale_shift_table``), initialised
    ``randn / sqrt(D)`` as in PixArt.
    """
    d = t0.shape[-1] // chunks

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / d**0.5

    table = module.param("scale_shift_table", partitioned(init, (None, "embed")), (chunks, d), jnp.float32)
    mods = table[None].astype(t0.dtype) + t0.reshape(t0.shape[0], chunks, d)  # B n D
    return tuple(mods[:, i] for i in range(chunks))


class FinalLayer(nn.Module):
    """DiT final layer: LayerNorm(eps 1e-6) → modulate by adaLN (shift, scale) of ``c`` → Linear(D, p·p·C_out)."""

    out_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = AdaLNZero(2, dtype=self.dtype, name="adaLN_modulation")(c)
        x = modulate(layer_norm(x, 1e-6), shift, scale)
        x = dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(x)
        return constrain(x, ("act_batch", "act_length", None))


class T2IFinalLayer(nn.Module):
    """PixArt final layer: a learned (2, D) table plus the timestep embedding gives (shift, scale)."""

    out_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        shift, scale = scale_shift_table(self, jnp.tile(t, (1, 2)), 2)  # table[i] + t
        x = modulate(layer_norm(x, 1e-6), shift, scale)
        x = dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(x)
        return constrain(x, ("act_batch", "act_length", None))
