"""Encoders around the diffusion model: the AutoencoderKL VAE (with tiled encode/decode) and the T5 and CLIP text
encoders.

Each registers itself as a model family (model directories, ``dit_jax.models.build``); every module of this package
is imported here, so an encoder registers itself by being a file in it. Loading a text encoder with its tokenizer is
``dit_jax.pipelines.TextEncoder``.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from dit_jax.encoders.clip import CLIPTextConfig, CLIPTextEncoder, CLIPTextOutput, clip_preset
from dit_jax.encoders.t5 import T5Config, T5Encoder, t5_preset
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
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTextOutput",
    "T5Config",
    "T5Encoder",
    "VAEConfig",
    "clip_preset",
    "decode_tiled",
    "encode_tiled",
    "sample_posterior",
    "scale_latents",
    "t5_preset",
    "unscale_latents",
    "vae_preset",
]

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
