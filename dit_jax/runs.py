"""Reading a training run (``WORKDIR/checkpoints/<step>/``, written by ``dit_jax.train``): its configs and weights.

What pipelines, the evaluator and exports need from a run, without the trainer: ``run_config(workdir)`` gives the
step, model config and training config of a checkpoint, ``load_ema_params(workdir)`` its EMA (or raw) weights onto
any shardings, ``is_lora_run(workdir)`` whether it holds LoRA adapters instead (``dit_jax.convert.lora.merged_run``
merges them into the run's base), ``prompt_table(workdir)`` the text features of the fixed prompts a run's data
gave without a text encoder (``WORKDIR/prompts.json``, e.g. the video quickstart's). Model directories
(``config.json`` + ``params/``) are ``dit_jax.checkpoint``'s.
"""

import logging as py_logging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from dit_jax.files import read_json
from dit_jax.models import ModelConfig, abstract_params, config_from_dict

CHECKPOINT_DIR = "checkpoints"
PROMPTS_FILE = "prompts.json"  # {"prompts": {prompt: features (tokens, width) as nested lists}}


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _quiet_read_only(record: py_logging.LogRecord) -> bool:
    """Drop orbax's notices that a manager opened for reading is read-only (that is the point)."""
    msg = str(record.msg)
    return "read_only=True" not in msg and "is read only" not in msg


def _manager(workdir: str, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    absl_logger = py_logging.getLogger("absl")
    if read_only and _quiet_read_only not in absl_logger.filters:
        absl_logger.addFilter(_quiet_read_only)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def unbox_abstract(boxed: Any) -> Any:
    """Strip logical-axis boxes without applying their sharding constraints (abstract values only)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target shardings (what orbax restores into and what ``lower`` takes)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    return sorted(_manager(workdir, read_only=True).all_steps())


def run_config(workdir: str, step: int | None = None) -> tuple[int, ModelConfig, dict[str, Any]]:
    """``(step, model_config, training config as a dict)`` of checkpoint ``step`` (default: the latest)."""
    step = _pick_step(workdir, step)
    base = os.path.join(checkpoint_dir(workdir), str(step))
    model_config = config_from_dict(read_json(os.path.join(base, "model_config", "metadata")))
    return step, model_config, read_json(os.path.join(base, "config", "metadata"))


def prompt_table(workdir: str) -> dict[str, np.ndarray] | None:
    """``{prompt: text features (tokens, width)}`` a run recorded (``PROMPTS_FILE``: its data gave the features of a
    fixed set of prompts instead of captions, e.g. moving digits); None when it recorded none."""
    path = os.path.join(workdir, PROMPTS_FILE)
    if not os.path.isfile(path):
        return None
    return {k: np.asarray(v, np.float32) for k, v in read_json(path)["prompts"].items()}


def _pick_step(workdir: str, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no training checkpoint under {checkpoint_dir(workdir)}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir(workdir)}; available: {steps}")
    return step


def _holds_lora(workdir: str, step: int, config: dict[str, Any]) -> bool:
    lora_item = os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), "lora"))
    return lora_item or bool((config.get("lora") or {}).get("rank"))


def is_lora_run(workdir: str, step: int | None = None) -> bool:
    """Whether checkpoint ``step`` (default: the latest) holds a LoRA run's adapters rather than the model's weights
    (``dit_jax.convert.lora.merged_run`` gives the weights it samples with)."""
    step, _, config = run_config(workdir, step)
    return _holds_lora(workdir, step, config)


def load_ema_params(
    workdir: str, step: int | None = None, *, shardings: Any = None, item: str = "ema_params"
) -> tuple[ModelConfig, Any]:
    """``(model_config, params)``: the EMA weights of a training workdir's checkpoint (default: the latest).

    ``shardings`` is a pytree of shardings matching the params or one sharding for all leaves; by default every
    array lands on the first local device. ``item="params"`` gives the raw (non-EMA) weights instead.
    """
    step, model_config, config = run_config(workdir, step)
    if _holds_lora(workdir, step, config):
        raise ValueError(
            f"{workdir}: checkpoint {step} is a LoRA run's (it holds adapters, not the model): dit_jax.pipelines.load "
            f"merges them into its base, as dit_jax.convert.lora.merged_run does; python -m dit_jax.convert --lora "
            f"exports them"
        )
    abstract = unbox_abstract(abstract_params(model_config))
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = with_shardings(abstract, shardings)
    manager = _manager(workdir, read_only=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    manager.close()
    return model_config, restored[item]


def host_params(params: Any) -> Any:
    """Params as numpy arrays on the host (fully replicated or single-device arrays)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
