"""dit_jax: Diffusion Transformers (DiT, PixArt-α/Σ) in JAX/Flax, sharded from one CPU to a TPU pod, with exact
PyTorch checkpoint import and export."""

__version__ = "0.1.0"
