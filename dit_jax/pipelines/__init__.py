"""End-to-end sampling: ``load(path)`` → a ``ClassConditionalPipeline`` (a class-conditional model + VAE + default
sampler, e.g. DiT mirroring diffusers ``DiTPipeline``) or a ``TextToImagePipeline`` (a text-to-image model + VAE +
one ``TextEncoder`` per text slot of its family: PixArt's T5 mirroring ``PixArtSigmaPipeline`` /
``PixArtAlphaPipeline``, SD3's CLIP-L, CLIP-G and T5 mirroring ``StableDiffusion3Pipeline``, Flux's CLIP and T5
mirroring ``FluxPipeline``) or a ``TextToVideoPipeline`` (a text-to-video model + causal video VAE + its text encoder:
Wan 2.1's UMT5 mirroring ``WanPipeline``; ``save_video`` writes MP4 or an animated GIF/WebP); the model's family says
which. ``python -m dit_jax.sample`` is their command line."""

from typing import Any

from dit_jax.pipelines.base import SamplingPipeline, resize_and_crop
from dit_jax.pipelines.class_conditional import OUTPUT_TYPES, ClassConditionalPipeline
from dit_jax.pipelines.images import make_grid, save_png, to_pil, to_uint8
from dit_jax.pipelines.loading import PIPELINES, load, load_text_encoder, load_vae, read_scheduler_config
from dit_jax.pipelines.prompts import PromptTable
from dit_jax.pipelines.text_encoder import TextEncoder
from dit_jax.pipelines.text_to_image import TextToImagePipeline, closest_bin
from dit_jax.pipelines.text_to_video import TextToVideoPipeline
from dit_jax.pipelines.video import save_video

__all__ = [
    "OUTPUT_TYPES",
    "PIPELINES",
    "PromptTable",
    "ClassConditionalPipeline",
    "SamplingPipeline",
    "TextEncoder",
    "TextToImagePipeline",
    "TextToVideoPipeline",
    "closest_bin",
    "load",
    "load_text_encoder",
    "load_vae",
    "make_grid",
    "read_scheduler_config",
    "resize_and_crop",
    "save_png",
    "save_video",
    "to_pil",
    "to_uint8",
]


def __getattr__(name: str) -> Any:
    """``<FAMILY>_SCHEDULER_CONFIG`` (e.g. ``DIT_SCHEDULER_CONFIG``): the default scheduler config a family's
    pipelines get from a model directory or a PyTorch checkpoint (``Family.scheduler_config``)."""
    suffix = "_SCHEDULER_CONFIG"
    if name.endswith(suffix):
        from dit_jax.models import families

        family = families().get(name[: -len(suffix)].lower())
        if family is not None and family.scheduler_config is not None:
            return dict(family.scheduler_config)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
