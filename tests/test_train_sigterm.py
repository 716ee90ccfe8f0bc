"""SIGTERM (preemption) mid-run: ``python -m dit_jax.train`` saves a checkpoint and exits; the run resumes from it
on a different device count and mesh (here: in the 8-device test process)."""

import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from subprocess_env import REPO, cpu_env

from dit_jax.train import checkpoints
from dit_jax.train.metrics import read_metrics

CONFIG = textwrap.dedent(
    """
    from dit_jax.train.config import base_config

    def get_config():
        c = base_config()
        c.model = dict(name="DiT-S/2", input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                       num_classes=10, learn_sigma=False)
        c.data = dict(name="digits", image_size=8, num_threads=1, prefetch_buffer_size=8)
        c.batch_size = 16
        c.total_steps = 100000
        c.log_every = 1
        c.checkpoint_every = 0
        c.optimizer.lr = 1e-3
        c.sample.enabled = False
        return c
    """
)


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_sigterm_saves_a_checkpoint_that_resumes_on_another_mesh(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dit_jax.train", "--config", str(config), "--workdir", str(workdir)],
            env=cpu_env(4),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 240
            while len(read_metrics(str(workdir))) < 3:
                assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
                assert time.time() < deadline, "the run did not start logging in time"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    saved = checkpoints.checkpoint_steps(str(workdir))
    assert len(saved) == 1 and saved[0] >= 3, saved
    k = saved[0]
    assert "preemption (SIGTERM): saved checkpoint" in (tmp_path / "train.log").read_text()

    # resume with 8 devices on a (data=2, fsdp=2, tensor=2) mesh for two more steps
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    cfg = tiny.get_config()
    cfg.total_steps = k + 2
    cfg.mesh = dict(data=2, fsdp=2, tensor=2)
    from dit_jax.train.trainer import train_and_evaluate

    train_and_evaluate(cfg, str(workdir))
    steps = [r["step"] for r in read_metrics(str(workdir))]
    assert steps == list(range(1, k + 3)), steps
    assert checkpoints.checkpoint_steps(str(workdir))[-1] == k + 2
    _, params = checkpoints.load_ema_params(str(workdir))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_ctrl_c_saves_a_checkpoint_before_stopping(tmp_path):
    """The first SIGINT saves at the end of the current step and stops cleanly; the run resumes from it."""
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    workdir = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dit_jax.train", "--config", str(config), "--workdir", str(workdir)],
            env=cpu_env(1),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 240
            while len(read_metrics(str(workdir))) < 2:
                assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
                assert time.time() < deadline, "the run did not start logging in time"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    log_text = (tmp_path / "train.log").read_text()
    steps = checkpoints.checkpoint_steps(str(workdir))
    assert steps and steps[-1] == read_metrics(str(workdir))[-1]["step"], log_text[-2000:]
    assert "interrupt (Ctrl-C): saved checkpoint" in log_text
