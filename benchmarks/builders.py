"""The same random-weight model on both sides: JAX parameters, exported through ``dit_jax.convert`` into the
equivalent diffusers module, so a benchmark compares the same configuration and the same arithmetic.

Zero-initialised layers (adaLN-Zero, the final layer) are re-randomised first: a model whose output is exactly
zero would make a sampler's trajectory degenerate.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models
from dit_jax.encoders import AutoencoderKL, VAEConfig


def randomize_zeros(params, seed: int = 0, std: float = 0.02):
    """Replace every all-zero leaf of ``params`` by N(0, std²) noise (weights and biases alike)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if np.any(x):
            return jnp.asarray(x)
        return jnp.asarray(rng.normal(0.0, std, x.shape).astype(x.dtype))

    return jax.tree.map(fill, params)


def jax_model_params(config, seed: int = 0):
    """Random float32 parameters of a model config (any family; no all-zero layers)."""
    return randomize_zeros(models.init_params(config, seed), seed)


def jax_vae_params(config: VAEConfig, seed: int = 0):
    """Random float32 parameters of an AutoencoderKL config (no all-zero layers)."""
    vae = AutoencoderKL(config)
    params = jax.jit(lambda k: vae.init(k, *config.dummy_inputs(1))["params"])(jax.random.key(seed))
    return randomize_zeros(nn.meta.unbox(params), seed)


def _load(module, state_dict, device: str, dtype):
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)
    tensors = {}
    for k in list(state_dict):  # one float32 copy at most, the exported arrays dropped as they are taken
        a = np.asarray(state_dict.pop(k), np.float32)
        tensors[k] = torch.from_numpy(a if a.flags.writeable else a.copy())
    # assign: the module takes these tensors as its parameters (its random ones are freed, none copied), so a
    # full-size model (Wan 1.3B: 5.7 GB in fp32) is held twice at most, not four times
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"exported weights do not fit {type(module).__name__}: {missing=} {unexpected=}")
    return module.to(device, dtype)


def torch_transformer(config, params, device: str, dtype):
    """The diffusers transformer of ``config`` holding ``params``: the class its diffusers config names
    (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``)."""
    import diffusers

    from dit_jax.convert.api import diffusers_config, to_torch

    full = diffusers_config(config)
    cls = getattr(diffusers, full["_class_name"])
    cfg = {k: v for k, v in full.items() if not k.startswith("_")}
    with warnings.catch_warnings():  # DiT's original timestep frequencies vs diffusers': same cost, other numbers
        warnings.simplefilter("ignore")
        state_dict = to_torch(config, params, format="diffusers")
    return _load(cls(**cfg), state_dict, device, dtype)


def torch_vae(config: VAEConfig, params, device: str, dtype):
    """The diffusers ``AutoencoderKL`` of ``config`` holding ``params``."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    from dit_jax.convert.vae import config_to_diffusers, vae_to_torch

    cfg = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    return _load(TorchAutoencoderKL(**cfg), vae_to_torch(config, params), device, dtype)
