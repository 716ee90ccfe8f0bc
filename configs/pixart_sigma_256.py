"""PixArt-Σ XL/2, stage 1: 256×256 text-to-image training on precomputed SDXL-VAE latents and T5 caption features.

The PixArt-Σ stages: 256 px (this file) → 512 px (pixart_sigma_512.py) → 1024 px (pixart_sigma_1024.py, each
stage starting from the previous stage's EMA weights; positional embeddings are recomputed for the new grid with
pe_interpolation = image_size / 512) → 1024 px with KV token compression (pixart_sigma_1024_kvcompress.py, Conv
Avg Init of the new compression convolutions).

Recipe: DDPM with a learned variance (IDDPM/ADM hybrid loss), linear betas 1e-4…0.02; CAME with lr 2e-5
(PixArt-Σ paper, Table 4), betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), 1000 warm-up steps, gradient clipping
at norm 0.01, EMA 0.9999, caption dropout 0.1 (the learned null caption), 300 T5 tokens; bf16 compute with fp32
params, scanned blocks with full remat. Besides the learning rate these follow the PixArt-sigma training configs;
check them against the repository you compare with.

Data (once; images + .txt captions → SDXL-VAE latents + T5-v1.1-XXL features of 300 tokens, bf16 T5 compute):
  python -m dit_jax.data.precompute --source data/images --out data/pixart_256_latents --image-size 256 \
      --vae models/pixart_sigma_sdxlvae_T5_diffusers --text-encoder models/pixart_sigma_sdxlvae_T5_diffusers \
      --max-length 300 --dtype float16   # a diffusers pipeline folder: vae/, text_encoder/, tokenizer/
Command:
  python -m dit_jax.train --config configs/pixart_sigma_256.py --workdir runs/pixart_sigma_256 \
      [--config.init_from.model_dir=models/PixArt-Sigma-XL-2-256x256]   # fine-tune a converted checkpoint
Hardware: a TPU v4 slice or GPUs; FSDP over 4 devices keeps the 0.6B-parameter state small per device.
Expected time and result (not measured here; estimates): 3 × 0.33 TFLOPs per image and step (analytic, incl.
cross-attention to 300 tokens; full remat adds one more forward), so 100K steps at batch 256 ≈ 2.6e19 model FLOPs,
about 4.6 h on a TPU v4-32 (16 chips) at 35% MFU. Quality depends on the data; PixArt's own 256 px stage is a
warm-up for the higher resolutions.
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        name="PixArt-Sigma-XL-2-256x256",  # input 32×32 latents, pe_interpolation 0.5, 300 caption tokens
        dtype="bfloat16",
        scan_blocks=True,
        remat="full",
    )
    c.objective = "ddpm"
    c.diffusion = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, learned_sigma=True)
    c.data = dict(name="latents", path="data/pixart_256_latents", random_flip=False)
    c.optimizer.name = "came"
    c.optimizer.lr = 2e-5
    c.optimizer.b1, c.optimizer.b2, c.optimizer.b3 = 0.9, 0.999, 0.9999
    c.optimizer.eps1, c.optimizer.eps2 = 1e-30, 1e-16
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay = "constant"
    c.optimizer.grad_clip = 0.01
    c.batch_size = 256
    c.total_steps = 100_000
    c.ema_decay = 0.9999
    c.cfg_dropout_prob = 0.1
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.sample_every = 10_000
    c.sample.method = "dpmpp_2m"  # PixArt's DPM-Solver
    c.sample.num_steps = 20
    c.sample.guidance_scale = 4.5
    c.sample.per_class = 4  # captions of the first training batch: per_class × num_classes images
    c.sample.num_classes = 4
    c.sample.vae = ""  # e.g. a converted SDXL VAE model directory, to write PNG grids
    c.mesh = dict(data=-1, fsdp=4, sequence=1, tensor=1)
    return c
