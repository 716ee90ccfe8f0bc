"""Training checkpoints with orbax: ``WORKDIR/checkpoints/<step>/`` holds one item per part of the run.

Items: ``params``, ``ema_params``, ``opt_state``, ``meta`` (step, RNG, NaN counters), ``data_iter`` (grain iterator
state, one file per process), ``model_config`` and ``config`` (JSON). Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames it when complete); the last ``keep`` checkpoints are kept. Each item
restores into whatever shardings the caller asks for, so a run resumes on a different mesh or device count.

Reading a run without the trainer (configs, EMA weights) is ``dit_jax.runs``.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from dit_jax.models import ModelConfig
from dit_jax.runs import (  # noqa: F401  (readers, also exported here under their earlier names)
    _manager,
    checkpoint_dir,
    checkpoint_steps,
    host_params,
    load_ema_params,
    run_config,
    with_shardings,
)
from dit_jax.train.state import TrainState

load_config = run_config  # the earlier name


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
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Start an async save of checkpoint ``step`` (default: ``state.step``); returns once arrays are copied.
        ``extra``: more JSON items by name (a LoRA run's config and base reference); ``state.base_params`` (LoRA's
        frozen weights) is not saved."""
        step = int(jax.device_get(state.step)) if step is None else step
        items = dict(
            params=ocp.args.StandardSave(state.params),
            ema_params=ocp.args.StandardSave(state.ema_params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave(_meta(state)),
            model_config=ocp.args.JsonSave(model_config.to_dict()),
            config=ocp.args.JsonSave(config),
            **{name: ocp.args.JsonSave(value) for name, value in (extra or {}).items()},
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
