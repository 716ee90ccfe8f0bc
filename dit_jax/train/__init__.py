"""Training: train state, steps, optimizers (AdamW, CAME), orbax checkpoints, metrics, and the loop.

``train_and_evaluate(config, workdir)`` is what ``python -m dit_jax.train`` calls; ``load_ema_params(workdir)``
gives a run's EMA weights and model config (pipelines, evaluation, export). The export entry point is
``python -m dit_jax.train.export``.
"""

from dit_jax.train.came import came, scale_by_came
from dit_jax.train.checkpoints import Checkpointer, checkpoint_steps, load_config, load_ema_params
from dit_jax.train.config import base_config, load_config_file, model_config_from, validate
from dit_jax.train.metrics import read_metrics
from dit_jax.train.optimizers import create_optimizer, learning_rate_schedule
from dit_jax.train.state import TrainState, create_train_state, state_shardings
from dit_jax.train.steps import StepConfig, make_train_step, train_step
from dit_jax.train.trainer import ConfigError, NonFiniteError, Setup, prepare, train_and_evaluate

__all__ = [
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "Setup",
    "StepConfig",
    "TrainState",
    "base_config",
    "came",
    "checkpoint_steps",
    "create_optimizer",
    "create_train_state",
    "learning_rate_schedule",
    "load_config",
    "load_config_file",
    "load_ema_params",
    "make_train_step",
    "model_config_from",
    "prepare",
    "read_metrics",
    "scale_by_came",
    "state_shardings",
    "train_and_evaluate",
    "train_step",
    "validate",
]
