"""Helpers that work on any registered family's config: presets by name, build, init, layouts, counting, checks.

Families register themselves (``dit_jax.models.family.register``) when their module is imported; this module
imports none of them. ``dit_jax.models`` imports the diffusion transformers, ``dit_jax.encoders`` the VAE and T5.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dit_jax.models.config import ExecutionConfig
from dit_jax.models.family import families, family_named, family_of
from dit_jax.nn.stack import scan_layout, unscan_layout

ModelConfig = ExecutionConfig  # every family's config derives from it


class _Live(Mapping):
    """A read-only view over the registered families, current at each lookup."""

    def __init__(self, view):
        self._view = view

    def _table(self) -> dict[str, Any]:
        return self._view()

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


#: family name → (config class, module class)
FAMILIES: Mapping[str, tuple[type, type]] = _Live(
    lambda: {n: (f.config_class, f.module_class) for n, f in families().items()}
)
#: preset name → config, over every registered family
PRESETS: Mapping[str, ExecutionConfig] = _Live(
    lambda: {k: v for f in families().values() for k, v in f.presets.items()}
)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config (e.g. ``"DiT-XL/2"``, ``"PixArt-Sigma-XL-2-1024-MS"``), with ``overrides``."""
    presets = dict(PRESETS)
    if name not in presets:
        close = [p for p in presets if name.lower().replace("_", "-") in p.lower()]
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}.{hint} Known presets: {sorted(presets)}")
    return dataclasses.replace(presets[name], **overrides) if overrides else presets[name]


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config.to_dict()``; the ``family`` key picks the config class."""
    return family_named(d.get("family")).config_class.from_dict(d)


def build(config: ModelConfig) -> nn.Module:
    """The Linen module for ``config``."""
    try:
        family = family_of(config)
    except TypeError:
        raise TypeError(f"build() takes a model config, got {type(config).__name__}") from None
    return family.module_class(config)


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


def param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of a (possibly boxed or abstract) parameter tree."""
    # strip the boxes without nn.meta.unbox: under a mesh and logical rules that would constrain abstract values
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda x: x.value if is_box(x) else x, params, is_leaf=is_box)
    )
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in leaves}


def param_mismatches(config: ModelConfig, params: Any) -> list[str]:
    """``"path: expected S, found S'"`` for every parameter that ``params`` lacks, adds or shapes otherwise than
    ``config`` (in the config's layout); empty when they fit."""
    want = param_shapes(abstract_params(config))
    got = param_shapes(params)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    return [f"{k}: expected {want.get(k, 'nothing')}, found {got.get(k, 'nothing')}" for k in bad]


def check_params(config: ModelConfig, params: Any, where: str, *, error: type[Exception] = ValueError) -> None:
    """One ``error`` naming every parameter of ``params`` (from ``where``) that does not fit ``config``."""
    bad = param_mismatches(config, params)
    if bad:
        raise error(f"{where}: the params do not match the config:\n  " + "\n  ".join(bad))


def set_scan(config: ModelConfig, params: dict[str, Any], scan: bool) -> tuple[ModelConfig, dict[str, Any]]:
    """Switch between the looped (``blocks_{i}``) and scanned (``stage_{j}``) parameter layouts."""
    if config.scan_blocks == scan:
        return config, params
    kinds = config.layer_kinds()
    params = scan_layout(params, kinds) if scan else unscan_layout(params, kinds)
    return dataclasses.replace(config, scan_blocks=scan), params
