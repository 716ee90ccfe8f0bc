"""Model families (one file each, registered through ``dit_jax.models.family``) and the registry helpers:
``build(config)``, ``preset(name)``, ``family_of(config)``.

Every module of this package is imported here, so a family registers itself by being a file in it.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from dit_jax.models.dit import DiT, DiTConfig
from dit_jax.models.family import Family, families, family_of, register
from dit_jax.models.pixart import PixArt, PixArtConfig, enable_kv_compress
from dit_jax.models.registry import (
    FAMILIES,
    PRESETS,
    ModelConfig,
    abstract_params,
    build,
    check_params,
    config_from_dict,
    count_params,
    init_params,
    list_presets,
    logical_param_specs,
    param_mismatches,
    preset,
    set_scan,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "DiT",
    "DiTConfig",
    "Family",
    "ModelConfig",
    "PixArt",
    "PixArtConfig",
    "abstract_params",
    "build",
    "check_params",
    "config_from_dict",
    "count_params",
    "enable_kv_compress",
    "families",
    "family_of",
    "init_params",
    "list_presets",
    "logical_param_specs",
    "param_mismatches",
    "preset",
    "register",
    "set_scan",
]

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
