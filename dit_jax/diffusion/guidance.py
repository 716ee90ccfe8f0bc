"""Classifier-free guidance as a wrapper that turns a conditional model into the ``model_fn(x, t)`` of ``sample``,
and ``generate``: the guided sampler loop that training grids, the evaluator and the pipelines all run.

The wrapped model runs once on the doubled batch [cond | null]; both halves see the same x (the same noise), and
the output is uncond + scale·(cond − uncond) on the guided channels. ``guide_channels=k`` reproduces the original
DiT and PixArt ``forward_with_cfg`` (k = 3 of 4 latent channels): the unguided channels and the learned-variance
half come from the conditional output. diffusers pipelines guide all latent channels (``guide_channels=None``).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dit_jax.diffusion.samplers import sample

CondModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _double(cond: Any, null_cond: Any, batch: int) -> Any:
    def cat(c, u):
        c, u = jnp.asarray(c), jnp.asarray(u)
        if c.shape[:1] != (batch,):
            raise ValueError(f"cond leaves need a leading batch axis of {batch}, got shape {c.shape}")
        if u.ndim == 0:  # a scalar null, e.g. the null class index
            u = jnp.broadcast_to(u, c.shape)
        elif u.shape[:1] == (1,) and batch != 1:
            u = jnp.broadcast_to(u, (batch,) + u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(f"null_cond leaf of shape {u.shape} does not match cond leaf of shape {c.shape}")
        return jnp.concatenate([c, u.astype(c.dtype)], axis=0)

    return jax.tree.map(cat, cond, null_cond)


def cfg(
    model_fn: CondModelFn,
    cond: Any,
    null_cond: Any,
    scale: float | jax.Array,
    *,
    guide_channels: int | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance: ``(x, t) ↦ model_fn`` on [cond | null_cond], guided on the first channels.

    ``cond``/``null_cond`` are matching pytrees with a leading batch axis (a null leaf may have batch 1, e.g. one
    null caption, or be a scalar, e.g. the null class ``num_classes``): class labels and the null class, or
    (caption, mask) pairs.
    ``guide_channels=None`` guides the first C = ``x.shape[-1]`` output channels (all latent channels; a learned
    variance half stays conditional); ``k`` guides only the first k. A Python ``scale`` of 1 skips the doubling
    (as the pipelines do); an array scale always doubles, so changing it does not recompile.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        k = c if guide_channels is None else guide_channels
        if not 0 < k <= c:
            raise ValueError(f"guide_channels must be in 1..{c} (the latent channels), got {guide_channels}")
        out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), _double(cond, null_cond, b))
        pair = out.reshape((2, b) + out.shape[1:])  # reshape + index, not split: SPMD-safe on the batch axis
        cond_out, uncond_out = pair[0], pair[1]
        g = uncond_out[..., :k] + scale * (cond_out[..., :k] - uncond_out[..., :k])
        if k == out.shape[-1]:
            return g.astype(out.dtype)
        return jnp.concatenate([g.astype(out.dtype), cond_out[..., k:]], axis=-1)

    return guided


def generate(
    model_fn: CondModelFn,
    cond: Any,
    null_cond: Any,
    latents: jax.Array,
    key: jax.Array,
    *,
    guidance_scale: float | jax.Array,
    guide_channels: int | None = None,
    **sampler: Any,
) -> jax.Array:
    """x₀ from noise ``latents`` with ``model_fn(x, t, cond)`` guided against ``null_cond`` (None: unguided).

    ``sampler`` goes to ``dit_jax.diffusion.sample`` (``schedule``, ``method``, ``num_steps``, ``progress`` and the
    method's options); ``key`` draws the noise of stochastic samplers.
    """
    if null_cond is None:
        guided = lambda x, t: model_fn(x, t, cond)  # noqa: E731
    else:
        guided = cfg(model_fn, cond, null_cond, guidance_scale, guide_channels=guide_channels)
    return sample(guided, latents, key=key, **sampler)
