"""``prepare(config)``: what a training config resolves to before any state exists (model, mesh, optimizer,
objective, step config), with one ``ConfigError`` for the first bad value; shared by the trainer and
``python -m dit_jax.plan``.
"""

import dataclasses
import functools
from typing import Any

import jax
import ml_collections

from dit_jax.models import ModelConfig, family_of
from dit_jax.parallel.mesh import create_mesh
from dit_jax.train import config as config_lib
from dit_jax.train.objectives import cond_dropout_prob, make_loss_fn, make_schedule
from dit_jax.train.optimizers import create_optimizer
from dit_jax.train.steps import StepConfig


class ConfigError(ValueError):
    """A bad config value found before training starts (the command line prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config resolves to before any state exists: model, mesh, optimizer, objective, step config."""

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    mesh: Any
    rules: tuple
    tx: Any
    schedule: Any
    step_cfg: StepConfig
    per_process: int


def prepare(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
    """Validate ``config`` and resolve it (mesh over all devices, or ``devices``; optimizer; loss).

    A bad value raises ``ConfigError``. ``devices`` lets ``dit_jax.plan`` lay the mesh over compile-only devices of
    a TPU topology.
    """
    try:
        config = config_lib.with_defaults(config)
        config_lib.validate(config)
        model_config = config_lib.model_config_from(config.model)
        mesh = create_mesh(config.mesh, config.dcn_mesh, devices=devices)
        rules = config_lib.axis_rules(config)
        tx, lr_schedule = create_optimizer(config.optimizer, config.total_steps)
        schedule = make_schedule(config.objective, config.diffusion, model_config)
        step_cfg = StepConfig(
            model_config=model_config,
            loss_fn=make_loss_fn(
                config.objective,
                config.diffusion,
                schedule,
                num_tokens=functools.partial(family_of(model_config).num_tokens, model_config),
            ),
            tx=tx,
            lr_schedule=lr_schedule,
            objective=config.objective,
            ema_decay=float(config.ema_decay),
            ema_warmup=bool(config.ema_warmup),
            accum_steps=config.grad_accum_steps,
            cond_dropout_prob=cond_dropout_prob(config.cfg_dropout_prob, model_config),
            condition_inputs=tuple(sorted((str(k), float(v)) for k, v in dict(config.condition_inputs).items())),
            lora=config_lib.lora_config_from(config, model_config),
        )
        if config.batch_size % jax.process_count():
            raise ValueError(
                f"config.batch_size={config.batch_size} is not divisible by {jax.process_count()} processes"
            )
        if (
            mesh.shape.get("sequence", 1) > 1
            and model_config.dtype in ("bfloat16", "bf16")
            and mesh.devices.flat[0].platform == "cpu"
        ):
            # XLA:CPU aborts compiling the backward pass of bf16 sequence-parallel attention (its all-reduce
            # promotion pass); TPU and GPU compile it
            raise ValueError(
                "config.mesh.sequence > 1 with a bfloat16 model cannot be compiled for CPU devices: set "
                "config.model.dtype='float32' on CPU (TPUs and GPUs train bf16 sequence-parallel)"
            )
        batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if (config.batch_size // config.grad_accum_steps) % batch_shards:
            raise ValueError(
                f"config.batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} is not divisible "
                f"by the {batch_shards} batch shards of the mesh (data × fsdp)"
            )
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e).strip("'\"")) from e
    return Setup(config, model_config, mesh, rules, tx, schedule, step_cfg, config.batch_size // jax.process_count())
