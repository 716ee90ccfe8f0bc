"""End-to-end sampling: ``load(path)`` → a ``ClassConditionalPipeline`` (DiT + VAE + default sampler, mirroring
diffusers ``DiTPipeline``) or a ``TextToImagePipeline`` (PixArt + VAE + T5, mirroring ``PixArtSigmaPipeline`` /
``PixArtAlphaPipeline``); ``python -m dit_jax.sample`` is their command line."""

from dit_jax.pipelines.base import SamplingPipeline, resize_and_crop
from dit_jax.pipelines.class_conditional import OUTPUT_TYPES, ClassConditionalPipeline
from dit_jax.pipelines.images import make_grid, save_png, to_pil, to_uint8
from dit_jax.pipelines.loading import (
    DIT_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    load,
    load_text_encoder,
    load_vae,
    read_scheduler_config,
)
from dit_jax.pipelines.text_to_image import ASPECT_RATIO_BINS, TextToImagePipeline, closest_bin

__all__ = [
    "ASPECT_RATIO_BINS",
    "DIT_SCHEDULER_CONFIG",
    "OUTPUT_TYPES",
    "PIXART_SCHEDULER_CONFIG",
    "ClassConditionalPipeline",
    "SamplingPipeline",
    "TextToImagePipeline",
    "closest_bin",
    "load",
    "load_text_encoder",
    "load_vae",
    "make_grid",
    "read_scheduler_config",
    "resize_and_crop",
    "save_png",
    "to_pil",
    "to_uint8",
]
