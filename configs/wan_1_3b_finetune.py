"""Wan 2.1 T2V-1.3B full fine-tuning with rectified flow on precomputed Wan-VAE video latents and UMT5 text features.

Recipe: rectified flow with a velocity target (the Wan 2.1 objective: x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀); σ drawn
uniformly and shifted by 3.0, WanPipeline's sampling shift at 480p (its UniPC flow scheduler, flow_shift=3), so
training and sampling see the same σ distribution. (Wan-AI publish no training code; this repository's reference
material has no Wan training facts. The community trainers, e.g. DiffSynth-Studio, also draw σ uniformly over a
shifted schedule, with shift 5; set diffusion.weighting="logit_normal" for SD3's density.) AdamW lr 1e-5, betas
(0.9, 0.999), eps 1e-8, weight decay 1e-4, 100 warm-up steps, gradient clipping at 1.0, EMA 0.9999; the text
condition dropped to zero features for 10% of the clips (the null condition of guidance); bf16 compute with fp32
params, scanned blocks with full remat.
Clips: 81 frames at 480×832 → latents 21 × 60 × 104 × 16 → 21 × 30 × 52 = 32,760 tokens per clip (plus 512 text
tokens in cross-attention). Full 3-D self-attention over 32,760 tokens is what sequence parallelism is for: the
``sequence`` mesh axis splits the tokens of every clip over 4 devices (Ulysses all-to-all: 12 heads / 4 = 3 per device;
``config.sequence_mode``), and ``embed`` parameters shard over ``fsdp`` and ``sequence`` together (ZeRO-3 over every
device of a clip, not just over the fsdp axis).

Data (once; videos + .txt captions → Wan-VAE latents in frames × resolution buckets + WanPipeline's UMT5 text condition
`context`, 512 tokens of width 4096, float16 on disk):
  python -m dit_jax.data.precompute --source data/videos --out data/wan_480p_latents --num-frames 81 --frame-stride 2 \
      --image-size 640 --buckets --vae models/Wan2.1-T2V-1.3B-Diffusers/vae \
      --text-encoder models/Wan2.1-T2V-1.3B-Diffusers --model Wan2.1-T2V-1.3B --dtype float16
  (--image-size 640 --buckets: frame sizes of area ≤ 640², multiples of 16, e.g. 480×848; --image-size 480 crops
  squares instead.)
Command:
  python -m dit_jax.convert models/Wan2.1-T2V-1.3B-Diffusers/transformer models/wan_1_3b
  python -m dit_jax.convert models/Wan2.1-T2V-1.3B-Diffusers/vae models/wan_vae
  python -m dit_jax.train --config configs/wan_1_3b_finetune.py --workdir runs/wan_1_3b_finetune
Sample previews (UniPC, 50 steps, guidance 5 against zero text features, the captions of the first training batch)
decode with models/wan_vae into WORKDIR/samples/step_<N>.gif.
Hardware: 8 chips (mesh data × fsdp × sequence = 1 × 2 × 4), batch 2 clips per step (one per fsdp shard).
Plans (`python -m dit_jax.plan`, compiled for compile-only TPU devices on a CPU host; GiB per chip):
  python -m dit_jax.plan --config configs/wan_1_3b_finetune.py --topology v5p-16 --example_shape 21,60,104,16 \
      --config.model.name=Wan2.1-T2V-14B
    → Wan2.1-T2V-14B on a v5p-16 (8 chips, fsdp=2 × sequence=4, batch 2): fits, arguments 26.96 + temporaries 23.50
      = 50.46 of 95.74 GiB; 13,427 TFLOPs per step, 9.1 s at 40% MFU.
  ... --topology v4-64 --config.model.name=Wan2.1-T2V-14B --config.mesh.fsdp=4 --config.mesh.sequence=8 \
      --config.batch_size=4
    → Wan2.1-T2V-14B on a v4-64 (32 chips, fsdp=4 × sequence=8, batch 4): fits, 7.03 + 9.12 = 16.15 of 30.75 GiB;
      26,854 TFLOPs per step, 7.6 s at 40% MFU.
  (The 1.3B model, a tenth of the parameters, was not compiled for TPUs here.)
Expected time and result (estimates, not measured): one 1.3B clip costs 283 TFLOPs per forward pass (analytic, incl.
the 512 text tokens; the 3-D self-attention over 32,760 tokens is 70% of it), 4 passes with full remat: 2.26 PFLOPs
per step of 2 clips, 1.8 s on 8 v5p chips at 35% MFU, so 5K steps ≈ 2.5 h. Quality depends on the data.
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(name="Wan2.1-T2V-1.3B", dtype="bfloat16", scan_blocks=True, remat="full")
    c.objective = "flow"
    c.diffusion = dict(shift=3.0, weighting="uniform")
    c.data = dict(name="latents", path="data/wan_480p_latents", random_flip=False)
    c.init_from.model_dir = "models/wan_1_3b"
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-5
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.grad_clip = 1.0
    c.batch_size = 2
    c.total_steps = 5_000
    c.ema_decay = 0.9999
    c.cfg_dropout_prob = 0.1
    c.log_every = 10
    c.checkpoint_every = 500
    c.sample_every = 2_500
    c.sample.method = "unipc"  # WanPipeline's UniPCMultistepScheduler (flow sigmas, shift 3)
    c.sample.num_steps = 50
    c.sample.guidance_scale = 5.0
    c.sample.per_class = 1  # the captions of the first training batch: per_class × num_classes clips
    c.sample.num_classes = 2
    c.sample.vae = "models/wan_vae"
    c.mesh = dict(data=-1, fsdp=2, sequence=4, tensor=1)
    c.logical_axis_rules = (("embed", ("fsdp", "sequence")),)  # ZeRO-3 over every device of a clip
    c.sequence_mode = "auto"  # Ulysses when the heads divide (12 / 4), else ring
    return c
