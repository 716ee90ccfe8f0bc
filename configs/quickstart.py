"""Quickstart: a class-conditional DiT on scikit-learn's handwritten digits (16×16, 1 channel), flow matching.

Command:   python -m dit_jax.train --config configs/quickstart.py --workdir runs/quickstart
           python -m dit_jax.evaluate --workdir runs/quickstart
Hardware:  2 CPU cores.
Time/result: see the README (measured figures are written there).
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        name="DiT-S/4",
        input_size=16,
        in_channels=1,
        num_classes=10,
        hidden_size=128,
        depth=4,
        num_heads=4,
        learn_sigma=False,
    )
    c.objective = "flow"
    c.diffusion = dict(weighting="logit_normal")
    c.data = dict(name="digits", image_size=16)
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "cosine"
    c.optimizer.grad_clip = 1.0
    c.batch_size = 64
    c.total_steps = 2000
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.cfg_dropout_prob = 0.1
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 1000
    c.sample.num_steps = 32
    c.sample.guidance_scale = 2.0
    c.sample.per_class = 8
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
