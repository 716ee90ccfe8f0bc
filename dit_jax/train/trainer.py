"""``train_and_evaluate(config, workdir)``: the training loop (importable, e.g. from a notebook).

The config resolves in ``train.setup.prepare`` (merged over ``train.config.base_config``), a fine-tuning start comes
from ``train.init_from``, sample grids from ``train.grids``; this module runs the steps.

Per run: a mesh over all devices of all processes, the train state created in its shards (or restored from the
latest checkpoint in ``WORKDIR/checkpoints``, onto this mesh), a grain iterator feeding per-process batches that
become global arrays, the train step compiled ahead of time with explicit shardings and a donated state, then the
loop: metrics every ``log_every`` steps, async checkpoints every ``checkpoint_every`` steps, sample grids every
``sample_every`` steps. SIGTERM (preemption), Ctrl-C and a persistent NaN/Inf save a checkpoint before the loop stops.
"""

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.files import write_json
from dit_jax.models import ModelConfig, count_params, family_of
from dit_jax.parallel.mesh import (
    batch_sharding,
    check_batch_layout,
    describe_mesh,
    example_order,
    global_batch,
)
from dit_jax.parallel.sequence import sequence_mode
from dit_jax.runs import PROMPTS_FILE
from dit_jax.train import config as config_lib
from dit_jax.train.checkpoints import Checkpointer
from dit_jax.train.init_from import initial_params
from dit_jax.train.metrics import MetricWriter, Throughput, peak_flops_per_device
from dit_jax.train.setup import ConfigError, Setup, prepare  # noqa: F401  (exported here too)
from dit_jax.train.state import TrainState, create_train_state, state_shardings
from dit_jax.train.steps import make_train_step


def quiet_library_logs() -> None:
    """Keep orbax's per-file INFO lines and JAX's probe for absent backends out of the console (warnings and
    errors still show)."""
    import logging as py_logging

    def keep(record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.WARNING:
            return True
        return f"{os.sep}orbax{os.sep}" not in record.pathname and "Unable to initialize backend" not in str(record.msg)

    handler = logging.get_absl_handler()
    if not any(getattr(f, "_dit_jax", False) for f in handler.filters):
        keep._dit_jax = True
        handler.addFilter(keep)


class NonFiniteError(RuntimeError):
    """Raised after ``nan_guard_limit`` consecutive non-finite steps (a checkpoint was saved first)."""


class _Preemption:
    """SIGTERM or Ctrl-C → save and stop at the next step boundary (single process; a second Ctrl-C aborts at
    once); multi-host runs use JAX's preemption sync point (SIGTERM)."""

    def __init__(self):
        self.requested = False
        self.reason = "preemption (SIGTERM)"
        self._previous: dict[int, Any] = {}
        self.multihost = jax.process_count() > 1

    def __enter__(self):
        if not self.multihost:
            for sig in (signal.SIGTERM, signal.SIGINT):
                # outside the main thread no handler can be set: no preemption saves there
                with contextlib.suppress(ValueError):
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            self.reason = "interrupt (Ctrl-C)"
            logging.warning("Ctrl-C: saving a checkpoint at the end of this step (press Ctrl-C again to abort)")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self.requested

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class _StepCache:
    """The train step compiled ahead of time per batch shape (aspect-ratio buckets give a few shapes)."""

    def __init__(self, step_fn: Any, state: TrainState):
        self.step_fn = step_fn
        self.abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        self.compiled: dict[tuple, Any] = {}

    @staticmethod
    def key(batch: dict[str, jax.Array]) -> tuple:
        return tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))

    def get(self, batch: dict[str, jax.Array]) -> Any:
        key = self.key(batch)
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.step_fn.lower(self.abstract_state, batch).compile()
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
            logging.info("train step compiled for %s in %.1f s", shapes, time.perf_counter() - t0)
        return self.compiled[key]


def _step_flops(model_config: ModelConfig, batch: dict[str, jax.Array]) -> float:
    """Analytic model FLOPs of one train step (3 × forward over the global batch, images or video as the model's
    family counts them)."""
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    return 3.0 * family_of(model_config).batch_flops(model_config, shapes)


def _log_compiled(compiled: Any, flops: float, mesh: Any) -> None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        logging.info(
            "compiled step: %.3g FLOPs per device reported by XLA (a scanned body counts once)",
            float(cost.get("flops", 0.0)),
        )
    except Exception as e:  # cost analysis is optional per backend
        logging.info("compiled step: no cost analysis (%s)", e)
    logging.info("model FLOPs per step (analytic, 3× forward): %.4g total, %.4g per device", flops, flops / mesh.size)
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            total += mem.temp_size_in_bytes
            logging.info(
                "compiled step memory per device: arguments %.1f MiB, outputs %.1f MiB, aliased %.1f MiB, "
                "temporaries %.1f MiB (bound %.1f MiB)",
                mem.argument_size_in_bytes / 2**20,
                mem.output_size_in_bytes / 2**20,
                mem.alias_size_in_bytes / 2**20,
                mem.temp_size_in_bytes / 2**20,
                total / 2**20,
            )
    except Exception as e:
        logging.info("compiled step: no memory analysis (%s)", e)


def _check_batch(batch: dict[str, np.ndarray], model_config: ModelConfig, per_process: int) -> None:
    x = batch.get("x")
    if x is None:
        raise ValueError(f"the data source yields {sorted(batch)}; the trainer needs 'x' (model-input images/latents)")
    if x.shape[0] != per_process:
        raise ValueError(f"the data source yields batches of {x.shape[0]} per process; expected {per_process}")
    example = family_of(model_config).example_shape(model_config)
    if x.ndim != len(example) + 1:
        raise ValueError(
            f"the data source yields x of shape {tuple(x.shape)} but the model takes {len(example) + 1}-D inputs like "
            f"(B, {', '.join(map(str, example))}) ({'videos' if len(example) == 4 else 'images'})"
        )
    if x.shape[-1] != model_config.in_channels:
        raise ValueError(
            f"data has {x.shape[-1]} channels but the model expects in_channels={model_config.in_channels} "
            f"(set config.model.in_channels or the data source)"
        )


def _base_reference(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Where a LoRA run's frozen weights come from (checkpoints hold only the adapters): ``init_from`` with the step
    it resolved to, or the seed of a fresh init."""
    src = config.init_from
    if src.get("model_dir"):
        return {"model_dir": os.path.abspath(src.model_dir)}
    if src.get("workdir"):
        from dit_jax.runs import checkpoint_steps

        step = int(src.get("step", -1))
        step = step if step >= 0 else checkpoint_steps(src.workdir)[-1]
        return {"workdir": os.path.abspath(src.workdir), "step": step, "use_ema": bool(src.get("use_ema", True))}
    return {"seed": int(config.seed)}


def _pinned_base(config: ml_collections.ConfigDict, workdir: str, step: int) -> ml_collections.ConfigDict:
    """``config`` with ``init_from.step`` set to the step checkpoint ``step`` of a LoRA run recorded for its base, so
    a resumed run merges its adapters into the weights it started from (not a newer checkpoint of that run)."""
    from dit_jax.files import read_json
    from dit_jax.runs import checkpoint_dir

    path = os.path.join(checkpoint_dir(workdir), str(step), "lora", "metadata")
    ref = read_json(path).get("base", {}) if os.path.exists(path) else {}
    if "step" not in ref:
        return config
    config = config.copy_and_resolve_references()
    config.init_from.step = int(ref["step"])
    return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) the run of ``config`` in ``workdir``; returns the last logged metrics."""
    from dit_jax import data as data_lib

    setup = prepare(config)
    config, model_config, mesh, rules, tx = setup.config, setup.model_config, setup.mesh, setup.rules, setup.tx
    schedule, step_cfg, per_process = setup.schedule, setup.step_cfg, setup.per_process
    workdir = os.path.abspath(workdir)
    main = jax.process_index() == 0
    if main:
        os.makedirs(workdir, exist_ok=True)
    config_json = config_lib.config_dict(config)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), sequence_mode(config.sequence_mode):
        check_batch_layout(mesh)
        step_cfg = dataclasses.replace(step_cfg, example_order=example_order(mesh, config.batch_size))
        logging.info("mesh: %s", describe_mesh(mesh))
        dcn = {k: int(v) for k, v in config.dcn_mesh.items() if int(v) > 1}
        if dcn:
            logging.info("multi-slice mesh: DCN factors %s across slices/processes", dcn)
        lora = step_cfg.lora
        abstract, shardings = state_shardings(model_config, tx, mesh, lora=lora)
        base = (lambda s: s) if lora is None else (lambda s: s.replace(params=s.base_params))  # the model weights
        try:
            dataset = data_lib.create_dataset(config.data, batch_size=per_process, seed=config.seed, split="train")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config.data: {e}") from e
        data_iter = iter(dataset)
        checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
        start = checkpointer.latest_step() or 0
        if start:
            state, data_iter = checkpointer.restore(start, abstract, shardings, data_iter)
            state = state.replace(nan_skips=jax.device_put(np.int32(0), shardings.nan_skips))
            if lora is not None:  # checkpoints hold the adapters; the frozen base is rebuilt as the run started
                base_config = _pinned_base(config, workdir, start)
                init = initial_params(base_config, model_config, base(abstract), base(shardings))
                fresh = create_train_state(model_config, tx, shardings, config.seed, init, lora=lora)
                state = state.replace(base_params=fresh.base_params)
            logging.info("resumed from %s at step %d", checkpointer.manager.directory, start)
        else:
            base_config = config
            init = initial_params(config, model_config, base(abstract), base(shardings))
            state = create_train_state(model_config, tx, shardings, config.seed, init, lora=lora)
        n_params = count_params(base(abstract).params)
        logging.info("model %s: %s parameters (%.1fM)", config.model.name, f"{n_params:,}", n_params / 1e6)
        if lora is not None:
            n_lora = f"{count_params(abstract.params):,}"
            logging.info(
                "LoRA rank %d, alpha %s on %s: %s trainable parameters", lora.rank, lora.alpha, lora.targets, n_lora
            )
        prompts = data_lib.prompt_table(config.data)
        if main and prompts is not None:  # the data's fixed prompts, for sampling the run by prompt (runs.prompt_table)
            write_json(os.path.join(workdir, PROMPTS_FILE), {"prompts": {k: v.tolist() for k, v in prompts.items()}})
        writer = MetricWriter(workdir, resume_step=start)
        writer.write_text("config", "```\n" + json.dumps(config_json, indent=2) + "\n```", start)

        local = next(data_iter)
        _check_batch(local, model_config, per_process)
        batch = global_batch(local, mesh)
        replicated = NamedSharding(mesh, P())
        batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        step_fn = jax.jit(
            make_train_step(step_cfg),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        steps = _StepCache(step_fn, state)
        flops = _step_flops(model_config, batch)
        _log_compiled(steps.get(batch), flops, mesh)
        peak = peak_flops_per_device()

        sampler = None
        if config.sample.enabled:
            from dit_jax.train.grids import GridSampler

            sampler = GridSampler(config, model_config, schedule, mesh, base(shardings).params, batch)

        loop = _Loop(config, workdir, writer, checkpointer, model_config, config_json, start, flops, peak, mesh)
        if lora is not None:  # grids sample the EMA adapters merged into the base
            from dit_jax.lora import apply_lora

            merged = jax.jit(lambda b, a: apply_lora(b, a, lora), out_shardings=shardings.base_params)
            loop.sample_params = lambda s: merged(s.base_params, s.ema_params)
            loop.checkpoint_extra = {"lora": {"config": lora.to_dict(), "base": _base_reference(base_config)}}
        try:
            with _Preemption() as preemption:
                state = loop.run(steps, state, batch, data_iter, mesh, preemption, sampler)
        finally:
            checkpointer.wait()
            checkpointer.close()
            writer.close()
    return loop.last_metrics


class _Loop:
    """The step loop with one step in flight: metrics of step s are read after step s+1 is dispatched."""

    def __init__(self, config, workdir, writer, checkpointer, model_config, config_json, start, flops, peak, mesh):
        self.config = config
        self.workdir = workdir
        self.writer = writer
        self.checkpointer = checkpointer
        self.model_config = model_config
        self.config_json = config_json
        self.start = start
        self.flops = flops
        self.peak = peak
        self.num_devices = mesh.size
        self.last_metrics: dict[str, Any] = {}
        self.throughput = Throughput(start)
        self.bar = None
        self.sample_params = lambda state: state.ema_params
        self.checkpoint_extra = None  # more JSON items of each checkpoint (LoRA: its config and base reference)

    def save(self, state: TrainState, data_iter: Any, step: int) -> None:
        if step == self.checkpointer.latest_step():
            return  # already saved at this step (e.g. a preemption right after a periodic save)
        self.checkpointer.save(
            state,
            data_iter=data_iter,
            model_config=self.model_config,
            config=self.config_json,
            step=step,
            extra=self.checkpoint_extra,
        )

    def run(self, steps, state, batch, data_iter, mesh, preemption, sampler) -> TrainState:
        config = self.config
        total = config.total_steps
        if jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.start, desc="train", unit="step", dynamic_ncols=True)
        pending = None
        step = self.start
        try:
            while step < total:
                if batch is None:
                    batch = global_batch(next(data_iter), mesh)
                state, metrics = steps.get(batch)(state, batch)
                batch = None
                step += 1
                if pending is not None:
                    self._after(pending, state, data_iter)
                pending = (step, metrics)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    self.save(state, data_iter, step)
                if sampler is not None and config.sample_every and step % config.sample_every == 0 and step < total:
                    sampler.write(self.sample_params(state), step, self.workdir)
                if preemption.reached(step):
                    self._after(pending, state, data_iter)
                    pending = None
                    self.save(state, data_iter, step)
                    self.checkpointer.wait()
                    logging.warning("%s: saved checkpoint %d; the next start resumes from it", preemption.reason, step)
                    return state
            if pending is not None:
                self._after(pending, state, data_iter)
            self.save(state, data_iter, step)
            if sampler is not None:
                sampler.write(self.sample_params(state), step, self.workdir)
            return state
        finally:
            if self.bar is not None:
                self.bar.close()

    def _after(self, pending: tuple[int, dict], state: TrainState, data_iter: Any) -> None:
        """Host side of step ``pending``: progress bar, metrics record, NaN guard (``state`` is newer by ≤ 1 step)."""
        step, metrics = pending
        config = self.config
        logged = step % config.log_every == 0 or step == config.total_steps or step == self.start + 1
        limit = config.nan_guard_limit
        if not logged and self.bar is None and not limit:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if logged:
            rate = self.throughput.rate(step)
            record = dict(values)
            record["steps_per_sec"] = rate
            record["images_per_sec"] = rate * config.batch_size
            if self.peak and rate:
                record["mfu"] = self.flops * rate / (self.peak * self.num_devices)
            self.writer.write(step, record)
            self.last_metrics = {"step": step, **record}
            self.throughput.reset(step)
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{values['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}", refresh=False
                )
        if limit and values["nan_skips"] >= limit:
            saved = int(jax.device_get(state.step))
            self.save(state, data_iter, saved)
            self.checkpointer.wait()
            raise NonFiniteError(
                f"{int(values['nan_skips'])} consecutive train steps had a non-finite loss or gradient (up to step "
                f"{step}; {int(values['nan_total'])} skipped in all). Saved checkpoint {saved} in "
                f"{self.checkpointer.manager.directory} and stopped. Lower config.optimizer.lr, set "
                f"config.optimizer.grad_clip, check the data, or raise config.nan_guard_limit={limit}."
            )
