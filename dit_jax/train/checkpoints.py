"""Training checkpoints with orbax: ``WORKDIR/checkpoints/<step>/`` holds one item per part of the run.

Items: ``params``, ``ema_params``, ``opt_state``, ``meta`` (step, RNG, NaN counters), ``data_iter`` (grain iterator
state, one file per process), ``model_config`` and ``config`` (JSON). Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames it when complete); the last ``keep`` checkpoints are kept. Each item
restores into whatever shardings the caller asks for, so a run resumes on a different mesh or device count.

``load_ema_params(workdir)`` is what pipelines and the evaluator use: the EMA weights and the model config.
"""

import json
import logging as py_logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dit_jax.models import ModelConfig, abstract_params, config_from_dict
from dit_jax.train.state import TrainState, unbox_abstract, with_shardings

CHECKPOINT_DIR = "checkpoints"


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


def _meta(state: TrainState) -> dict[str, jax.Array]:
    return {"step": state.step, "rng": state.rng, "nan_skips": state.nan_skips, "nan_total": state.nan_total}


class Checkpointer:
    """Async saves of a ``TrainState`` plus data-iterator state and configs; restores onto given shardings."""

    def __init__(self, workdir: str, *, keep: int = 3):
        self.workdir = workdir
        self.manager = _manager(workdir, keep=keep)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state: TrainState,
        *,
        data_iter: Any | None,
        model_config: ModelConfig,
        config: dict[str, Any],
        step: int | None = None,
    ) -> None:
        """Start an async save of checkpoint ``step`` (default: ``state.step``); returns once arrays are copied."""
        step = int(jax.device_get(state.step)) if step is None else step
        items = dict(
            params=ocp.args.StandardSave(state.params),
            ema_params=ocp.args.StandardSave(state.ema_params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave(_meta(state)),
            model_config=ocp.args.JsonSave(model_config.to_dict()),
            config=ocp.args.JsonSave(config),
        )
        if data_iter is not None:
            import grain

            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract: TrainState, shardings: TrainState, data_iter: Any | None
    ) -> tuple[TrainState, Any | None]:
        """The state of checkpoint ``step`` in ``shardings`` and the data iterator positioned after it."""
        target = with_shardings(abstract, shardings)
        args = dict(
            params=ocp.args.StandardRestore(target.params),
            ema_params=ocp.args.StandardRestore(target.ema_params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            meta=ocp.args.StandardRestore(_meta(target)),
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = restored["meta"]
        state = TrainState(
            step=meta["step"],
            params=restored["params"],
            opt_state=restored["opt_state"],
            ema_params=restored["ema_params"],
            rng=meta["rng"],
            nan_skips=meta["nan_skips"],
            nan_total=meta["nan_total"],
        )
        if data_iter is not None:
            data_iter = self._restore_iterator(step, data_iter)
        return state, data_iter

    def _restore_iterator(self, step: int, data_iter: Any) -> Any:
        import grain

        path = os.path.join(checkpoint_dir(self.workdir), str(step), "data_iter")
        expected = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not os.path.exists(os.path.join(path, expected)):
            saved = sorted(os.listdir(path)) if os.path.isdir(path) else []
            logging.warning(
                "checkpoint %d has no data-iterator state for this process layout (%s; saved: %s): the data stream "
                "restarts from its beginning",
                step,
                expected,
                saved,
            )
            return data_iter
        restored = self.manager.restore(
            step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter))
        )
        return restored["data_iter"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    return sorted(_manager(workdir, read_only=True).all_steps())


def load_config(workdir: str, step: int | None = None) -> tuple[int, ModelConfig, dict[str, Any]]:
    """``(step, model_config, training config as a dict)`` of checkpoint ``step`` (default: the latest)."""
    step = _pick_step(workdir, step)
    base = os.path.join(checkpoint_dir(workdir), str(step))
    with open(os.path.join(base, "model_config", "metadata")) as f:
        model_config = config_from_dict(json.load(f))
    with open(os.path.join(base, "config", "metadata")) as f:
        config = json.load(f)
    return step, model_config, config


def _pick_step(workdir: str, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no training checkpoint under {checkpoint_dir(workdir)}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir(workdir)}; available: {steps}")
    return step


def load_ema_params(
    workdir: str, step: int | None = None, *, shardings: Any = None, item: str = "ema_params"
) -> tuple[ModelConfig, Any]:
    """``(model_config, params)``: the EMA weights of a training workdir's checkpoint (default: the latest).

    ``shardings`` is a pytree of shardings matching the params or one sharding for all leaves; by default every
    array lands on the first local device. ``item="params"`` gives the raw (non-EMA) weights instead.
    """
    step, model_config, _ = load_config(workdir, step)
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
