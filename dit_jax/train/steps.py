"""The train step: conditioning dropout, the diffusion loss (optionally accumulated over micro-batches), the optax
update, the EMA and a NaN/Inf guard that keeps the previous state when a step is not finite.

Randomness is per example: example k of step s (k counts the step's examples in data-stream order) gets key
``split(fold_in(state.rng, s), B)[k]``, from which it draws its conditioning dropout, timestep and noise. So a
step gives the same result however the batch is laid out: in micro-batches (gradient accumulation equals the big
batch) or over processes (``example_order`` maps global array positions back to stream order).

LoRA (``StepConfig.lora``): ``state.params`` are the adapters and the model runs on ``apply_lora(state.base_params,
state.params)``, so gradients, the optimizer update and the EMA cover the adapters only and the base never changes.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dit_jax.lora import apply_lora
from dit_jax.models import ModelConfig, build
from dit_jax.parallel.rules import constrain
from dit_jax.train.objectives import LossFn, conditioned_model_fn
from dit_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of ``train_step``."""

    model_config: ModelConfig
    loss_fn: LossFn
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    objective: str = "flow"
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    accum_steps: int = 1
    cond_dropout_prob: float = 0.0
    example_order: tuple[int, ...] | None = None  # stream index of each global batch position; None: identity
    condition_inputs: tuple[tuple[str, float], ...] = ()  # constant per-example model inputs the batch lacks
    lora: Any = None  # a dit_jax.lora.LoraConfig: state.params are adapters over the frozen state.base_params


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay for the update at ``step`` (0-based): constant, or ``min(decay, (1+s)/(10+s))`` in warm-up."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    s = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


def _micro_batches(tree: Any, k: int) -> Any:
    """(B, ...) → (k, B/k, ...) where micro-batch i holds examples i, i+k, …: every device keeps its own rows."""

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, tree)


def _mean_aux(aux: dict[str, Any]) -> dict[str, jax.Array]:
    return {
        k: jnp.mean(v) for k, v in aux.items() if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)
    }


def train_step(state: TrainState, batch: dict[str, jax.Array], cfg: StepConfig) -> tuple[TrainState, dict]:
    """One update from a global batch; returns the new state and scalar metrics."""
    model = build(cfg.model_config)
    b = batch["x"].shape[0]
    keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), b)
    if cfg.example_order is not None:
        keys = keys[jnp.asarray(cfg.example_order, jnp.int32)]
    keys = constrain(keys, ("act_batch",))
    if cfg.cond_dropout_prob > 0:
        bern = lambda k: jax.random.bernoulli(jax.random.fold_in(k, 0), cfg.cond_dropout_prob)  # noqa: E731
        drop = jax.vmap(bern)(keys)
    else:
        drop = None

    def loss(params, mb, mdrop, mkeys):
        rows = mb["x"].shape[0]
        mb = {**{k: jnp.full((rows,), v, jnp.float32) for k, v in cfg.condition_inputs}, **mb}
        if cfg.lora is not None:  # gradients reach the adapters only; the base is a constant of the step
            params = apply_lora(state.base_params, params, cfg.lora)
        model_fn = conditioned_model_fn(model, cfg.model_config, params, mb, mdrop, objective=cfg.objective)
        per_example, aux = cfg.loss_fn(model_fn, mb["x"], mkeys)
        return jnp.mean(per_example), _mean_aux(aux)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    k = cfg.accum_steps
    if k == 1:
        (loss_value, aux), grads = grad_fn(state.params, batch, drop, keys)
    else:
        if b % k:
            raise ValueError(f"global batch {b} is not divisible by grad_accum_steps={k}")
        micro = _micro_batches({"batch": batch, "drop": drop, "keys": keys}, k)
        first = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: grad_fn(state.params, first["batch"], first["drop"], first["keys"])[0][1])

        def body(carry, mb):
            (lv, ax), g = grad_fn(state.params, mb["batch"], mb["drop"], mb["keys"])
            return jax.tree.map(jnp.add, carry, (lv, ax, g)), None

        init = (
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
            jax.tree.map(jnp.zeros_like, state.params),
        )
        total, _ = jax.lax.scan(body, init, micro)
        loss_value, aux, grads = jax.tree.map(lambda x: x / k, total)

    finite = jnp.isfinite(loss_value) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        ema_params=keep_if_bad(ema, state.ema_params),
        nan_skips=jnp.where(finite, 0, state.nan_skips + 1),
        nan_total=state.nan_total + skipped,
    )
    metrics = {
        "loss": loss_value,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(cfg.lr_schedule(state.step), jnp.float32),
        "skipped": skipped,
        "nan_skips": new_state.nan_skips,
        "nan_total": new_state.nan_total,
        **aux,
    }
    return new_state, metrics


def make_train_step(cfg: StepConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step`` with its settings bound (jit it with shardings and ``donate_argnums=0``)."""
    return lambda state, batch: train_step(state, batch, cfg)
