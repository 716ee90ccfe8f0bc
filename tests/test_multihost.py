"""2 processes × 2 CPU devices (``jax.distributed`` on 127.0.0.1) train, checkpoint and resume, and match the
same run in 1 process × 4 devices step for step."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import portpicker
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
        c.total_steps = 6
        c.log_every = 1
        c.checkpoint_every = 2
        c.optimizer.lr = 1e-3
        c.cfg_dropout_prob = 0.2
        c.ema_decay = 0.9
        c.mesh = dict(data=-1, fsdp=2, tensor=1)
        c.sample.enabled = False
        return c
    """
)


def launch(config, workdir, log_dir, *, processes: int, devices: int, extra=()) -> None:
    """Run ``python -m dit_jax.train`` in ``processes`` processes of ``devices`` CPU devices each; wait for all."""
    cmd = [sys.executable, "-m", "dit_jax.train", "--config", str(config), "--workdir", str(workdir), *extra]
    port = portpicker.pick_unused_port()
    procs, logs = [], []
    for i in range(processes):
        args = cmd
        if processes > 1:
            args = cmd + [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
            ]
        log = open(os.path.join(log_dir, f"p{i}-{len(os.listdir(log_dir))}.log"), "w")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen(args, env=cpu_env(devices), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if any(codes):
        tails = [Path(log.name).read_text()[-3000:] for log in logs]
        pytest.fail(f"exit codes {codes}:\n" + "\n-----\n".join(tails))


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    logs = tmp_path / "logs"
    logs.mkdir()
    multi, single = tmp_path / "multi", tmp_path / "single"

    launch(config, multi, logs, processes=2, devices=2, extra=["--config.total_steps=3"])
    assert checkpoints.checkpoint_steps(str(multi)) == [2, 3]
    # resume on a two-slice mesh: the data axis across processes (DCN), fsdp within each (ICI)
    launch(config, multi, logs, processes=2, devices=2, extra=["--config.mesh.data=1", "--config.dcn_mesh.data=2"])
    text = "".join(p.read_text() for p in logs.iterdir())
    assert "resumed from" in text and "DCN factors {'data': 2}" in text
    launch(config, single, logs, processes=1, devices=4)

    m, s = read_metrics(str(multi)), read_metrics(str(single))
    assert [r["step"] for r in m] == [r["step"] for r in s] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in m], [r["loss"] for r in s], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in m], [r["grad_norm"] for r in s], rtol=1e-5, atol=1e-6)
    _, ema_m = checkpoints.load_ema_params(str(multi))
    _, ema_s = checkpoints.load_ema_params(str(single))
    for a, b in zip(jax.tree.leaves(ema_m), jax.tree.leaves(ema_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # each process wrote its own data-iterator state
    assert sorted(os.listdir(multi / "checkpoints" / "6" / "data_iter")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
