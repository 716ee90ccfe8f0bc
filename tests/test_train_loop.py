"""``train_and_evaluate`` in-process on the 8 test devices: resume, metrics, the NaN guard, config errors, export."""

import json
import os

import jax
import numpy as np
import pytest
from parity import assert_trees_equal

from dit_jax.train import checkpoints, trainer
from dit_jax.train.config import base_config
from dit_jax.train.init_from import initial_params
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
    assert_trees_equal(final_ref, final_run)


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
        ("sequence_mode", "zigzag", "config.sequence_mode='zigzag' is invalid"),
        ("condition_inputs", dict(guidance="high"), "config.condition_inputs.guidance='high' is invalid"),
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
    torch_file = tmp_path / "dit.safetensors"
    assert main(["--workdir", run, "--out", str(out), "--to_torch", str(torch_file), "--format", "original"]) == 0
    from safetensors.numpy import load_file

    state_dict = load_file(str(torch_file))
    assert state_dict["x_embedder.proj.weight"].shape == (32, 1, 2, 2)  # torch OIHW
    config, params = load_model(out)
    assert config.scan_blocks is False and config.hidden_size == 32
    ema = checkpoints.load_ema_params(run)[1]
    np.testing.assert_array_equal(
        np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"]), np.asarray(ema["stage_0"]["mlp"]["fc1"]["kernel"])[0]
    )
    with open(os.path.join(run, "checkpoints", "2", "config", "metadata")) as f:
        assert json.load(f)["model"]["name"] == "DiT-S/2"


def test_init_from_a_stage_checkpoint_adds_kv_compression_with_conv_avg_init(tmp_path):
    """PixArt stage chaining: the next stage loads the previous run's EMA weights (scanned layout), turning on KV
    compression with Conv Avg Init when its model asks for it."""
    import flax.linen as nn

    from dit_jax.models import enable_kv_compress, preset, set_scan
    from dit_jax.parallel.mesh import create_mesh
    from dit_jax.parallel.rules import logical_rules
    from dit_jax.train.optimizers import create_optimizer
    from dit_jax.train.state import create_train_state, state_shardings

    small = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, caption_channels=16)
    small.update(caption_length=4, pe_interpolation=1.0)
    stage1 = preset("PixArt-Sigma-XL-2-256x256", **small, scan_blocks=True)
    stage2 = preset("PixArt-Sigma-XL-2-256x256", **small, kv_compress_layers=(1,))
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    tx, _ = create_optimizer(dict(name="came", lr=2e-5), 10)
    src = str(tmp_path / "stage1")
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        _, sh1 = state_shardings(stage1, tx, mesh)
        state = create_train_state(stage1, tx, sh1, seed=0)
        ckpt = checkpoints.Checkpointer(src)
        ckpt.save(state, data_iter=None, model_config=stage1, config={"model": {"name": "x"}})
        ckpt.close()
        cfg = tiny_config()
        cfg.init_from.workdir = src
        abstract, sh2 = state_shardings(stage2, tx, mesh)
        params = initial_params(cfg, stage2, abstract, sh2)
        # the next resolution (same parameter layout): restored straight into the new run's shards
        bigger = preset("PixArt-Sigma-XL-2-256x256", **{**small, "input_size": 16, "pe_interpolation": 2.0})
        bigger = bigger.replace(scan_blocks=True)
        abstract3, sh3 = state_shardings(bigger, tx, mesh)
        same = initial_params(cfg, bigger, abstract3, sh3)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state.ema_params)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, expected = enable_kv_compress(*set_scan(stage1, checkpoints.host_params(state.ema_params), False), (1,))
    got = checkpoints.host_params(params)
    assert_trees_equal(got, expected)
    np.testing.assert_allclose(got["blocks_1"]["attn"]["compress"]["sr"]["kernel"], 0.25)
    assert (
        params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == sh2.params["blocks_0"]["mlp"]["fc1"]["kernel"].spec
    )
