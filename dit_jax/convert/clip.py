"""CLIP text-encoder conversion: the transformers key table, config mapping, folder reading, export.

Keys of transformers ``CLIPTextModelWithProjection`` (and of ``CLIPTextModel`` as the Hub stores it, e.g. Flux's
``text_encoder/``): ``text_model.embeddings.{token_embedding,position_embedding}.weight``,
``text_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}.{weight,
bias}``, ``text_model.final_layer_norm.{weight,bias}`` and, projected, ``text_projection.weight`` (no bias).
transformers 5 saves a ``CLIPTextModel`` without the ``text_model.`` prefix; both layouts are read, and the prefix
is written by default (both load in transformers). The ``position_ids`` buffer of older checkpoints is ignored, and
so is the vision tower of a full ``CLIPModel`` (``vision_model.*``, ``visual_projection``, ``logit_scale``). One table
serves import and export (``dit_jax.convert.rules``), so round trips are bit-exact.
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import import_params
from dit_jax.convert.common import TextEncoderConversion
from dit_jax.convert.rules import ConversionError, Rule, bias, dense, export, linear, norm, rule
from dit_jax.encoders.clip import CLIPTextConfig
from dit_jax.files import atomic_path

PREFIX = "text_model."
MODEL_TYPES = ("clip_text_model", "clip")
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}  # → has text_projection
_PROJECTION = "text_projection.weight"
_SUBFOLDERS = ("text_encoder", "text_encoder_2")
# transformers CLIPTextConfig defaults, for fields a config.json leaves out
_HF_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    eos_token_id=49407)  # fmt: skip
_HF_PROJECTION_DEFAULT = 512


def clip_rules(config: CLIPTextConfig, prefix: str = PREFIX) -> list[Rule]:
    """The conversion table (transformers key ↔ Flax path) of a CLIP text encoder; ``prefix`` is ``text_model.``
    (the Hub layout, ``CLIPTextModelWithProjection``) or ``""`` (transformers 5's ``CLIPTextModel.state_dict()``)."""
    h, dh = config.num_attention_heads, config.head_dim
    p = prefix
    rules = [
        rule(f"{p}embeddings.token_embedding.weight", "token_embedding"),
        rule(f"{p}embeddings.position_embedding.weight", "position_embedding"),
        *norm(f"{p}final_layer_norm", "final_norm"),
    ]
    for i in range(config.num_hidden_layers):
        t, f = f"{p}encoder.layers.{i}", f"blocks_{i}"
        rules += norm(f"{t}.layer_norm1", f"{f}/attention_norm")
        for name in ("q", "k", "v"):
            rules += dense(f"{t}.self_attn.{name}_proj", f"{f}/attention/{name}", linear((h, dh)), bias((h, dh)))
        rules += dense(f"{t}.self_attn.out_proj", f"{f}/attention/o", linear(in_shape=(h, dh)))
        rules += norm(f"{t}.layer_norm2", f"{f}/mlp_norm")
        rules += dense(f"{t}.mlp.fc1", f"{f}/mlp/fc1") + dense(f"{t}.mlp.fc2", f"{f}/mlp/fc2")
    if config.projection_dim is not None:
        rules.append(rule(_PROJECTION, "text_projection/kernel", linear()))
    return rules


# ---- config ----------------------------------------------------------------------------------------------------


def _text_config(d: Mapping[str, Any]) -> tuple[dict[str, Any], bool | None, int | None]:
    """``(text config dict, has projection or None if unknown, projection_dim)`` of a ``clip_text_model`` or a full
    ``clip`` config.json."""
    model_type = d.get("model_type", "clip_text_model")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r} is not supported: expected one of {MODEL_TYPES}")
    if model_type == "clip":  # a full CLIPModel: the text tower and its projection
        return dict(d.get("text_config") or {}), True, d.get("projection_dim", _HF_PROJECTION_DEFAULT)
    archs = [a for a in d.get("architectures") or () if a in ARCHITECTURES]
    projected = ARCHITECTURES[archs[0]] if archs else None
    return dict(d), projected, d.get("projection_dim", _HF_PROJECTION_DEFAULT)


def config_from_transformers(
    d: Mapping[str, Any], *, projection: bool | None = None, **overrides: Any
) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from a transformers CLIP ``config.json`` dict (``clip_text_model``, or the text tower of
    a ``clip`` one); missing fields take transformers' defaults. Whether there is a ``text_projection`` comes from
    ``architectures`` (``CLIPTextModel`` / ``CLIPTextModelWithProjection``), else from ``projection``, else yes."""
    text, projected, projection_dim = _text_config(d)
    fields = {k: text.get(k, default) for k, default in _HF_DEFAULTS.items()}
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    if projected is None:
        projected = True if projection is None else projection
    fields["projection_dim"] = projection_dim if projected else None
    return CLIPTextConfig(**{**fields, **overrides})


def config_to_transformers(config: CLIPTextConfig) -> dict[str, Any]:
    """The transformers ``CLIPTextModel`` (``projection_dim`` None) or ``CLIPTextModelWithProjection``
    ``config.json`` dict of ``config``."""
    d = {k: getattr(config, k) for k in _HF_DEFAULTS}
    projected = config.projection_dim is not None
    arch = "CLIPTextModelWithProjection" if projected else "CLIPTextModel"
    extra = {"projection_dim": config.projection_dim} if projected else {}
    if config.eos_token_id == 2:  # the legacy special-token ids that go with it (OpenAI's configs)
        extra.update(bos_token_id=0, pad_token_id=1)
    return {"architectures": [arch], "model_type": "clip_text_model", **d, **extra}


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the CLIP config: key {key!r} is missing")
    return tuple(np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from key names and shapes (keys with the ``text_model.`` prefix). The head count, the
    activation, the eps and the EOS id are not in the weights: they default to 64-wide heads, ``quick_gelu`` when the
    width is 768 or less (OpenAI's) else ``gelu`` (OpenCLIP's), 1e-5 and the legacy id 2; pass ``overrides``."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise ConversionError("cannot infer the CLIP config: no text_model.encoder.layers.{i} keys")
    vocab, d = _shape(state_dict, f"{PREFIX}embeddings.token_embedding.weight")
    positions = _shape(state_dict, f"{PREFIX}embeddings.position_embedding.weight")[0]
    fields = dict(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=_shape(state_dict, f"{PREFIX}encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=1 + max(layers),
        num_attention_heads=max(1, d // 64),
        max_position_embeddings=positions,
        hidden_act="quick_gelu" if d <= 768 else "gelu",
        layer_norm_eps=1e-5,
        eos_token_id=2,
        projection_dim=_shape(state_dict, _PROJECTION)[0] if _PROJECTION in state_dict else None,
    )
    return CLIPTextConfig(**{**fields, **overrides})


# ---- reading ---------------------------------------------------------------------------------------------------


def read_clip(
    path: str | os.PathLike, *, convert: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """``(state_dict, transformers config or None, source name)`` of a CLIP folder (e.g. a pipeline's
    ``text_encoder/`` or ``text_encoder_2/``), a pipeline folder with ``text_encoder/``, or one weights file / shard
    index (its sibling ``config.json`` is used when present)."""
    return io.read_transformers(
        path,
        what="CLIP",
        config_keys=("model_type", "hidden_size"),
        hint=" (pass text_encoder_2/ itself for the second encoder)",
        convert=convert,
    )


def _ignored(key: str) -> bool:
    return (
        key.endswith("embeddings.position_ids")
        or key.startswith(("vision_model.", "visual_projection."))
        or key == "logit_scale"
    )


def _with_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers 5 ``CLIPTextModel`` state dict (no ``text_model.`` prefix) in the Hub layout; others as is."""
    if any(k.startswith(PREFIX) for k in sd):
        return dict(sd)
    bare = ("embeddings.", "encoder.", "final_layer_norm.")
    return {PREFIX + k if k.startswith(bare) else k: v for k, v in sd.items()}


def clip_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: CLIPTextConfig | None = None,
    quantize: Any = None,
    kernel_dtype: Any = None,
    **overrides: Any,
) -> tuple[CLIPTextConfig, dict[str, Any]]:
    """Import a CLIP text encoder → ``(CLIPTextConfig, float32 params)``.

    ``source``: a transformers folder (``config.json`` + ``model.safetensors``, sharded or ``.bin``) such as a
    pipeline's ``text_encoder/`` or ``text_encoder_2/``, a pipeline folder (its ``text_encoder/``), one weights file,
    or a state dict (either key layout). The config comes from ``config``, else ``config.json``, else the weight
    shapes; ``overrides`` replace fields (e.g. ``dtype="bfloat16"``).
    ``quantize`` (``"int8"``, ``"int4"``, a ``QuantizeConfig``) quantises the kernels as they are read; ``kernel_dtype``
    (e.g. ``jnp.bfloat16``) stores the other kernels in that dtype (a memory-mapped safetensors file is never held as
    float32 whole).
    """
    if isinstance(source, Mapping):
        sd, hf_config, name = {k: io.to_float32(v) for k, v in source.items()}, None, "state dict"
    else:
        sd, hf_config, name = read_clip(source, convert=False)
    sd = _with_prefix(sd)
    if config is None:
        if hf_config:
            config = config_from_transformers(hf_config, projection=_PROJECTION in sd, **overrides)
        else:
            config = infer_config(sd, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    params = import_params(
        clip_rules(config),
        sd,
        config,
        quantize=quantize,
        kernel_dtype=kernel_dtype,
        ignore=_ignored,
        source=f"{name} (transformers CLIP keys)",
    )
    return config, params


def clip_to_torch(config: CLIPTextConfig, params: Mapping[str, Any], *, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """Export params to a transformers CLIP text state dict (numpy). ``prefix="text_model."`` (default) is the Hub
    layout that ``CLIPTextModelWithProjection`` and ``CLIPTextModel.from_pretrained`` read; ``prefix=""`` gives
    transformers 5's ``CLIPTextModel.state_dict()`` keys (``load_state_dict``)."""
    if prefix not in (PREFIX, ""):
        raise ValueError(f"prefix={prefix!r} is invalid: expected {PREFIX!r} or ''")
    if prefix == "" and config.projection_dim is not None:
        raise ValueError("prefix='' is CLIPTextModel's layout, which has no text_projection: keep the prefix")
    return export(clip_rules(config, prefix), params)


def write_clip_folder(
    folder: str | os.PathLike, config: CLIPTextConfig, params: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write a transformers folder (``config.json`` + ``model.safetensors``) that ``CLIPTextModel`` /
    ``CLIPTextModelWithProjection.from_pretrained`` loads; written under a temporary name, renamed when complete."""
    from safetensors.numpy import save_file

    sd = {k: np.ascontiguousarray(v, np.float32) for k, v in clip_to_torch(config, params).items()}
    with atomic_path(folder, is_dir=True, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_transformers(config), indent=2, sort_keys=True) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(folder)


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch``/``save_torch`` for every family) ----
# A text encoder has one layout (transformers'); both of api's format names mean it.

FAMILY = "clip"
DIFFUSERS_CLASS = "CLIPTextModel"
TORCH_WRAP: dict[str, str] = {}


_API = TextEncoderConversion(
    model_types=MODEL_TYPES,
    marker="embeddings.token_embedding.weight",
    from_torch=clip_from_torch,
    to_torch=clip_to_torch,
    config_from=lambda d, state_dict, **overrides: config_from_transformers(
        d, projection=_PROJECTION in state_dict, **overrides
    ),
    write=write_clip_folder,
)
detect = _API.detect
is_diffusers_config = _API.is_diffusers_config
claims_folder = _API.claims_folder
import_path = _API.import_path
import_checkpoint = _API.import_checkpoint
export_checkpoint = _API.export_checkpoint
write_folder = _API.write_folder
diffusers_config = config_to_transformers
