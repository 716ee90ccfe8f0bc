"""FLUX.1-dev full fine-tuning with rectified flow on precomputed Flux-VAE latents and CLIP-L + T5 features.

Recipe (optimizer, EMA and logging keys from configs/sd35_medium_finetune.py): rectified flow with a velocity target,
σ drawn logit-normal (mean 0, std 1) and shifted by the resolution-dependent shift FLUX.1-dev samples with (μ linear
in the packed image token count: 0.5 at 256 tokens, 1.15 at 4096); the guidance-distilled model gets its embedded
guidance 3.5 as a constant input (`condition_inputs`, diffusers' DreamBooth Flux default); AdamW lr 1e-5, betas (0.9,
0.999), eps 1e-8, weight decay 1e-4, 500 warm-up steps, gradient clipping at norm 1.0, EMA 0.9999; no caption dropout
(the model runs no classifier-free guidance); bf16 compute with fp32 params, scanned blocks with full remat; 1024 px
with aspect-ratio buckets.

Data (once; images + .txt captions → Flux-VAE latents + FluxPipeline.encode_prompt's 512 T5 tokens (width 4096) and
the CLIP-L pooled vector (768), float16 on disk):
  python -m dit_jax.data.precompute --source data/images --out data/flux_1024_latents --image-size 1024 --buckets \
      --vae models/FLUX.1-dev --text-encoder models/FLUX.1-dev --model FLUX.1-dev --dtype float16
Command:
  python -m dit_jax.train --config configs/flux_dev_finetune.py --workdir runs/flux_dev_finetune \
      --config.init_from.model_dir=models/flux1_dev   # from `python -m dit_jax.convert flux1-dev.safetensors ...`
Hardware: 11.9B parameters with fp32 params, two AdamW moments and the EMA are 190 GB of state, so full fine-tuning
needs a pod slice with FSDP. Compiled ahead of time with `python -m dit_jax.plan` (BENCHMARKS.md): v4-64 (32 chips,
fsdp=32, batch 32) at 11.2 GiB per chip; v4-32 (16 chips) at 18.7 GiB with batch 16; v5p-8 (4 chips, fsdp=4) at 65
GiB of 96 with batch 4. E.g. `python -m dit_jax.plan --config configs/flux_dev_finetune.py --topology v5p-8
--config.mesh.fsdp=4 --config.batch_size=4`.
Expected time and result (not measured here; estimates): one 1024 px step costs 3 × 74.4 TFLOPs per image (analytic,
4,096 image + 512 text tokens; full remat adds one more forward), so 5K steps at batch 32 ≈ 3.6e19 model FLOPs (4.8e19
with remat), about 3.8 h on a TPU v4-64 (32 chips) at 40% MFU (2.7 s per step). Fine-tuning quality depends on the data.
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("sd35_medium_finetune", relative_to=__file__)  # the same optimizer, EMA and schedule keys
    c.model = dict(name="FLUX.1-dev", dtype="bfloat16", scan_blocks=True, remat="full")
    c.diffusion = dict(dynamic_shift=True, weighting="logit_normal", logit_mean=0.0, logit_std=1.0)
    c.condition_inputs = dict(guidance=3.5)  # the embedded guidance of every training example
    c.data = dict(name="latents", path="data/flux_1024_latents", random_flip=False)
    c.init_from.model_dir = "models/flux1_dev"
    c.batch_size = 32
    c.total_steps = 5_000
    c.checkpoint_every = 500
    c.sample_every = 1_000
    c.sample.method = "euler"  # FluxPipeline's FlowMatchEulerDiscreteScheduler
    c.sample.guidance_scale = 3.5  # the embedded guidance of the grids (no classifier-free guidance)
    c.mesh = dict(data=-1, fsdp=32, sequence=1, tensor=1)
    return c
