"""PixArt-Σ XL/2 512 px LoRA fine-tuning on one card: rank 64, batch 1 with 8-step gradient accumulation, bf16.

Recipe (the seeds' single-card recipe): LoRA rank 64, alpha 64 (scale 1) on every attention projection of the 28
blocks — self-attention q|k|v and output, cross-attention q, k|v and output: the Linears a peft target list
to_q/to_k/to_v/to_out.0 selects in diffusers' PixArt (attn1 and attn2; the family's default ``lora_targets``); the
0.61B base weights frozen in fp32; AdamW lr 1e-4 on the adapters only (no weight decay, gradient clipping at 1.0), 100
warm-up steps; batch 8 as 8 micro-batches of one image (``grad_accum_steps=8``); EMA 0.999 of the adapters (with
warm-up); DDPM with the learned variance as PixArt-Σ trains, caption dropout 0.1 (the learned null caption); bf16
compute, scanned blocks with full remat.

Data: precomputed 512 px SDXL-VAE latents + 300-token T5 features (see pixart_sigma_256.py for the command, with
--image-size 512). Base: a converted PixArt-Σ 512 checkpoint:
  python -m dit_jax.convert PixArt-Sigma-XL-2-512-MS.pth models/pixart_sigma_512
Command:
  python -m dit_jax.train --config configs/pixart_sigma_512_lora.py --workdir runs/pixart_sigma_512_lora \\
      [--config.lora.rank=32 --config.lora.alpha=32 --config.init_from.model_dir=...]
  python -m dit_jax.convert --lora runs/pixart_sigma_512_lora pixart_lora.safetensors   # diffusers/peft file
  python -m dit_jax.plan --config configs/pixart_sigma_512_lora.py                          # its memory
Hardware: one GPU of 16 GB. ``python -m dit_jax.plan --config configs/pixart_sigma_512_lora.py`` compiles this step
for one device (measured with XLA:CPU on a 2-core host, 44 s): 5.78 GiB per device — arguments 2.81 GiB (the fp32
base of 612,084,896 parameters, 2.28 GiB, plus 33,030,144 adapter parameters with their two Adam moments and EMA,
0.49 GiB; the base is donated and passed through) and 2.97 GiB of temporaries. Without remat
(``--config.model.remat=none``) the temporaries grow to 10.06 GiB (12.87 GiB in all); full fine-tuning of the same
step (``--config.lora.rank=0``) needs 15.72 GiB (9.16 GiB of params, moments and EMA). A GPU compile may differ.
Expected time and result (not measured here; estimates): 3 × 1.29 TFLOPs per image and step plus one forward for the
full remat (41.2 TFLOPs per step of 8 images), so 2,000 steps ≈ 8.2e16 FLOPs, about 13 min on an A100 at 35% MFU.
Quality depends on the data.
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("pixart_sigma_512", relative_to=__file__)
    c.model = dict(name="PixArt-Sigma-XL-2-512-MS", dtype="bfloat16", scan_blocks=True, remat="full")
    c.init_from.workdir = ""
    c.init_from.model_dir = "models/pixart_sigma_512"
    c.lora = dict(rank=64, alpha=64.0, targets=())  # () → the family's attention projections
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "constant"
    c.optimizer.grad_clip = 1.0
    c.batch_size = 8
    c.grad_accum_steps = 8
    c.total_steps = 2_000
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.log_every = 10
    c.checkpoint_every = 500
    c.sample_every = 500
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    return c
