"""What the family conversion modules (``dit``, ``pixart``) share, and the interface ``api`` calls each of them by.

A family module exposes:

- ``FAMILY`` (its name), ``CONFIG`` (its config class), ``DIFFUSERS_CLASS`` (the diffusers model class);
- ``TORCH_WRAP: dict[str, str]``: per format, the key under which a written ``.pt`` wraps the state dict (a format
  not listed is written unwrapped);
- ``detect(keys) -> "original" | "diffusers" | None`` and ``is_diffusers_config(config_json) -> bool``;
- ``rules(config, fmt, *, for_export=False) -> (rules, star)``: the expanded rule table and the ``{*}`` copy count;
- ``ignored(fmt) -> (key -> bool)``: torch keys dropped on import;
- ``check_state_dict(state_dict, fmt, depth, source)``: checks beyond the rule table (raises ``ConversionError``);
- ``infer_config(state_dict, diffusers_config, fmt, source) -> infer.Inference``;
- ``export_extras(config, params, fmt) -> dict``: torch keys beyond the rule table;
- ``check_export(config, fmt)``: errors for what ``fmt`` cannot hold, warnings where its reference differs;
- ``diffusers_config(config) -> dict``: the ``config.json`` of the equivalent diffusers model.

Both families follow the same layout where they overlap (patch embedding, self-attention and MLP of each block), so
those rules, the diffusers ``config.json`` fields they read and write alike, and the stored ``pos_embed`` live here.
"""

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert import infer, io
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, dense, linear, stacked_dense
from dit_jax.nn.embeddings import sincos_pos_embed

DIFFUSERS_VERSION = "0.42.1"

# Torch prefixes both families share, per format.
BLOCK = {"original": "blocks.{i}", "diffusers": "transformer_blocks.{i}"}
_PATCH = {"original": "x_embedder.proj", "diffusers": "pos_embed.proj"}
_MLP = {"original": ("mlp.fc1", "mlp.fc2"), "diffusers": ("ff.net.0.proj", "ff.net.2")}
# diffusers config.json values both families need (and write).
_DIFFUSERS_FIXED = {"activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False}


def unknown_format(name: str, fmt: str) -> ValueError:
    return ValueError(f"unknown {name} checkpoint format {fmt!r}; expected 'original' or 'diffusers'")


# ---- detection ---------------------------------------------------------------------------------------------------


def detector(original_mark: str, diffusers_mark: str, name: str) -> Callable[[set[str]], str | None]:
    """``detect(keys)``: ``"original"`` if ``original_mark`` is a key, ``"diffusers"`` if ``diffusers_mark`` is."""

    def detect(keys: set[str]) -> str | None:
        if original_mark in keys:
            return "original"
        if diffusers_mark in keys:
            return "diffusers"
        return None

    detect.__doc__ = f'``"original"``/``"diffusers"`` if the keys are a {name}\'s, else None.'
    return detect


def diffusers_config_matcher(class_name: str, norm_type: str, name: str) -> Callable[[Mapping[str, Any]], bool]:
    """``is_diffusers_config(d)``: ``class_name``, or a generic ``Transformer2DModel`` with ``norm_type``."""

    def is_diffusers_config(d: Mapping[str, Any]) -> bool:
        cls = d.get("_class_name")
        return cls == class_name or (cls == "Transformer2DModel" and d.get("norm_type") == norm_type)

    is_diffusers_config.__doc__ = (
        f"A diffusers ``config.json`` of a {name} (``{class_name}`` or ``Transformer2DModel`` + {norm_type})."
    )
    return is_diffusers_config


def ignored(fmt: str) -> Callable[[str], bool]:
    """Keys dropped on import: the fixed positional table (we compute it)."""
    return lambda key: key in infer.POS_EMBED_KEYS


# ---- rules both families share -----------------------------------------------------------------------------------


def patch_embed_rules(fmt: str) -> list[Rule]:
    """The patch-embedding conv."""
    return dense(_PATCH[fmt], "x_embedder/proj", conv())


def attention_rules(fmt: str, heads: int, head_dim: int) -> list[Rule]:
    """Block ``{i}``'s self-attention: fused (original) or separate (diffusers) q/k/v, and the output projection."""
    blk, hd = BLOCK[fmt], (heads, head_dim)
    if fmt == "original":
        qkv = dense(f"{blk}.attn.qkv", "blocks_{i}/attn/qkv", linear(out_shape=(3, *hd)), bias((3, *hd)))
        proj = f"{blk}.attn.proj"
    else:
        qkv = stacked_dense(tuple(f"{blk}.attn1.to_{n}" for n in "qkv"), "blocks_{i}/attn/qkv", hd)
        proj = f"{blk}.attn1.to_out.0"
    return [*qkv, *dense(proj, "blocks_{i}/attn/proj", linear(in_shape=hd))]


def mlp_rules(fmt: str) -> list[Rule]:
    """Block ``{i}``'s MLP ``fc1``, ``fc2``."""
    return [r for t, f in zip(_MLP[fmt], ("fc1", "fc2")) for r in dense(f"{BLOCK[fmt]}.{t}", f"blocks_{{i}}/mlp/{f}")]


# ---- import: inference from the keys or config.json ----------------------------------------------------------------


def infer_backbone(
    state_dict: Mapping[str, np.ndarray], inf: infer.Inference, fmt: str, source: str, *, block_key: str, final: str
) -> tuple[int, int]:
    """Width, channels, patch, depth, mlp_ratio, learn_sigma and (soft) heads from the keys; ``(width, patch)``.

    ``block_key``: a key every block has (after ``blocks.N.``); ``final``: the output linear's weight.
    """
    f = inf.fields
    d, cin, p, _ = infer.shape(state_dict, f"{_PATCH[fmt]}.weight", source)
    f.update(hidden_size=d, in_channels=cin, patch_size=p)
    f["depth"] = infer.depth_from(state_dict, f"{BLOCK[fmt].replace('{i}', '{n}')}.{block_key}", source)
    f["mlp_ratio"] = infer.shape(state_dict, f"{BLOCK[fmt].format(i=0)}.{_MLP[fmt][0]}.weight", source)[0] / d
    f["learn_sigma"] = infer.out_channels(infer.shape(state_dict, final, source)[0], p, cin, source)
    infer.heads(d, inf)
    return d, p


def read_diffusers_config(
    c: Mapping[str, Any],
    inf: infer.Inference,
    source: str,
    *,
    name: str,
    norm_type: str,
    out_default: int | None = None,
    expected: Mapping[str, Any] | None = None,
) -> None:
    """Check ``config.json`` against the values a ``name`` needs, then read the fields both families read alike.

    ``out_default``: ``out_channels`` when absent (None: ``in_channels``).
    """
    for k, v in {"norm_type": norm_type, **_DIFFUSERS_FIXED, **(expected or {})}.items():
        if k in c and c[k] != v:
            raise ConversionError(f"{source}: config.json has {k}={c[k]!r}; a {name} needs {v!r}")
    f = inf.fields
    f["num_heads"] = int(c.get("num_attention_heads", 16))
    f["hidden_size"] = f["num_heads"] * int(c.get("attention_head_dim", 72))
    f["in_channels"] = int(c.get("in_channels", 4))
    out = c.get("out_channels", out_default)
    out = f["in_channels"] if out is None else out
    if out not in (f["in_channels"], 2 * f["in_channels"]):
        raise ConversionError(f"{source}: out_channels={out} is neither in_channels nor 2·in_channels")
    f["learn_sigma"] = out == 2 * f["in_channels"]
    f["depth"] = int(c.get("num_layers", 28))
    f["patch_size"] = int(c.get("patch_size", 2))


# ---- export --------------------------------------------------------------------------------------------------------


def pos_embed_export(fmt: str, grid: int, width: int, base_size: float, interpolation: float) -> dict[str, np.ndarray]:
    """The original format's fixed ``pos_embed`` buffer (``grid``² tokens); nothing for diffusers."""
    if fmt != "original":
        return {}
    pos = sincos_pos_embed(grid, grid, width, base_size=base_size, interpolation=interpolation)
    return {"pos_embed": pos[None]}


def check_mlp_ratio(config: Any, class_name: str) -> None:
    """diffusers' transformer blocks have a fixed MLP ratio of 4."""
    if config.mlp_ratio != 4.0:
        raise ConversionError(f"diffusers' {class_name} has mlp_ratio 4; this model has {config.mlp_ratio}")


def diffusers_config(config: Any, class_name: str, *, norm_type: str, norm_eps: float, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` fields both families write alike, plus the family's ``extra``."""
    return {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "upcast_attention": False,
        "norm_type": norm_type,
        "norm_eps": norm_eps,
        **_DIFFUSERS_FIXED,
        **extra,
    }


# ---- text encoders: one transformers layout, the same glue to the interface above ------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoderConversion:
    """The interface above for a transformers text encoder (T5, CLIP): one key layout, which both of ``api``'s
    format names mean; folders are claimed by their ``config.json`` ``model_type``. A module binds the methods to its
    module-level names (``detect = _API.detect`` …)."""

    model_types: tuple[str, ...]
    marker: str  # a key suffix only this encoder's state dicts have
    from_torch: Callable[..., Any]  # (path or state dict, config=None, **overrides) -> (config, params)
    to_torch: Callable[[Any, Any], dict]  # (config, params) -> state dict
    config_from: Callable[..., Any]  # (config.json dict, state dict, **overrides) -> config
    write: Callable[..., Path]  # (path, config, params, overwrite=) -> path

    def detect(self, keys) -> str | None:
        """``"diffusers"`` (transformers keys) when the state dict is this encoder's, else None."""
        return "diffusers" if any(k.endswith(self.marker) for k in keys) else None

    def is_diffusers_config(self, d: Mapping[str, Any]) -> bool:
        return d.get("model_type") in self.model_types

    def claims_folder(self, path: Path) -> bool:
        """A transformers folder of this encoder (or a pipeline folder whose ``text_encoder/`` is one)."""
        return io.transformers_model_type(path) in self.model_types

    def import_path(self, path: Path, **overrides: Any):
        return self.from_torch(path, **overrides)

    def import_checkpoint(self, state_dict, transformers_config, fmt: str, source: str, **overrides: Any):
        if transformers_config:
            return self.from_torch(state_dict, config=self.config_from(transformers_config, state_dict, **overrides))
        return self.from_torch(state_dict, **overrides)

    def export_checkpoint(self, config, params, fmt: str) -> dict:
        return self.to_torch(config, params)

    def write_folder(self, path: Path, config, params, *, overwrite: bool = False) -> Path:
        return self.write(path, config, params, overwrite=overwrite)
