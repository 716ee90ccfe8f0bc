"""DiT-XL/2 on ImageNet 256×256, the DiT paper's recipe (Peebles & Xie, 2023).

Recipe: DDPM with a learned variance (ADM hybrid loss: MSE + VLB), linear betas 1e-4…0.02 over 1000 steps,
AdamW lr 1e-4 constant, no weight decay, no warm-up, no gradient clipping, global batch 256, EMA 0.9999, class
dropout 0.1 for classifier-free guidance, training on precomputed SD-VAE latents (32×32×4, scaled by 0.18215)
with random horizontal flips. Compute is bf16 with fp32 master params (the paper used TF32), layers scanned.

Data (once, before training):
  python -m dit_jax.data.precompute --source tfds:imagenet2012 --out data/imagenet256_latents \
      --vae PATH/sd-vae-ft-ema --image-size 256 --flip both
  (ImageNet prepared for tfds by the user; PATH/sd-vae-ft-ema a local diffusers VAE folder.)
Command:
  python -m dit_jax.train --config configs/dit_xl2_imagenet256.py --workdir runs/dit_xl2_256
Hardware: written for a TPU v4 slice or a multi-GPU host; any device count whose data × fsdp divides 256.
  Multi-host GPU: add --coordinator_address HOST:PORT --num_processes N --process_id I on every host.
Expected time and result (not measured here; estimates):
  The paper reports 5.7 training steps/s for DiT-XL/2 on a TPU v3-256 pod and FID-50K 19.5 at 400K steps
  without guidance (2.27 with guidance 1.5 after 7M steps). One step costs 3 × 237.2 GFLOPs × 256 ≈ 182 TFLOPs
  (analytic, dit_jax.models.flops), so 400K steps ≈ 7.3e19 FLOPs: about 13 h on a TPU v4-32 (16 chips, 4.4
  PFLOP/s bf16 peak) at 35% MFU, scaling inversely with chips × MFU. The logged MFU of a run gives the real figure.
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        name="DiT-XL/2",  # 28 blocks, width 1152, 16 heads, patch 2, learned sigma, 1000 classes
        dtype="bfloat16",
        scan_blocks=True,
        remat="none",
    )
    c.objective = "ddpm"
    c.diffusion = dict(
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        num_train_timesteps=1000,
        prediction="epsilon",
        learned_sigma=True,
    )
    c.data = dict(name="latents", path="data/imagenet256_latents", image_size=256, random_flip=True)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 0
    c.optimizer.decay = "constant"
    c.optimizer.grad_clip = 0.0
    c.batch_size = 256
    c.total_steps = 400_000
    c.ema_decay = 0.9999
    c.cfg_dropout_prob = 0.1
    c.log_every = 100
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 3
    c.sample_every = 20_000
    c.sample.method = "ddpm"
    c.sample.num_steps = 250
    c.sample.guidance_scale = 4.0  # the DiT repo's sample.py default; FID is computed at 1.5
    c.sample.labels = (207, 360, 387, 974, 88, 979, 417, 279)
    c.sample.per_class = 4
    c.sample.vae = ""  # e.g. a converted sd-vae-ft-ema model directory, to write PNG grids
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    return c
