"""A training workdir loads as a pipeline: the latest checkpoint's EMA params, the run's sampler settings, pixel space.

The workdir is written with the trainer's own ``Checkpointer`` (two checkpoints, raw params ≠ EMA), and the
pipeline's images are compared with the trainer's sampling code (``dit_jax.train.grids.generate``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import diffusion, pipelines
from dit_jax.models import DiTConfig, init_params

CONFIG = DiTConfig(
    input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False
)


def random_like(params, seed: int):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: (rs.randn(*x.shape) * 0.3).astype(np.float32), params)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dit_jax.train.checkpoints import Checkpointer
    from dit_jax.train.config import base_config
    from dit_jax.train.state import TrainState

    root = tmp_path_factory.mktemp("run")
    config = base_config()
    config.objective = "flow"
    config.diffusion = dict(shift=2.0, weighting="logit_normal")
    config.sample.num_steps = 4
    config.sample.guidance_scale = 2.0
    base = init_params(CONFIG, 0)
    emas = {}
    ckpt = Checkpointer(str(root))
    for step in (7, 9):
        emas[step] = random_like(base, step)
        state = TrainState(
            step=jnp.int32(step),
            params=random_like(base, 100 + step),
            opt_state={"count": jnp.zeros((), jnp.int32)},
            ema_params=emas[step],
            rng=jax.random.key_data(jax.random.key(0)),
            nan_skips=jnp.int32(0),
            nan_total=jnp.int32(0),
        )
        ckpt.save(state, data_iter=None, model_config=CONFIG, config=config.to_dict(), step=step)
    ckpt.wait()
    ckpt.close()
    return root, emas


def test_workdir_loads_latest_ema_and_matches_trainer_sampling(workdir):
    from dit_jax.train.grids import generate

    root, emas = workdir
    pipe = pipelines.load(root)
    assert pipe.vae_config is None and "checkpoint 9" in pipe.source
    assert isinstance(pipe.schedule, diffusion.FlowSchedule) and pipe.schedule.shift == 2.0
    assert (pipe.method, pipe.num_inference_steps, pipe.guidance_scale) == ("euler", 4, 2.0)
    for got, want in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(emas[9])):
        np.testing.assert_array_equal(np.asarray(got), want)

    labels = [0, 3, 9]
    images = pipe(labels, seed=5)
    assert images.shape == (3, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    latents = pipe.prepare_latents(3, 5)
    x0 = generate(
        CONFIG,
        emas[9],
        {"y": jnp.asarray(labels, jnp.int32)},
        latents,
        jax.random.key(1),
        schedule=pipe.schedule,
        objective="flow",
        method="euler",
        num_steps=4,
        guidance_scale=2.0,
    )
    want = np.clip(np.asarray(x0) / 2 + 0.5, 0, 1)
    err = float(np.abs(images - want).max())
    print(f"workdir pipeline vs trainer sampling: max diff {err:.1e}")
    assert err <= 1e-5
    pil = pipe(labels, seed=5, output_type="pil")
    assert pil[0].mode == "L" and pil[0].size == (8, 8)


def test_workdir_errors(workdir):
    root, _ = workdir
    with pytest.raises(ValueError, match="pixel-space model"):
        pipelines.load(root, vae="sd-vae-ft-ema")
    with pytest.raises(ValueError, match="unknown method 'ddim'"):
        pipelines.load(root)([1], method="ddim")
