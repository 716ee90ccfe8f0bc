"""End-to-end sampling: ``load(path)`` → a ``ClassConditionalPipeline`` (DiT + VAE + default sampler) that maps class
labels to images, mirroring diffusers ``DiTPipeline``; ``python -m dit_jax.sample`` is its command line."""

from dit_jax.pipelines.class_conditional import OUTPUT_TYPES, ClassConditionalPipeline
from dit_jax.pipelines.images import make_grid, save_png, to_pil, to_uint8
from dit_jax.pipelines.loading import DIT_SCHEDULER_CONFIG, load, load_vae, read_scheduler_config

__all__ = [
    "DIT_SCHEDULER_CONFIG",
    "OUTPUT_TYPES",
    "ClassConditionalPipeline",
    "load",
    "load_vae",
    "make_grid",
    "read_scheduler_config",
    "save_png",
    "to_pil",
    "to_uint8",
]
