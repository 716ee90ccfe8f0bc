"""Model directories: ``save_model`` / ``load_model`` round trips (loop and scanned layouts), atomicity, errors."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from parity import assert_trees_equal

from dit_jax import models
from dit_jax.checkpoint import load_model, save_model

DIT = models.DiTConfig(input_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=4)
PIXART = models.PixArtConfig(
    input_size=8,
    patch_size=2,
    hidden_size=24,
    depth=3,
    num_heads=3,
    caption_channels=8,
    caption_length=4,
    qk_norm=True,
    kv_compress_layers=(2,),
)


def _random_params(config, seed: int):
    """Random float32 params in the config's layout (abstract shapes; no init compile)."""
    rs = np.random.RandomState(seed)
    abstract = nn.meta.unbox(models.abstract_params(config))
    return jax.tree.map(lambda s: rs.randn(*s.shape).astype(np.float32), abstract)


def _assert_same(a, b):
    """``b`` (loaded) holds float32 numpy arrays bit-equal to ``a``'s."""
    assert_trees_equal(a, b)
    assert all(isinstance(y, np.ndarray) and y.dtype == np.float32 for y in jax.tree.leaves(b))


def test_round_trip_loop_and_scanned(tmp_path):
    params = _random_params(DIT, 0)
    save_model(tmp_path / "dit", DIT, params)
    config, loaded = load_model(tmp_path / "dit")
    assert config == DIT
    _assert_same(params, loaded)
    meta = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["family"] == "dit"

    # scanned layout with heterogeneous stages (KV compression on the last layer) survives as is
    cfg, params = models.set_scan(PIXART, _random_params(PIXART, 1), True)
    save_model(tmp_path / "pixart", cfg, params)
    config, loaded = load_model(tmp_path / "pixart")
    assert (
        config == cfg
        and config.scan_blocks
        and sorted(k for k in loaded if k.startswith("stage_"))
        == [
            "stage_0",
            "stage_1",
        ]
    )
    _assert_same(params, loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_existing_directory_and_overwrite(tmp_path):
    params = _random_params(DIT, 0)
    save_model(tmp_path / "dit", DIT, params)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(tmp_path / "dit", DIT, params)
    other = jax.tree.map(lambda x: np.asarray(x) + 1, params)
    save_model(tmp_path / "dit", DIT, other, overwrite=True)
    _assert_same(other, load_model(tmp_path / "dit")[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever orbax raises for a leaf it cannot save
        save_model(tmp_path / "bad", DIT, {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path / "empty")

    save_model(tmp_path / "dit", DIT, _random_params(DIT, 0))
    config_file = tmp_path / "dit" / "config.json"
    good = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**good, "family": "unet"}))
    with pytest.raises(ValueError, match="unknown model family 'unet'"):
        load_model(tmp_path / "dit")
    config_file.write_text(json.dumps({**good, "format_version": 7}))
    with pytest.raises(ValueError, match="format_version=7"):
        load_model(tmp_path / "dit")
    config_file.write_text(json.dumps({**good, "depth": 3}))
    with pytest.raises(ValueError, match="blocks_2/.*expected .*found nothing"):
        load_model(tmp_path / "dit")
    config_file.write_text(json.dumps(good))
    import shutil

    shutil.rmtree(tmp_path / "dit" / "params")
    with pytest.raises(FileNotFoundError, match="params/ is missing"):
        load_model(tmp_path / "dit")
