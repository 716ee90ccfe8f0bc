"""``config.init_from``: start a run from another run's weights (EMA or raw) or from a model directory.

The generic part lives here (read, switch layouts, check every shape, place the params in this run's shards); what a
family changes between stages (e.g. PixArt's KV compression with Conv Avg Init) is its ``Family.adapt_params``.
Params of the same layout are restored straight into this run's shards, never whole on one device.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from dit_jax.checkpoint import load_model
from dit_jax.models import ModelConfig, family_of, set_scan
from dit_jax.runs import host_params, load_ema_params, run_config
from dit_jax.train.state import TrainState


def initial_params(
    config: ml_collections.ConfigDict, model_config: ModelConfig, abstract: TrainState, shardings: TrainState
) -> Any:
    """Params of ``config.init_from`` (a workdir's EMA/raw weights or a model directory) in their shards, or None."""
    src = config.init_from
    if not (src.get("workdir") or src.get("model_dir")):
        return None
    if src.get("workdir"):
        step = None if src.get("step", -1) < 0 else int(src.step)
        item = "ema_params" if src.get("use_ema", True) else "params"
        _, src_config, _ = run_config(src.workdir, step)
        same_layout = (
            type(src_config) is type(model_config)
            and src_config.scan_blocks == model_config.scan_blocks
            and src_config.layer_kinds() == model_config.layer_kinds()
        )
        if same_layout:  # restore straight into this run's shards, never whole on one device
            try:
                _, params = load_ema_params(src.workdir, step, shardings=shardings.params, item=item)
            except ValueError as e:
                raise ValueError(
                    f"config.init_from {src.workdir}: cannot load into {config.model.to_dict()}: {e}"
                ) from e
            logging.info("init_from: parameters from %s", src.workdir)
            return params
        src_config, params = load_ema_params(src.workdir, step, item=item)
        where = src.workdir
    else:
        src_config, params = load_model(src.model_dir)
        where = src.model_dir
    params = host_params(params)
    if type(src_config) is not type(model_config):
        raise ValueError(
            f"config.init_from {where} holds a {type(src_config).__name__}, not a {type(model_config).__name__}"
        )
    src_config, params = set_scan(src_config, params, False)
    src_config, params = family_of(model_config).adapt_params(src_config, params, model_config)
    _, params = set_scan(src_config, params, model_config.scan_blocks)
    want = jax.tree_util.tree_structure(abstract.params)
    if want != jax.tree_util.tree_structure(params):
        raise ValueError(
            f"config.init_from {where}: its parameter tree does not match the model {config.model.to_dict()}"
        )
    for (path, a), x in zip(jax.tree_util.tree_leaves_with_path(abstract.params), jax.tree.leaves(params)):
        if tuple(a.shape) != tuple(np.shape(x)):
            raise ValueError(
                f"config.init_from {where}: parameter {jax.tree_util.keystr(path)} has shape {np.shape(x)}, the "
                f"model {config.model.to_dict()} expects {tuple(a.shape)}"
            )

    def place(x, s):
        x = np.asarray(x, np.float32)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    logging.info("init_from: parameters from %s", where)
    return jax.tree.map(place, params, shardings.params)
