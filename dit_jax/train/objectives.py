"""Glue between a config and ``dit_jax.diffusion``: the schedule, the per-example loss, the conditioned model call.

``config.objective`` is ``"flow"`` or ``"ddpm"``; ``config.diffusion`` holds that objective's options. Keys that
name a field of the schedule (``FlowSchedule`` / ``DDPMSchedule``) configure it; the others go to the loss
(``flow_loss`` / ``ddpm_loss``, e.g. the flow ``weighting``).
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dit_jax.models import DiTConfig, ModelConfig, PixArtConfig

OBJECTIVES = ("flow", "ddpm")

LossFn = Callable[[Callable, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _schedule_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)


def split_options(objective: str, options: Mapping[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(schedule class, schedule kwargs, loss kwargs)`` for ``objective``."""
    from dit_jax import diffusion

    if objective not in OBJECTIVES:
        raise ValueError(f"config.objective={objective!r} is invalid: expected one of {OBJECTIVES}")
    cls = diffusion.FlowSchedule if objective == "flow" else diffusion.DDPMSchedule
    fields = _schedule_fields(cls)
    schedule_kw = {k: v for k, v in options.items() if k in fields}
    loss_kw = {k: v for k, v in options.items() if k not in fields}
    return cls, schedule_kw, loss_kw


def make_schedule(objective: str, options: Mapping[str, Any], model_config: ModelConfig) -> Any:
    """The diffusion schedule; for DDPM ``learned_sigma`` follows the model's ``learn_sigma`` unless given."""
    cls, kw, _ = split_options(objective, dict(options))
    if objective == "ddpm":
        learned = kw.setdefault("learned_sigma", model_config.learn_sigma)
        if bool(learned) != model_config.learn_sigma:
            raise ValueError(
                f"config.diffusion.learned_sigma={learned!r} does not match the model's learn_sigma="
                f"{model_config.learn_sigma} (the model's output channels depend on it)"
            )
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.diffusion {kw} is invalid for {cls.__name__}: {e}") from e


_SIGMA_OPTIONS = ("weighting", "logit_mean", "logit_std", "mode_scale", "image_seq_len")


def make_loss_fn(objective: str, options: Mapping[str, Any], schedule: Any, patch_size: int = 1) -> LossFn:
    """``loss_fn(model_fn, x0, keys) -> (loss (B,), aux)`` with one PRNG key per example (``keys`` (B,)).

    Each example draws its timestep from ``fold_in(key, 1)`` and its noise from ``fold_in(key, 2)``, so its
    randomness does not depend on where it sits in the batch (micro-batches, processes). A flow schedule with a
    dynamic (resolution-dependent) shift gets the image token count from x0's shape.
    """
    from dit_jax import diffusion

    _, _, loss_kw = split_options(objective, dict(options))
    dynamic = getattr(schedule, "dynamic_shift", None) is not None and "image_seq_len" not in loss_kw

    def noise_of(keys: jax.Array, x0: jax.Array) -> jax.Array:
        draw = lambda k: jax.random.normal(jax.random.fold_in(k, 2), x0.shape[1:], jnp.float32)  # noqa: E731
        return jax.vmap(draw)(keys).astype(x0.dtype)

    def flow(model_fn, x0, keys):
        kw = dict(loss_kw)
        if dynamic:
            kw["image_seq_len"] = (x0.shape[1] // patch_size) * (x0.shape[2] // patch_size)
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
    """``model_fn(x_t, t)`` for one batch: DiT labels (dropped → the null class) or PixArt captions (dropped →
    the learned null caption). A flow objective on a learned-sigma model keeps the first ``in_channels``."""
    if isinstance(model_config, DiTConfig):
        y = batch["y"]
        if drop is not None:
            y = jnp.where(drop, model_config.num_classes, y)

        def call(x, t):
            return model.apply({"params": params}, x, t, y)

    elif isinstance(model_config, PixArtConfig):
        cond = dict(
            caption=batch["caption"],
            caption_mask=batch.get("caption_mask"),
            resolution=batch.get("resolution"),
            aspect_ratio=batch.get("aspect_ratio"),
        )

        def call(x, t):
            return model.apply({"params": params}, x, t, **cond, drop_caption=drop)

    else:
        raise TypeError(f"cannot train a {type(model_config).__name__}")
    if objective == "flow" and model_config.learn_sigma:
        c = model_config.in_channels
        return lambda x, t: call(x, t)[..., :c]
    return call


def cond_dropout_prob(config_value: float | None, model_config: ModelConfig) -> float:
    """``config.cfg_dropout_prob``, or the model's own default (DiT class / PixArt caption dropout)."""
    if config_value is None:
        if isinstance(model_config, DiTConfig):
            return model_config.class_dropout_prob
        return model_config.caption_dropout_prob
    p = float(config_value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"config.cfg_dropout_prob={config_value!r} is invalid: expected a probability in [0, 1)")
    return p
