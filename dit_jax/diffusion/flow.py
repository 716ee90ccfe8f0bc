"""Rectified-flow objective (SD3, Esser et al. 2024 §3.1; Flux): x_σ = (1 − σ)·x₀ + σ·ε, velocity target ε − x₀,
timestep densities uniform / logit-normal / mode, SD3's constant shift and Flux's resolution-dependent shift.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.ddpm import mean_flat
from dit_jax.diffusion.schedules import FlowSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DENSITIES = ("uniform", "logit_normal", "mode")
# diffusers' ``weighting_scheme`` names: densities above, plus loss weights on a uniform density.
WEIGHTINGS = DENSITIES + ("none", "cosmap", "sigma_sqrt")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def density_transform(
    weighting: str, u: jax.Array, *, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> jax.Array:
    """Map base draws to a timestep density on (0, 1), as diffusers' ``compute_density_for_timestep_sampling``.

    ``u`` is standard normal for ``logit_normal`` (→ sigmoid(mean + std·u)) and uniform on [0, 1) otherwise;
    ``mode``: 1 − u − s·(cos²(π·u/2) − 1 + u) (SD3 eq. 20); ``uniform``/``none``/``cosmap``/``sigma_sqrt``: u.
    """
    _check_weighting(weighting)
    if weighting == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * u)
    if weighting == "mode":
        return 1.0 - u - mode_scale * (jnp.cos(np.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def sample_flow_sigmas(
    key: jax.Array,
    shape: tuple[int, ...],
    schedule: FlowSchedule,
    *,
    weighting: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    image_seq_len: int | None = None,
) -> jax.Array:
    """Draw σ from the weighting's density, then apply the schedule's (constant or dynamic) shift."""
    _check_weighting(weighting)
    if weighting == "logit_normal":
        base = jax.random.normal(key, shape, jnp.float32)
    else:
        base = jax.random.uniform(key, shape, jnp.float32)
    u = density_transform(weighting, base, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    return schedule.shift_sigmas(u, image_seq_len=image_seq_len)


def flow_loss_weight(weighting: str, sigmas: jax.Array) -> jax.Array:
    """Per-example loss weight, diffusers' ``compute_loss_weighting_for_sd3``: σ⁻² for ``sigma_sqrt``,
    2 / (π(1 − 2σ + 2σ²)) for ``cosmap``, 1 otherwise (the densities weight by sampling instead)."""
    _check_weighting(weighting)
    if weighting == "sigma_sqrt":
        return sigmas**-2.0
    if weighting == "cosmap":
        return 2.0 / (np.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return jnp.ones_like(sigmas)


def flow_loss(
    model_fn: ModelFn,
    schedule: FlowSchedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    weighting: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    image_seq_len: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example rectified-flow loss (B,) and aux metrics.

    σ is drawn from ``weighting``'s density and shifted by the schedule (``image_seq_len`` is needed with
    ``dynamic_shift``) unless ``t`` gives σ ∈ [0, 1] directly (used as is). x_σ = (1 − σ)x₀ + σε; the model gets
    ``(x_σ, σ·num_train_timesteps)`` and is regressed onto ε − x₀, mean over non-batch axes.
    """
    key_t, key_n = jax.random.split(key)
    b = x0.shape[0]
    if t is None:
        sigmas = sample_flow_sigmas(
            key_t,
            (b,),
            schedule,
            weighting=weighting,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            image_seq_len=image_seq_len,
        )
    else:
        _check_weighting(weighting)
        sigmas = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if noise is None:
        noise = jax.random.normal(key_n, x0.shape, jnp.float32).astype(x0.dtype)
    s = sigmas.reshape((b,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    x_t = (1.0 - s) * x0 + s * noise
    pred = model_fn(x_t, sigmas * schedule.num_train_timesteps)
    if pred.shape != x0.shape:
        raise ValueError(f"model output shape {pred.shape} != input shape {x0.shape}")
    target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
    mse = mean_flat((pred.astype(jnp.float32) - target) ** 2)
    loss = flow_loss_weight(weighting, sigmas) * mse
    return loss, {"sigmas": sigmas, "mse": mse, "loss": loss}
