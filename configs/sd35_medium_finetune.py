"""SD3.5-medium full fine-tuning with rectified flow on precomputed SD3-VAE latents and CLIP-L + CLIP-G + T5 features.

Recipe (the SD3 paper's training objective, diffusers' SD3 fine-tuning defaults): rectified flow with a velocity
target, σ drawn logit-normal (mean 0, std 1) and shifted by 3.0 (the model's own scheduler shift, so training and
sampling see the same σ distribution); AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, 500 warm-up
steps, gradient clipping at norm 1.0, EMA 0.9999; no caption dropout (the SD3 paper drops each text encoder with
46.3% in pre-training; set cfg_dropout_prob to train the zero-feature null condition again); bf16 compute with fp32
params, scanned blocks with full remat; 1024 px with aspect-ratio buckets.

Data (once; images + .txt captions → SD3-VAE latents + the text condition of StableDiffusion3Pipeline.encode_prompt:
77 CLIP tokens ⊕ 256 T5 tokens of width 4096 and the 2048-wide pooled vector, float16 on disk):
  python -m dit_jax.data.precompute --source data/images --out data/sd35_1024_latents --image-size 1024 --buckets \
      --vae models/stable-diffusion-3.5-medium --text-encoder models/stable-diffusion-3.5-medium \
      --model SD3.5-medium --dtype float16      # a diffusers pipeline folder: vae/, text_encoder{,_2,_3}/, tokenizers
Command:
  python -m dit_jax.train --config configs/sd35_medium_finetune.py --workdir runs/sd35_medium_finetune \
      --config.init_from.model_dir=models/sd35_medium   # from `python -m dit_jax.convert` of the checkpoint
Hardware: FSDP over 8 chips keeps the 2.47B-parameter AdamW state (incl. the stored pos_embed; fp32 params, two
moments, EMA: 39.5 GB) at 5.1 GiB per chip; `python -m dit_jax.plan --config configs/sd35_medium_finetune.py --topology
v4-16` compiles this step for a TPU v4-16 (8 chips) at 17.1 GiB per chip of 30.75 (BENCHMARKS.md); 8 GPUs of 40 GB or
more also fit.
Expected time and result (not measured here; estimates): one 1024 px step costs 3 × 11.2 TFLOPs per image (analytic,
incl. 333 text tokens; full remat adds one more forward), so 10K steps at batch 64 ≈ 2.2e19 model FLOPs, about 8 h on
a TPU v4-16 (8 chips) at 35% MFU. Fine-tuning quality depends on the data.
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(name="SD3.5-medium", dtype="bfloat16", scan_blocks=True, remat="full")
    c.objective = "flow"
    c.diffusion = dict(shift=3.0, weighting="logit_normal", logit_mean=0.0, logit_std=1.0)
    c.data = dict(name="latents", path="data/sd35_1024_latents", random_flip=False)
    c.init_from.model_dir = "models/sd35_medium"
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-5
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.grad_clip = 1.0
    c.batch_size = 64
    c.total_steps = 10_000
    c.ema_decay = 0.9999
    c.cfg_dropout_prob = 0.0
    c.log_every = 50
    c.checkpoint_every = 1_000
    c.sample_every = 2_000
    c.sample.method = "euler"  # StableDiffusion3Pipeline's FlowMatchEulerDiscreteScheduler
    c.sample.num_steps = 28
    c.sample.guidance_scale = 7.0  # against zero text features (the null of the grids)
    c.sample.per_class = 2  # captions of the first training batch: per_class × num_classes images
    c.sample.num_classes = 2
    c.mesh = dict(data=-1, fsdp=8, sequence=1, tensor=1)
    return c
