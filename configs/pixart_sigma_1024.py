"""PixArt-Σ XL/2, stage 3: 1024 px multi-scale, from stage 2's EMA weights (pe_interpolation 2.0).

Command:
  python -m dit_jax.train --config configs/pixart_sigma_1024.py --workdir runs/pixart_sigma_1024
Hardware: 4,096 tokens per image: full remat and FSDP are on; on a TPU v4-32 the compiled step at batch 64 fits in
HBM (see reference/SCALING.md for AOT-compiled memory figures of similar steps).
Expected time and result (not measured here; estimates): 3 × 6.6 TFLOPs per image and step (analytic), so 20K
steps at batch 64 ≈ 2.5e19 model FLOPs, about 4.6 h on a TPU v4-32 at 35% MFU.
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("pixart_sigma_512", relative_to=__file__)
    c.model.name = "PixArt-Sigma-XL-2-1024-MS"  # input 128×128 latents, pe_interpolation 2.0
    c.data = dict(name="latents", path="data/pixart_1024_latents", random_flip=False, buckets=None)
    c.init_from.workdir = "runs/pixart_sigma_512"
    c.batch_size = 64
    c.total_steps = 20_000
    c.mesh = dict(data=-1, fsdp=8, sequence=1, tensor=1)
    return c
