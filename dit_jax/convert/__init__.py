"""PyTorch checkpoint import/export for DiT and PixArt (original repos and diffusers), one rule table per format.

``from_torch(path) -> (config, params)`` reads ``.pt/.pth/.bin``, ``.safetensors`` (no torch needed), sharded
safetensors and diffusers folders; ``to_torch(config, params, format=...)`` gives the state dict back, and
``save_torch`` writes it as a file or a diffusers folder. torch/diffusers are imported only where used.
"""

from dit_jax.convert.api import (
    FORMATS,
    detect,
    diffusers_config,
    expected_shapes,
    from_state_dict,
    from_torch,
    save_torch,
    to_torch,
)
from dit_jax.convert.io import read_checkpoint
from dit_jax.convert.rules import ConversionError

__all__ = [
    "FORMATS",
    "ConversionError",
    "detect",
    "diffusers_config",
    "expected_shapes",
    "from_state_dict",
    "from_torch",
    "read_checkpoint",
    "save_torch",
    "to_torch",
]
