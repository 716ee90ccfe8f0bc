"""Model directories: ``config.json`` (the config plus a format version) and the params saved with orbax.

What ``dit_jax.convert`` writes and pipelines load (DESIGN.md rule 3: a checkpoint describes itself). Not to be
confused with a training run's checkpoints (``WORKDIR/checkpoints/<step>/``: ``dit_jax.runs`` reads them,
``dit_jax.train.checkpoints`` writes them). Layout::

    MODEL_DIR/config.json   {"format_version": 1, "family": ..., <config fields>}
    MODEL_DIR/params/       orbax PyTree checkpoint of the parameter tree (loop or scanned layout, per config)

Saving is atomic: everything is written to a temporary folder beside ``MODEL_DIR`` and renamed when complete.
``load_model`` works for every registered family (``dit_jax.models`` and ``dit_jax.encoders``: models, VAEs, T5).
"""

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

import dit_jax.encoders  # noqa: F401  (registers the VAE and T5 families, so their model directories load)
from dit_jax.files import atomic_path, read_json
from dit_jax.models import check_params, config_from_dict

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.PyTreeCheckpointer()


def save_model(directory: str | os.PathLike, config: Any, params: Any, *, overwrite: bool = False) -> Path:
    """Write ``config`` and ``params`` to a model directory (atomic; an existing one needs ``overwrite=True``)."""
    if not hasattr(config, "to_dict"):
        raise TypeError(f"save_model takes a model config with to_dict(), got {type(config).__name__}")
    d = config.to_dict()
    if "family" not in d:
        raise ValueError(f"{type(config).__name__}.to_dict() has no 'family'; load_model could not rebuild it")
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
    ocp, ckptr = _checkpointer()
    with atomic_path(directory, is_dir=True, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **d}, indent=2) + "\n")
        ckptr.save(tmp / PARAMS_DIR, params)
    return Path(directory)


def load_model_config(directory: str | os.PathLike) -> Any:
    """The config of a model directory (no params read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    d = read_json(path)
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={version!r}; this dit_jax reads version {FORMAT_VERSION}")
    try:
        return config_from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e


load_config = load_model_config  # the earlier name


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory (``config.json`` with ``format_version``), not a diffusers folder."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and "format_version" in read_json(path / CONFIG_FILE)


def load_model(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(config, params)`` of a model directory; params as float32 numpy arrays in the config's layout."""
    directory = Path(directory).absolute()
    config = load_model_config(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{directory} is not a complete model directory: {PARAMS_DIR}/ is missing")
    ocp, ckptr = _checkpointer()
    try:
        tree = ckptr.metadata(params_dir).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = ckptr.restore(params_dir, restore_args=restore_args)
    except Exception as e:  # orbax/tensorstore errors on damaged checkpoints
        raise ValueError(f"{params_dir}: cannot read the orbax params (damaged checkpoint?): {e}") from e
    params = jax.tree.map(np.asarray, params)
    check_params(config, params, f"{params_dir} (config.json)")
    return config, params
