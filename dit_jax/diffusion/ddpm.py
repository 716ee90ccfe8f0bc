"""DDPM objective (ADM / Improved DDPM): q_sample, the posterior, ε/v/x₀ targets, and the learned-range variance
with the hybrid loss (MSE + VLB with a stop-gradient on the mean) used to train DiT.

Pure functions, usable inside a jitted train step. Arrays are channels-last; the learned-sigma model output has
2·C channels on the last axis, [mean output | variance interpolation v].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.schedules import DDPMSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def extract(arr: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """Gather a float64 schedule array at integer timesteps ``t`` (B,) as float32, shaped (B, 1, …, 1)."""
    out = jnp.asarray(np.asarray(arr, np.float32))[t]
    return out.reshape(out.shape + (1,) * (ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def split_learned_sigma(out: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """Split a (…, 2C) model output into its mean part and variance part (reshape + index, SPMD-safe)."""
    if out.shape[-1] != 2 * channels:
        raise ValueError(
            f"a learned-sigma model must output 2×{channels} channels on the last axis, got shape {out.shape}"
        )
    pair = out.reshape(out.shape[:-1] + (2, channels))
    return pair[..., 0, :], pair[..., 1, :]


def q_sample(schedule: DDPMSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Diffuse x₀ to step t: √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε."""
    ac = schedule.alphas_cumprod
    return extract(np.sqrt(ac), t, x0.ndim) * x0 + extract(np.sqrt(1.0 - ac), t, x0.ndim) * noise


def q_posterior_mean_variance(
    schedule: DDPMSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x₀)."""
    n = x_t.ndim
    mean = extract(schedule.posterior_mean_coef1, t, n) * x0 + extract(schedule.posterior_mean_coef2, t, n) * x_t
    return mean, extract(schedule.posterior_variance, t, n), extract(schedule.posterior_log_variance_clipped, t, n)


def predict_x0(schedule: DDPMSchedule, x_t: jax.Array, t: jax.Array, out: jax.Array) -> jax.Array:
    """x₀ from the model's mean output for the schedule's prediction type (ε, v or x₀)."""
    ac, n = schedule.alphas_cumprod, x_t.ndim
    if schedule.prediction == "epsilon":
        return extract(np.sqrt(1.0 / ac), t, n) * x_t - extract(np.sqrt(1.0 / ac - 1.0), t, n) * out
    if schedule.prediction == "v_prediction":
        return extract(np.sqrt(ac), t, n) * x_t - extract(np.sqrt(1.0 - ac), t, n) * out
    return out


def training_target(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """MSE target: ε, x₀, or v = √ᾱ·ε − √(1 − ᾱ)·x₀."""
    if schedule.prediction == "epsilon":
        return noise
    if schedule.prediction == "sample":
        return x0
    ac = schedule.alphas_cumprod
    return extract(np.sqrt(ac), t, x0.ndim) * noise - extract(np.sqrt(1.0 - ac), t, x0.ndim) * x0


def learned_range_log_variance(schedule: DDPMSchedule, v: jax.Array, t: jax.Array) -> jax.Array:
    """ADM LEARNED_RANGE: log σ² = frac·log β_t + (1 − frac)·log β̃_t (clipped), frac = (v + 1)/2."""
    n = v.ndim
    min_log = extract(schedule.posterior_log_variance_clipped, t, n)
    max_log = extract(np.log(schedule.betas), t, n)
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of Φ(x) used by ADM."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log-likelihood of data in [−1, 1] quantised to 256 bins under N(means, e^{2·log_scales}), elementwise."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(
    schedule: DDPMSchedule, mean_out: jax.Array, var_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> jax.Array:
    """ADM ``_vb_terms_bpd`` (B,): KL(q ‖ p) for t > 0, the decoder NLL at t = 0, in bits per dim."""
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    pred_x0 = predict_x0(schedule, x_t, t, mean_out)
    model_mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    model_log_var = learned_range_log_variance(schedule, var_out, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    nll = mean_flat(nll) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)


def ddpm_loss(
    model_fn: ModelFn,
    schedule: DDPMSchedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example DDPM loss (B,) and aux metrics; ADM ``training_losses`` with ``LossType.MSE``.

    t ~ U{0, …, T−1} unless given; ε ~ N(0, I) unless given. ``model_fn(x_t, t)`` receives float32 timesteps.
    With ``schedule.learned_sigma`` the loss is MSE + VLB, the VLB computed with the mean output frozen
    (``stop_gradient``) so that it trains only the variance (ADM's ``frozen_out``).
    """
    key_t, key_n = jax.random.split(key)
    b = x0.shape[0]
    if t is None:
        t = jax.random.randint(key_t, (b,), 0, schedule.num_train_timesteps)
    t = jnp.asarray(t, jnp.int32)
    if noise is None:
        noise = jax.random.normal(key_n, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t.astype(jnp.float32))
    c = x0.shape[-1]
    if schedule.learned_sigma:
        mean_out, var_out = split_learned_sigma(out, c)
    else:
        if out.shape != x0.shape:
            raise ValueError(f"model output shape {out.shape} != input shape {x0.shape} (learned_sigma=False)")
        mean_out = out
    target = training_target(schedule, x0, noise, t)
    mse = mean_flat((target.astype(jnp.float32) - mean_out.astype(jnp.float32)) ** 2)
    aux = {"t": t, "mse": mse}
    loss = mse
    if schedule.learned_sigma:
        vb = vb_terms_bpd(
            schedule,
            jax.lax.stop_gradient(mean_out).astype(jnp.float32),
            var_out.astype(jnp.float32),
            x0.astype(jnp.float32),
            x_t.astype(jnp.float32),
            t,
        )
        aux["vb"] = vb
        loss = mse + vb
    aux["loss"] = loss
    return loss, aux
