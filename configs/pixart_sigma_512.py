"""PixArt-Σ XL/2, stage 2: 512 px, multi-scale (aspect-ratio buckets), from stage 1's EMA weights.

The parameters do not change shape between stages: the 2-D sin-cos positions are recomputed for the 64×64 latent
grid with pe_interpolation 1.0 (= 512 / 512), which is PixArt's positional-embedding interpolation.

Command:
  python -m dit_jax.train --config configs/pixart_sigma_512.py --workdir runs/pixart_sigma_512
  (starts from runs/pixart_sigma_256; change --config.init_from.workdir or set init_from.model_dir instead)
Hardware: as stage 1; 4× the tokens per image, so about 4–5× the time per image.
Expected time and result (not measured here; estimates): 3 × 1.29 TFLOPs per image and step (analytic), so 50K
steps at batch 256 ≈ 5.0e19 model FLOPs, about 9 h on a TPU v4-32 at 35% MFU.
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("pixart_sigma_256", relative_to=__file__)
    c.model.name = "PixArt-Sigma-XL-2-512-MS"  # input 64×64 latents, pe_interpolation 1.0
    c.data = dict(name="latents", path="data/pixart_512_latents", random_flip=False, buckets=None)
    c.init_from.workdir = "runs/pixart_sigma_256"
    c.optimizer.warmup_steps = 1000
    c.total_steps = 50_000
    return c
