"""Encoders around the diffusion model: the AutoencoderKL VAE and the T5 text encoder."""

# The model registry imports dit_jax.encoders.vae, and vae imports dit_jax.models.config: load the models package
# first so that importing dit_jax.encoders.vae before dit_jax.models never meets a half-initialised registry.
import dit_jax.models  # noqa: F401
from dit_jax.encoders.t5 import T5Config, T5Encoder, TextEncoder, t5_preset
from dit_jax.encoders.tiling import decode_tiled, encode_tiled
from dit_jax.encoders.vae import (
    PRESETS,
    AutoencoderKL,
    VAEConfig,
    sample_posterior,
    scale_latents,
    unscale_latents,
    vae_preset,
)

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "T5Config",
    "T5Encoder",
    "TextEncoder",
    "VAEConfig",
    "decode_tiled",
    "encode_tiled",
    "sample_posterior",
    "scale_latents",
    "t5_preset",
    "unscale_latents",
    "vae_preset",
]
