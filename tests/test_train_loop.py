"""``train_and_evaluate`` in-process on the 8 test devices: resume, metrics, the NaN guard, config errors, export."""

import json
import os

import jax
import numpy as np
import pytest

from dit_jax.train import checkpoints, trainer
from dit_jax.train.config import base_config
from dit_jax.train.metrics import read_metrics
from dit_jax.train.trainer import NonFiniteError, train_and_evaluate


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def tiny_config(**overrides):
    c = base_config()
    c.model = dict(
        name="DiT-S/2",
        input_size=8,
        in_channels=1,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        learn_sigma=False,
    )
    c.data = dict(name="digits", image_size=8, num_threads=1, prefetch_buffer_size=8)
    c.batch_size = 16
    c.total_steps = 8
    c.log_every = 1
    c.checkpoint_every = 3
    c.keep_checkpoints = 3
    c.optimizer.lr = 1e-3
    c.optimizer.grad_clip = 1.0
    c.ema_decay = 0.9
    c.cfg_dropout_prob = 0.2
    c.sample.enabled = False
    for k, v in overrides.items():
        c[k] = v
    return c


def interrupt_at(monkeypatch, step):
    """Make the loop see a preemption (the SIGTERM path) once it reaches ``step``."""
    monkeypatch.setattr(trainer._Preemption, "reached", lambda self, s: s == step)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    ref = str(tmp_path / "ref")
    train_and_evaluate(tiny_config(), ref)
    records = read_metrics(ref)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("step", "loss", "grad_norm", "lr", "images_per_sec"):
        assert all(key in r for r in records), key
    assert checkpoints.checkpoint_steps(ref) == [3, 6, 8]  # keep the last 3
    assert os.listdir(os.path.join(ref, "tensorboard"))

    run = str(tmp_path / "run")
    interrupt_at(monkeypatch, 5)
    train_and_evaluate(tiny_config(), run)
    assert checkpoints.checkpoint_steps(run) == [3, 5]
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    train_and_evaluate(tiny_config(), run)  # resumes from checkpoint 5 and appends
    assert losses(run) == losses(ref)
    final_ref = checkpoints.load_ema_params(ref)[1]
    final_run = checkpoints.load_ema_params(run)[1]
    for a, b in zip(jax.tree.leaves(final_ref), jax.tree.leaves(final_run)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_a_different_mesh(tmp_path, monkeypatch):
    ref = str(tmp_path / "ref")
    cfg = tiny_config(total_steps=6, objective="ddpm")
    cfg.model.learn_sigma = True
    train_and_evaluate(cfg, ref)
    run = str(tmp_path / "run")
    interrupt_at(monkeypatch, 3)
    train_and_evaluate(cfg, run)
    monkeypatch.undo()
    cfg.mesh = dict(data=2, fsdp=2, tensor=2)
    train_and_evaluate(cfg, run)
    (s_ref, l_ref), (s_run, l_run) = zip(*losses(ref)), zip(*losses(run))
    assert s_ref == s_run == tuple(range(1, 7))
    np.testing.assert_allclose(l_run, l_ref, rtol=1e-5, atol=1e-6)


def test_metrics_drop_records_past_the_restored_checkpoint(tmp_path, monkeypatch):
    """A crash after step 5 with the last checkpoint at 3: steps 4-5 are trained again, not logged twice."""
    run = str(tmp_path / "run")
    interrupt_at(monkeypatch, 5)
    train_and_evaluate(tiny_config(total_steps=6), run)
    monkeypatch.undo()
    checkpoints.Checkpointer(run).manager.delete(5)
    train_and_evaluate(tiny_config(total_steps=6), run)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_nan_guard_saves_and_stops(tmp_path):
    run = str(tmp_path / "run")
    cfg = tiny_config(total_steps=20, nan_guard_limit=3, checkpoint_every=0)
    cfg.optimizer.lr = 1e30  # the first update blows the weights up; every later step is non-finite
    cfg.optimizer.grad_clip = 0.0
    with pytest.raises(NonFiniteError, match="3 consecutive train steps"):
        train_and_evaluate(cfg, run)
    records = read_metrics(run)
    assert records[0]["skipped"] == 0 and records[1]["skipped"] == 1
    saved = checkpoints.checkpoint_steps(run)
    assert len(saved) == 1 and 4 <= saved[0] < 20
    _, params = checkpoints.load_ema_params(run, item="params")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("mesh", dict(data=3, fsdp=1, tensor=1), "product of the axis sizes must equal the device count"),
        ("mesh", dict(data=-1, fsdp=3, tensor=1), "does not divide 8"),
        ("mesh", dict(data=2, pipeline=4), "unknown axes"),
        ("objective", "diffusion", "config.objective='diffusion' is invalid"),
        ("batch_size", 0, "config.batch_size=0 is invalid"),
        ("optimizer", dict(name="sgd"), "config.optimizer.name='sgd' is invalid"),
        ("model", dict(name="DiT-XS/2"), "unknown model preset"),
        ("batch_size", 12, "not divisible by the 8 batch shards"),
    ],
)
def test_bad_config_values_get_one_clear_error(tmp_path, key, value, match):
    cfg = tiny_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(cfg, str(tmp_path / "run"))


def test_export_writes_a_loadable_model_directory(tmp_path):
    from dit_jax.checkpoint import load_model
    from dit_jax.train.export import main

    run = str(tmp_path / "run")
    cfg = tiny_config(total_steps=2, checkpoint_every=0)
    cfg.model.scan_blocks = True
    train_and_evaluate(cfg, run)
    out = tmp_path / "model"
    assert main(["--workdir", run, "--out", str(out)]) == 0
    config, params = load_model(out)
    assert config.scan_blocks is False and config.hidden_size == 32
    ema = checkpoints.load_ema_params(run)[1]
    np.testing.assert_array_equal(
        np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"]), np.asarray(ema["stage_0"]["mlp"]["fc1"]["kernel"])[0]
    )
    with open(os.path.join(run, "checkpoints", "2", "config", "metadata")) as f:
        assert json.load(f)["model"]["name"] == "DiT-S/2"
