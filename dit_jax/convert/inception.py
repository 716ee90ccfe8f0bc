"""The FID Inception's conversion: pytorch-fid's ``pt_inception-2015-12-05-*.pth`` state dict ↔ Flax params.

Keys (torchvision ``Inception3`` names, as pytorch-fid's ``FIDInceptionA/C/E`` keep them): every conv-BN layer
``{layer}.conv.weight`` (O, I, kh, kw), ``{layer}.bn.weight/.bias/.running_mean/.running_var`` for ``layer`` in
``Conv2d_1a_3x3`` … ``Conv2d_4a_3x3`` and the branches of ``Mixed_5b`` … ``Mixed_7c`` (``Mixed_6b.branch7x7_2``,
``Mixed_7c.branch3x3dbl_3a`` …), then ``fc.weight`` (1008, 2048) and ``fc.bias``. BatchNorm's
``num_batches_tracked`` counters are ignored on import and not written on export (torch loads a BatchNorm state
without them). One table serves import and export (``dit_jax.convert.rules``), so round trips are bit-exact.

Nothing is downloaded: ``load_inception`` reads a file the user has, and a missing file is one error that says
where pytorch-fid publishes it.
"""

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import expected_shapes
from dit_jax.convert.rules import ConversionError, Rule, conv, dense, export, import_, rule
from dit_jax.encoders.inception import InceptionConfig

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
_MARKS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")


@functools.lru_cache(maxsize=4)
def _shapes(config: InceptionConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(config)  # traces the network once per config


def conv_layers(config: InceptionConfig) -> tuple[str, ...]:
    """The Flax paths of the conv-BN layers (``Mixed_5b/branch1x1`` …), read off the module's parameter shapes."""
    suffix = "/conv/kernel"
    return tuple(sorted(p[: -len(suffix)] for p in _shapes(config) if p.endswith(suffix)))


def inception_rules(config: InceptionConfig) -> list[Rule]:
    """The conversion table: per conv-BN layer ``{layer}.conv.weight`` ↔ ``{layer}/conv/kernel`` (transposed to
    HWIO) and ``{layer}.bn.{weight,bias,running_mean,running_var}`` ↔ ``{layer}/bn/{scale,bias,mean,var}``; ``fc``."""
    rules = []
    for layer in conv_layers(config):
        t = layer.replace("/", ".")
        rules.append(rule(f"{t}.conv.weight", f"{layer}/conv/kernel", conv()))
        rules += [rule(f"{t}.bn.{torch_name}", f"{layer}/bn/{flax_name}") for torch_name, flax_name in _BN]
    return rules + dense("fc", "fc")


def _ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def inception_from_torch(
    state_dict: Mapping[str, Any], *, source: str = "state dict", **overrides: Any
) -> tuple[InceptionConfig, dict[str, Any]]:
    """A pytorch-fid FID Inception state dict → ``(InceptionConfig, float32 params)``; ``num_classes`` comes from
    ``fc.weight``, ``overrides`` set other fields (e.g. ``dtype="bfloat16"``)."""
    sd = {k: io.to_float32(v) for k, v in state_dict.items()}
    if "fc.weight" not in sd:
        raise ConversionError(f"{source}: key 'fc.weight' is missing; expected pytorch-fid's FID Inception weights")
    fields = {"num_classes": int(np.shape(sd["fc.weight"])[0]), **overrides}
    try:
        config = InceptionConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid Inception config: {e}") from e
    params = import_(
        inception_rules(config), sd, expected=dict(_shapes(config)), ignore=_ignored,
        source=f"{source} (pytorch-fid FID Inception keys)",
    )  # fmt: skip
    return config, params


def inception_to_torch(config: InceptionConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Export params to pytorch-fid's FID Inception state dict (numpy; no ``num_batches_tracked``)."""
    return export(inception_rules(config), params)


def load_inception(path: str | os.PathLike, **overrides: Any) -> tuple[InceptionConfig, dict[str, Any]]:
    """Read the FID Inception weights from a local ``.pth`` (or ``.safetensors``) file → ``(config, params)``.

    A missing file is a ``FileNotFoundError`` saying where pytorch-fid publishes the weights; nothing is downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {str(path)!r} not found{' (it is a folder)' if path.is_dir() else ''}. FID needs "
            f"pytorch-fid's FID Inception weights ({WEIGHTS_NAME}): download them yourself from {WEIGHTS_URL} "
            "and pass the local file; dit_jax downloads nothing."
        )
    return inception_from_torch(io.read_file(path), source=str(path), **overrides)


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch``/``save_torch`` for every family) ----
# The FID Inception has one layout (pytorch-fid's); api's "original" format names it.

FAMILY = "inception"
DIFFUSERS_CLASS = "(none: pytorch-fid InceptionV3)"
TORCH_WRAP: dict[str, str] = {}


def detect(keys) -> str | None:
    """``"original"`` for a pytorch-fid / torchvision Inception-v3 state dict, else None."""
    return "original" if all(k in keys for k in _MARKS) else None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    return False


def import_checkpoint(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str, **overrides: Any
) -> tuple[InceptionConfig, dict[str, Any]]:
    """``convert.from_torch`` of the FID Inception."""
    return inception_from_torch(state_dict, source=source, **overrides)


def export_checkpoint(config: InceptionConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """``convert.to_torch`` of the FID Inception (pytorch-fid's keys, whatever ``fmt``)."""
    return inception_to_torch(config, params)


def diffusers_config(config: InceptionConfig) -> dict[str, Any]:
    raise ValueError("the FID Inception has no diffusers config; save it as a .pth or .safetensors file")
