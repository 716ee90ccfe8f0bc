"""``from_torch`` / ``to_torch``: detect the family and format, build the config, run the family's rule table.

Config precedence: the family defaults (or ``preset=``) < what the checkpoint says (keys, shapes, ``config.json``)
< explicit overrides. Guesses such as heads from a published width rank below a preset. A field that is needed but
neither inferable nor given is one clear error naming it.
"""

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.convert import io
from dit_jax.convert.rules import ConversionError, export, flatten, import_, unflatten
from dit_jax.models import abstract_params, families, family_of, param_mismatches, preset, set_scan
from dit_jax.models.registry import ModelConfig
from dit_jax.quantize import QuantizeConfig, quantize_config, quantize_kernel, quantize_params, select

FORMATS = ("original", "diffusers")
# Stability single files hold the diffusion model under this prefix (beside first_stage_model. and text encoders).
SINGLE_FILE_PREFIX = "model.diffusion_model."


def model_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion model's part of a Stability single file (``model.diffusion_model.*``, prefix removed), or the
    whole state dict when it has no such keys."""
    sub = {k[len(SINGLE_FILE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(SINGLE_FILE_PREFIX)}
    return sub or dict(state_dict)


def conversion_modules() -> dict[str, ModuleType]:
    """Family name → its conversion module (``Family.conversion``), for every registered family that has one."""
    return {name: importlib.import_module(f.conversion) for name, f in families().items() if f.conversion}


def _family_of_config(config: ModelConfig) -> ModuleType:
    modules = conversion_modules()
    try:
        name = family_of(config).name
    except TypeError:
        name = None
    if name not in modules:
        raise TypeError(f"no torch conversion for {type(config).__name__}; supported: {sorted(modules)}")
    return modules[name]


def detect(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any] | None = None, *, source: str = "checkpoint"
) -> tuple[str, str]:
    """``(family, format)`` of a checkpoint from its keys (and a diffusers ``config.json`` when there is one)."""
    keys = set(state_dict)
    modules = conversion_modules()
    found = [(name, fmt) for name, m in modules.items() if (fmt := m.detect(keys))]
    if diffusers_config is not None:
        by_config = [name for name, m in modules.items() if m.is_diffusers_config(diffusers_config)]
        if not by_config:
            raise ConversionError(
                f"{source}: config.json describes a {diffusers_config.get('_class_name')!r} "
                f"(norm_type={diffusers_config.get('norm_type')!r}); supported: "
                f"{[m.DIFFUSERS_CLASS for m in modules.values()]}"
            )
        if found and found[0] != (by_config[0], "diffusers"):
            raise ConversionError(
                f"{source}: config.json describes a diffusers {by_config[0]} but the weights look like {found[0]}"
            )
        return by_config[0], "diffusers"
    if len(found) != 1:
        sample = sorted(keys)[:8]
        raise ConversionError(
            f"{source}: cannot tell the model family and format from its keys (first keys: {sample}); expected a "
            f"checkpoint of {' or '.join(families()[n].display_name for n in modules)} in the original or diffusers "
            "format"
        )
    return found[0]


def _merge_config(
    module: ModuleType, inference, overrides: dict[str, Any], preset_name: str | None, source: str
) -> ModelConfig:
    cls = module.CONFIG
    if preset_name is not None:
        base = preset(preset_name)
        if not isinstance(base, cls):
            raise ValueError(f"preset {preset_name!r} is a {type(base).__name__}, but {source} is a {module.FAMILY}")
        fields = {}
    else:
        base = cls()
        fields = dict(inference.soft)
    fields.update(inference.fields)
    fields.update(overrides)
    # A preset supplies every field; otherwise each field the checkpoint cannot tell must be overridden.
    absent = {} if preset_name is not None else {k: w for k, w in inference.missing.items() if k not in overrides}
    if absent:
        lines = [f"{k}: {why}; pass {k}=... (or preset=...)" for k, why in absent.items()]
        raise ConversionError(f"{source}: cannot infer " + "; ".join(lines))
    try:
        config = dataclasses.replace(base, **fields)
        return cls.from_dict(config.to_dict())  # JSON types → field types (lists → tuples, ints → floats)
    except ValueError as e:
        raise ValueError(f"{source}: the inferred config is invalid: {e}") from e


def _check_overrides(module: ModuleType, overrides: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(module.CONFIG)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown {module.CONFIG.__name__} override(s) {unknown}; known fields: {sorted(known)} and 'preset'"
        )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax path → parameter shape in the loop layout (what a converted checkpoint must produce)."""
    return dict(_loop_shapes(dataclasses.replace(config, scan_blocks=False)))


@functools.lru_cache(maxsize=16)
def _loop_shapes(loop: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``expected_shapes``, traced once per config (tracing a deep model is slower than converting a small one)."""
    return tuple((k, tuple(v.shape)) for k, v in flatten(nn.meta.unbox(abstract_params(loop))).items())


def finisher(
    expected: Mapping[str, tuple[int, ...]], quantize: QuantizeConfig | None, kernel_dtype: Any = None
) -> Callable[[str, Any], Any]:
    """What ``import_`` keeps of each converted leaf: float32; with ``quantize`` the quantised kernel for the paths it
    chooses (``select`` over the model's abstract params: the kernels ``quantize_params`` would choose); with
    ``kernel_dtype`` (e.g. bfloat16) the other ``kernel`` leaves in that dtype (what a text encoder stores)."""

    def as_float(path: str, x: Any) -> np.ndarray:
        kernel = kernel_dtype is not None and path.rsplit("/", 1)[-1] == "kernel"
        return np.asarray(x, kernel_dtype if kernel else np.float32)

    if quantize is None:
        return as_float
    abstract = unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in expected.items()})
    chosen = set(select(abstract, quantize))
    if not chosen:
        quantize_params(abstract, quantize)  # one error: nothing to quantise

    def finish(path: str, x: Any) -> Any:
        if path not in chosen:
            return as_float(path, x)
        bias = expected.get(path.rsplit("/", 1)[0] + "/bias")
        return quantize_kernel(path, np.asarray(x, np.float32), bias, quantize)

    return finish


def from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    format: str | None = None,
    diffusers_config: Mapping[str, Any] | None = None,
    source: str = "state dict",
    quantize: Any = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, dict[str, Any]]:
    """A torch state dict (numpy arrays of any float dtype, e.g. memory-mapped bf16, or tensors) → ``(config,
    params)``; see ``from_torch``. NumPy arrays are converted to float32 one conversion rule at a time."""
    if format not in (None, *FORMATS):
        raise ValueError(f"format={format!r} is invalid: expected None (detect), 'original' or 'diffusers'")
    quantize = quantize_config(quantize)
    state_dict = model_keys({k: v if isinstance(v, np.ndarray) else io.to_float32(v) for k, v in state_dict.items()})
    family, fmt = detect(state_dict, diffusers_config, source=source)
    if format is not None and format != fmt:
        raise ConversionError(f"{source}: format={format!r} was requested but the checkpoint is in the {fmt} format")
    module = conversion_modules()[family]
    if hasattr(module, "import_checkpoint"):  # a family that converts without a rule table of this module's kind
        state_dict = {k: io.to_float32(v) for k, v in state_dict.items()}
        config, params = module.import_checkpoint(state_dict, diffusers_config, fmt, source, **config_overrides)
        return config, params if quantize is None else quantize_params(params, quantize)
    overrides = dict(config_overrides)
    preset_name = overrides.pop("preset", None)
    _check_overrides(module, overrides)
    scan = bool(overrides.pop("scan_blocks", False))
    inference = module.infer_config(state_dict, diffusers_config, fmt, source)
    config = _merge_config(module, inference, overrides, preset_name, source)
    config = dataclasses.replace(config, scan_blocks=False)
    table, star = module.rules(config, fmt)
    module.check_state_dict(state_dict, fmt, config.depth, source)
    params = import_params(table, state_dict, config, quantize=quantize, star=star, ignore=module.ignored(fmt),
                           source=source)  # fmt: skip
    return set_scan(config, params, scan)


def import_params(
    table: Any,
    state_dict: Mapping[str, Any],
    config: Any,
    *,
    quantize: Any = None,
    kernel_dtype: Any = None,
    **import_kwargs: Any,
) -> dict[str, Any]:
    """``rules.import_`` of a state dict whose arrays may be memory-mapped in any float dtype: each rule's arrays
    are converted to float32 as it runs, each produced leaf kept as float32, quantised (``quantize``) or, for other
    kernels, cast to ``kernel_dtype`` at once (``finisher``), so neither the float32 state dict nor the float32 params
    are ever held whole."""
    expected = expected_shapes(config)
    finish = finisher(expected, quantize_config(quantize), kernel_dtype)
    return import_(table, state_dict, expected=expected, prepare=io.to_float32, finish=finish, **import_kwargs)


def from_torch(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    weights: str = "ema",
    quantize: Any = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Import a PyTorch DiT/PixArt checkpoint → ``(config, params)`` (nested dicts of float32 numpy arrays).

    ``path``: ``.pt/.pth/.bin`` (``weights`` picks ``"ema"`` or ``"model"`` from training checkpoints),
    ``.safetensors``, a shard ``*.index.json``, or a diffusers model/pipeline folder. ``format``: None (detect),
    ``"original"`` or ``"diffusers"``. ``config_overrides``: config fields the checkpoint cannot tell (e.g.
    ``num_heads``), ``preset="DiT-XL/2"`` for defaults, ``scan_blocks=True`` for the scanned layout.
    ``quantize``: ``"int8"``, ``"int4"`` or a ``dit_jax.quantize.QuantizeConfig``: the params as
    ``quantize_params`` gives them. Safetensors weights are memory-mapped and each kernel is quantised as it is
    converted, so the float32 model is never held whole (FLUX.1-dev int4: about its 6.7 GB, not 47.6 GB of float32).
    """
    quantize = quantize_config(quantize)
    for module in conversion_modules().values():  # folders of their own layout (transformers text encoders)
        if hasattr(module, "claims_folder") and module.claims_folder(Path(path)):
            return module.import_path(Path(path), quantize=quantize, **config_overrides)  # quantised as read too
    state_dict, diffusers_config, source = io.read_checkpoint(path, weights, convert=False)
    return from_state_dict(
        state_dict,
        format=format,
        diffusers_config=diffusers_config,
        source=source,
        quantize=quantize,
        **config_overrides,
    )


def to_torch(config: ModelConfig, params: Mapping[str, Any], *, format: str) -> dict[str, np.ndarray]:
    """``(config, params)`` → a torch-format state dict of float32 numpy arrays (``"original"`` or ``"diffusers"``)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is invalid: expected 'original' or 'diffusers'")
    module = _family_of_config(config)
    if hasattr(module, "export_checkpoint"):
        return module.export_checkpoint(config, params, format)
    module.check_export(config, format)
    if config.scan_blocks:
        config, params = set_scan(config, params, False)
    problems = param_mismatches(config, params)
    if problems:
        raise ConversionError("params do not match the config:\n  " + "\n  ".join(problems))
    table, star = module.rules(config, format, for_export=True)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    out = export(table, params, star=star)
    out.update(module.export_extras(config, params, format))
    return out


def diffusers_config(config: ModelConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` of ``config``."""
    return _family_of_config(config).diffusers_config(config)


def save_torch(
    path: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[str, Any],
    *,
    format: str,
    overwrite: bool = False,
) -> Path:
    """Export and write: ``*.safetensors``, ``*.pt``/``.pth``/``.bin``, or (no suffix, diffusers) a model folder.

    Original-format PixArt ``.pt`` files are wrapped as ``{"state_dict": ...}``, as the PixArt scripts load them.
    """
    path = Path(path)
    state_dict = to_torch(config, params, format=format)
    if path.suffix == ".safetensors":
        return io.write_safetensors(path, state_dict, overwrite=overwrite)
    if path.suffix in io.TORCH_SUFFIXES:
        wrap = _family_of_config(config).TORCH_WRAP.get(format)
        return io.write_torch(path, state_dict, wrap=wrap, overwrite=overwrite)
    if path.suffix == "" and format == "diffusers":
        module = _family_of_config(config)
        if hasattr(module, "write_folder"):  # its own folder layout (transformers text encoders)
            return module.write_folder(path, config, params, overwrite=overwrite)
        return io.write_diffusers_folder(path, diffusers_config(config), state_dict, overwrite=overwrite)
    raise ValueError(
        f"{path}: expected a .safetensors or .pt file"
        + (", or a folder path without suffix" if format == "diffusers" else " (folders are for format='diffusers')")
    )
