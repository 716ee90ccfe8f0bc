"""Quickstart: a class-conditional DiT on scikit-learn's handwritten digits (16×16, 1 channel), flow matching.

The 1,797 8×8 digits ship inside scikit-learn; the data source upsamples them to 16×16 in [−1, 1]. The model is a
4-block DiT of width 128 with 4×4 patches (16 tokens, 1.3M parameters), trained with rectified flow (logit-normal
timesteps), AdamW lr 1e-3 with 100 warm-up steps and cosine decay, batch 64, EMA 0.999 (with warm-up), label
dropout 0.1 for classifier-free guidance. Sample grids (EMA params, Euler 32 steps, guidance 2.0, 8 per class)
are written at steps 600 and 1200 to WORKDIR/samples/.

Command:   python -m dit_jax.train --config configs/quickstart.py --workdir runs/quickstart
           python -m dit_jax.evaluate --workdir runs/quickstart
Hardware:  2 CPU cores.
Measured (this repository's 2-core CPU machine, shared with other jobs at load average 5–8): training 2 min 25 s
wall end to end (start-up and compile 20 s, ~8 steps/s, two sample grids), 105 s of CPU time; the evaluation
(100 samples per class, classified by an SVM fitted on the real digits) takes 23 s and gives 99.5% overall, worst
class 97% (seed 0; 99.2% / 96% with --config.seed=1). Without guidance (--guidance_scale 1) it drops to 85%.
On the idle 2-core Intel host with the CPU dense kernel (2026-12-04): 1 min 49 s wall, ~14 steps/s, evaluation 18 s,
the same 99.5% / 97%.
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
    c.data = dict(name="digits", image_size=16, num_threads=1, prefetch_buffer_size=64)
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "cosine"
    c.optimizer.grad_clip = 1.0
    c.batch_size = 64
    c.total_steps = 1200
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.cfg_dropout_prob = 0.1
    c.log_every = 50
    c.checkpoint_every = 400
    c.sample_every = 600
    c.sample.num_steps = 32
    c.sample.guidance_scale = 2.0
    c.sample.per_class = 8
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    return c
