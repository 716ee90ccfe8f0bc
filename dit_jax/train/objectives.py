"""Glue between a training config and ``dit_jax.diffusion``: the schedule, the per-example loss, the conditioned
model call (through the model's family, ``dit_jax.models.family``).

``config.objective`` is ``"flow"`` or ``"ddpm"``; ``config.diffusion`` holds that objective's options. Keys that
name a field of the schedule (``FlowSchedule`` / ``DDPMSchedule``) configure it; the others go to the loss
(``flow_loss`` / ``ddpm_loss``, e.g. the flow ``weighting``).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dit_jax import diffusion
from dit_jax.diffusion.policy import OBJECTIVES, split_options  # noqa: F401  (shared with the pipelines)
from dit_jax.models import ModelConfig, family_of

LossFn = Callable[[Callable, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_schedule(objective: str, options: Mapping[str, Any], model_config: ModelConfig) -> Any:
    """The diffusion schedule; for DDPM ``learned_sigma`` follows the model's ``learn_sigma`` unless given."""
    return diffusion.make_schedule(objective, options, learned_sigma=model_config.learn_sigma)


_SIGMA_OPTIONS = ("weighting", "logit_mean", "logit_std", "mode_scale", "image_seq_len")


def make_loss_fn(
    objective: str,
    options: Mapping[str, Any],
    schedule: Any,
    patch_size: int = 1,
    *,
    num_tokens: Callable[[tuple[int, ...]], int] | None = None,
) -> LossFn:
    """``loss_fn(model_fn, x0, keys) -> (loss (B,), aux)`` with one PRNG key per example (``keys`` (B,)).

    Each example draws its timestep from ``fold_in(key, 1)`` and its noise from ``fold_in(key, 2)``, so its
    randomness does not depend on where it sits in the batch (micro-batches, processes). A flow schedule with a
    dynamic (resolution-dependent) shift gets the token count from x0's shape: ``num_tokens(x0.shape[1:])`` (the
    model family's ``num_tokens``, e.g. spacetime patches of a video), else the ``patch_size`` patches of an image.
    """
    _, _, loss_kw = split_options(objective, dict(options))
    dynamic = getattr(schedule, "dynamic_shift", None) is not None and "image_seq_len" not in loss_kw
    if num_tokens is None:
        num_tokens = lambda shape: (shape[0] // patch_size) * (shape[1] // patch_size)  # noqa: E731

    def noise_of(keys: jax.Array, x0: jax.Array) -> jax.Array:
        draw = lambda k: jax.random.normal(jax.random.fold_in(k, 2), x0.shape[1:], jnp.float32)  # noqa: E731
        return jax.vmap(draw)(keys).astype(x0.dtype)

    def flow(model_fn, x0, keys):
        kw = dict(loss_kw)
        if dynamic:
            kw["image_seq_len"] = num_tokens(tuple(x0.shape[1:]))
        sigma_kw = {k: v for k, v in kw.items() if k in _SIGMA_OPTIONS}
        draw = lambda k: diffusion.sample_flow_sigmas(jax.random.fold_in(k, 1), (), schedule, **sigma_kw)  # noqa: E731
        t = jax.vmap(draw)(keys)
        return diffusion.flow_loss(model_fn, schedule, x0, keys[0], t=t, noise=noise_of(keys, x0), **kw)

    def ddpm(model_fn, x0, keys):
        n = schedule.num_train_timesteps
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, n))(keys)
        return diffusion.ddpm_loss(model_fn, schedule, x0, keys[0], t=t, noise=noise_of(keys, x0), **loss_kw)

    return flow if objective == "flow" else ddpm


def conditioned_model_fn(
    model: Any,
    model_config: ModelConfig,
    params: Any,
    batch: Mapping[str, jax.Array],
    drop: jax.Array | None,
    *,
    objective: str,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_t, t)`` for one batch: the family's condition of the batch, with the rows in ``drop`` replaced
    by its null condition. A flow objective on a learned-sigma model keeps the first ``in_channels``."""
    family = family_of(model_config)
    cond = family.condition(model_config, batch)
    if drop is not None:
        cond = family.drop_condition(model_config, cond, drop)

    def call(x, t):
        return family.apply(model, params, x, t, cond)

    if objective == "flow" and model_config.learn_sigma:
        c = model_config.in_channels
        return lambda x, t: call(x, t)[..., :c]
    return call


def cond_dropout_prob(config_value: float | None, model_config: ModelConfig) -> float:
    """``config.cfg_dropout_prob``, or the model family's own default (e.g. DiT class / PixArt caption dropout)."""
    if config_value is None:
        return family_of(model_config).dropout_prob(model_config)
    p = float(config_value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"config.cfg_dropout_prob={config_value!r} is invalid: expected a probability in [0, 1)")
    return p
