"""The transformer MLP: ``fc1 → GELU(tanh) → fc2`` (timm ``Mlp``, diffusers ``gelu-approximate``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.nn.layers import dense, gelu_tanh
from dit_jax.parallel.rules import constrain


class Mlp(nn.Module):
    hidden_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = dense(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = constrain(gelu_tanh(h), ("act_batch", "act_length", "act_mlp"))
        return dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
