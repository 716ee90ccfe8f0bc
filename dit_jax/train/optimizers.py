"""The optax chain from ``config.optimizer``: gradient clipping, AdamW or CAME, warm-up then constant/cosine/linear.

``config.optimizer`` keys: ``name`` (adamw | came), ``lr``, ``b1``, ``b2``, ``b3`` (CAME), ``eps`` (AdamW),
``eps1``/``eps2`` (CAME), ``weight_decay``, ``warmup_steps``, ``decay`` (constant | cosine | linear),
``end_lr_ratio`` (final lr as a fraction of ``lr``), ``grad_clip`` (global norm; 0 disables).
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

from dit_jax.train.came import came

OPTIMIZERS = ("adamw", "came")
DECAYS = ("constant", "cosine", "linear")


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"config.optimizer.{key}={value!r} is invalid: expected {expected}")


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then ``decay`` to ``lr * end_lr_ratio`` at ``total_steps``."""
    lr = float(opt.get("lr", 1e-4))
    warmup = int(opt.get("warmup_steps", 0))
    decay = opt.get("decay", "constant")
    end = lr * float(opt.get("end_lr_ratio", 0.0))
    if lr <= 0:
        raise _bad("lr", lr, "a positive learning rate")
    if warmup < 0:
        raise _bad("warmup_steps", warmup, "an integer >= 0")
    if decay not in DECAYS:
        raise _bad("decay", decay, f"one of {DECAYS}")
    rest = max(total_steps - warmup, 1)
    if decay == "constant":
        after = optax.constant_schedule(lr)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=end / lr)
    else:
        after = optax.linear_schedule(lr, end, rest)
    if not warmup:
        return after

    def schedule(count):
        # update `count` (0-based) of the warm-up uses lr·(count+1)/warmup: the first update is not wasted
        ramp = lr * jnp.minimum(1.0, (count + 1.0) / warmup)
        return jnp.where(count < warmup, ramp, after(jnp.maximum(count - warmup, 0)))

    return schedule


def create_optimizer(opt: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)``; one clear error for an unknown optimizer or a bad value."""
    name = opt.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise _bad("name", name, f"one of {OPTIMIZERS}")
    schedule = learning_rate_schedule(opt, total_steps)
    wd = float(opt.get("weight_decay", 0.0))
    if wd < 0:
        raise _bad("weight_decay", wd, "a value >= 0")
    b1, b2 = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999))
    for key, b in (("b1", b1), ("b2", b2)):
        if not 0 <= b < 1:
            raise _bad(key, b, "a value in [0, 1)")
    if name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=float(opt.get("eps", 1e-8)), weight_decay=wd)
    else:
        core = came(
            schedule,
            b1=b1,
            b2=b2,
            b3=float(opt.get("b3", 0.9999)),
            eps1=float(opt.get("eps1", 1e-30)),
            eps2=float(opt.get("eps2", 1e-16)),
            weight_decay=wd,
        )
    clip = float(opt.get("grad_clip", 0.0))
    if clip < 0:
        raise _bad("grad_clip", clip, "a global-norm threshold >= 0 (0 disables clipping)")
    tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip else core
    return tx, schedule
