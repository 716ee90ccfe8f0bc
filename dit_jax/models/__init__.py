"""Model families (one file each) and the registry: ``build(config)``, ``preset(name)``."""

from dit_jax.models.dit import DiT, DiTConfig
from dit_jax.models.pixart import PixArt, PixArtConfig, enable_kv_compress
from dit_jax.models.registry import (
    FAMILIES,
    PRESETS,
    ModelConfig,
    abstract_params,
    build,
    config_from_dict,
    count_params,
    init_params,
    list_presets,
    logical_param_specs,
    preset,
    set_scan,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "DiT",
    "DiTConfig",
    "ModelConfig",
    "PixArt",
    "PixArtConfig",
    "abstract_params",
    "build",
    "config_from_dict",
    "count_params",
    "enable_kv_compress",
    "init_params",
    "list_presets",
    "logical_param_specs",
    "preset",
    "set_scan",
]
