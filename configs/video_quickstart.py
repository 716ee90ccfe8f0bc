"""Video quickstart: a tiny Wan 2.1 (text-to-video) on moving digits made in code (4 frames of 16×16, 1 channel).

Data ('moving_digits', `dit_jax.data.moving_digits`): each of scikit-learn's 1,797 8×8 digits slides across a black
16×16 frame in one of 4 directions (right, left, down, up), edge to edge over 4 frames (0, 3, 5, 8 px), centred
across the motion, each frame after the first with a trail (the glyph where it was a frame before, at 35% brightness):
7,188 clips. The prompt ("digit 3 moving left") reaches the model without a text encoder, as one
token (1, 16) in Wan's `context` (cross-attention) with two channels hot, the digit's and the direction's; dropping
it (10%) gives the zero null prompt of guidance.
The model is the Wan family's transformer at toy size, in pixel space: patches (1, 4, 4) → 4 × 4 × 4 = 64 tokens,
width 128, 3 blocks, 3-D RoPE (0.85M parameters); rectified flow with logit-normal σ shifted by 3, AdamW 2e-3
(cosine, 100 warm-up steps), batch 32, 2,400 steps, EMA 0.999 with warm-up. Sample previews (UniPC flow solver,
24 steps, guidance 3; the prompts of the first training batch) are written at steps 1,200 and 2,400 as
WORKDIR/samples/step_<N>.gif (an animated grid) and .png (one row of frames per clip).

Command:   python -m dit_jax.train --config configs/video_quickstart.py --workdir runs/video_quickstart
           python -m dit_jax.evaluate --workdir runs/video_quickstart
Hardware:  2 CPU cores.
Measured: see README "The video quickstart" (training time, digit and direction accuracy of the evaluator).
"""

from dit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = dict(
        name="Wan2.1-T2V-1.3B",  # the family's preset, shrunk below to a toy model
        input_size=16,
        input_frames=4,
        patch_size=4,
        patch_size_t=1,
        in_channels=1,
        out_channels=1,
        hidden_size=128,
        num_heads=4,
        depth=3,
        ffn_dim=384,
        text_dim=16,
        freq_dim=64,
        rope_max_seq_len=16,
        scan_blocks=True,  # XLA:CPU runs the unrolled stack 2.5× slower (and compiles it 2× slower)
    )
    c.objective = "flow"
    # σ shifted by 3 (SD3's shift, as Wan trains): more steps at high noise, where the clip's time direction is decided
    c.diffusion = dict(weighting="logit_normal", shift=3.0)
    # centred across the motion, with a trail that shows the way the digit goes (Wan's RoPE positions are relative:
    # without it the toy model picks the time direction at random; README)
    c.data = dict(name="moving_digits", image_size=16, num_frames=4, text_dim=16, random_offset=False,
                  prompt_tokens=1, trail=0.35, num_threads=1, prefetch_buffer_size=64)  # fmt: skip
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "cosine"
    c.optimizer.grad_clip = 1.0
    c.batch_size = 32
    c.total_steps = 2400
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.cfg_dropout_prob = 0.1
    c.log_every = 50
    c.checkpoint_every = 600
    c.sample_every = 1200
    c.sample.method = "unipc"
    c.sample.num_steps = 24
    c.sample.guidance_scale = 3.0
    c.sample.per_class = 4  # the first 4 × 4 = 16 prompts of the first training batch
    c.sample.num_classes = 4
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    return c
