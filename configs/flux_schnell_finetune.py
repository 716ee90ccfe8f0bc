"""FLUX.1-schnell full fine-tuning: configs/flux_dev_finetune.py for the model without a guidance embedding.

Recipe: as FLUX.1-dev's, except that schnell samples with the plain σ schedule (shift 1, no resolution-dependent
shift), so training draws σ logit-normal without a shift, and the model takes no guidance input. Fine-tuning with
the flow objective trains a many-step model; the 4-step grids show how far it moves from schnell's timestep
distillation.

Data: as configs/flux_dev_finetune.py, with 256 T5 tokens (schnell's max_sequence_length):
  python -m dit_jax.data.precompute --source data/images --out data/flux_schnell_1024_latents --image-size 1024 \
      --buckets --vae models/FLUX.1-schnell --text-encoder models/FLUX.1-schnell --model FLUX.1-schnell --dtype float16
Command:
  python -m dit_jax.train --config configs/flux_schnell_finetune.py --workdir runs/flux_schnell_finetune \
      --config.init_from.model_dir=models/flux1_schnell
Hardware: as FLUX.1-dev (11.9B parameters; `python -m dit_jax.plan` for the slice).
Expected time and result (not measured here; estimates): 3 × 69.5 TFLOPs per 1024 px image and step (256 text
tokens), about the time of the dev config.
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("flux_dev_finetune", relative_to=__file__)
    c.model.name = "FLUX.1-schnell"
    c.diffusion = dict(shift=1.0, weighting="logit_normal", logit_mean=0.0, logit_std=1.0)
    c.condition_inputs = dict()
    c.data.path = "data/flux_schnell_1024_latents"
    c.init_from.model_dir = "models/flux1_schnell"
    c.sample.num_steps = 4
    c.sample.guidance_scale = 0.0
    return c
