"""Every experiment config in configs/ loads, validates and names a real model, optimizer, objective and data."""

import glob
import os

import pytest

from dit_jax.data import validate_data_config
from dit_jax.models import PixArtConfig
from dit_jax.train.config import load_config_file, model_config_from, validate
from dit_jax.train.config import with_defaults as _with_defaults
from dit_jax.train.objectives import make_schedule
from dit_jax.train.optimizers import create_optimizer

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py")))


def test_the_expected_experiments_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {
        "quickstart",
        "dit_xl2_imagenet256",
        "sit_xl2_imagenet256",
        "pixart_sigma_256",
        "pixart_sigma_512",
        "pixart_sigma_1024",
        "pixart_sigma_1024_kvcompress",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_is_valid(path):
    config = _with_defaults(load_config_file(path))
    validate(config)
    model = model_config_from(config.model)
    make_schedule(config.objective, config.diffusion, model)
    create_optimizer(config.optimizer, config.total_steps)
    validate_data_config(config.data)
    raw = load_config_file(path)  # --config.mesh.KEY=... overrides apply before the defaults are merged in
    from dit_jax.parallel.mesh import MESH_AXES

    assert "mesh" not in raw or set(raw.mesh) == set(MESH_AXES), dict(raw.mesh)
    with open(path) as f:
        doc = f.read().split('"""')[1]
    assert "python -m dit_jax.train --config configs/" in doc
    assert "Hardware" in doc
    if isinstance(model, PixArtConfig) and not config.lora.rank:  # full training; LoRA recipes use AdamW
        assert config.optimizer.name == "came" and config.optimizer.lr == 2e-5


def test_pixart_stages_chain_and_interpolate_positions():
    stages = [load_config_file(p) for p in ("configs/pixart_sigma_512.py", "configs/pixart_sigma_1024.py")]
    models = [model_config_from(c.model) for c in stages]
    assert [m.pe_interpolation for m in models] == [1.0, 2.0]
    assert stages[0].init_from.workdir == "runs/pixart_sigma_256"
    assert stages[1].init_from.workdir == "runs/pixart_sigma_512"
    kv = load_config_file("configs/pixart_sigma_1024_kvcompress.py")
    assert kv.init_from.workdir == "runs/pixart_sigma_1024"
    assert model_config_from(kv.model).kv_compress_layers == tuple(range(14, 28))
