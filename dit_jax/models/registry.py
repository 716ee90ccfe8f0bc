"""Model families, named presets, and helpers that work on any config: build, init, layouts, counting."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dit_jax.encoders import t5, vae
from dit_jax.models import dit, pixart
from dit_jax.models.config import ExecutionConfig
from dit_jax.nn.stack import scan_layout, unscan_layout

ModelConfig = dit.DiTConfig | pixart.PixArtConfig | vae.VAEConfig | t5.T5Config

FAMILIES: dict[str, tuple[type, type]] = {
    "dit": (dit.DiTConfig, dit.DiT),
    "pixart": (pixart.PixArtConfig, pixart.PixArt),
    "vae": (vae.VAEConfig, vae.AutoencoderKL),
    "t5": (t5.T5Config, t5.T5Encoder),
}
PRESETS: dict[str, ExecutionConfig] = {**dit.PRESETS, **pixart.PRESETS}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config (e.g. ``"DiT-XL/2"``, ``"PixArt-Sigma-XL-2-1024-MS"``), with ``overrides``."""
    if name not in PRESETS:
        close = [p for p in PRESETS if name.lower().replace("_", "-") in p.lower()]
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}.{hint} Known presets: {list_presets()}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config.to_dict()``; the ``family`` key picks the config class."""
    family = d.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(d)


def build(config: ModelConfig) -> nn.Module:
    """The Linen module for ``config``."""
    for config_cls, module_cls in FAMILIES.values():
        if isinstance(config, config_cls):
            return module_cls(config)
    raise TypeError(f"build() takes a model config, got {type(config).__name__}")


def _init(config: ModelConfig, key: jax.Array):
    return build(config).init(key, *config.dummy_inputs(1))["params"]


def init_params(config: ModelConfig, key: jax.Array | int = 0) -> dict[str, Any]:
    """Freshly initialised float32 parameters (the originals' init: zero adaLN and output layers, …)."""
    if isinstance(key, int):
        key = jax.random.key(key)
    return nn.meta.unbox(jax.jit(_init, static_argnums=0)(config, key))


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter shapes/dtypes with their logical-axis metadata (``nn.LogicallyPartitioned`` boxes), no compute."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def logical_param_specs(config: ModelConfig):
    """A pytree of logical ``PartitionSpec``s matching the parameters (map to the mesh with logical rules)."""
    return nn.get_partition_spec(abstract_params(config))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def set_scan(config: ModelConfig, params: dict[str, Any], scan: bool) -> tuple[ModelConfig, dict[str, Any]]:
    """Switch between the looped (``blocks_{i}``) and scanned (``stage_{j}``) parameter layouts."""
    if config.scan_blocks == scan:
        return config, params
    kinds = config.layer_kinds()
    params = scan_layout(params, kinds) if scan else unscan_layout(params, kinds)
    return dataclasses.replace(config, scan_blocks=scan), params
