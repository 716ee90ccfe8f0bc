"""T5 / mT5 / UMT5 encoder conversion: the transformers key table, config mapping, folder reading, export.

Keys of transformers ``T5EncoderModel`` / ``T5ForConditionalGeneration`` (and ``MT5…``, ``UMT5…``) encoders:
``shared.weight`` (or only ``encoder.embed_tokens.weight``, its tied copy), ``encoder.block.{i}.layer.0.SelfAttention.
{q,k,v,o}.weight``, ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`` (T5/mT5: block 0 only;
every block uses it. UMT5: in every block ``{i}``), ``encoder.block.{i}.layer.0.layer_norm.weight``,
``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` (``wi`` when not gated),
``encoder.block.{i}.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``. Decoder keys and
``lm_head.weight`` are ignored. One table serves import and export (``dit_jax.convert.rules``), so round trips are
bit-exact. A ``config.json``'s ``model_type`` (``t5``, ``mt5``, ``umt5``) picks the variant; without one, the
weights do (a bias table in block 1: UMT5; a 250112-token vocabulary: mT5).

Reading the XXL encoder (19 GB as float32) needs about twice that in host memory (the file's arrays and the
transposed kernels); a bf16 checkpoint is read as float32.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import import_params
from dit_jax.convert.common import TextEncoderConversion
from dit_jax.convert.rules import ConversionError, Rule, export, linear, rule
from dit_jax.encoders.t5 import MODEL_TYPES, T5Config

_EMBED_COPY = "encoder.embed_tokens.weight"
_BIAS = "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
_ARCHITECTURES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_MT5_VOCAB = 250112
# transformers T5Config defaults, for fields a config.json leaves out; MT5Config and UMT5Config differ in a few
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="relu", layer_norm_epsilon=1e-6)  # fmt: skip
_MT5_DEFAULTS = dict(_HF_DEFAULTS, vocab_size=_MT5_VOCAB, d_ff=1024, num_layers=8, num_heads=6,
                     feed_forward_proj="gated-gelu")  # fmt: skip


def t5_rules(config: T5Config) -> list[Rule]:
    """The conversion table (transformers key ↔ Flax path) of a T5, mT5 or UMT5 encoder."""
    h, dk = config.num_heads, config.d_kv
    rules = [rule("shared.weight", "shared"), rule("encoder.final_layer_norm.weight", "final_norm/scale")]
    if not config.relative_bias_per_layer:
        rules.append(rule(_BIAS.format(i=0), "relative_attention_bias"))
    ff = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for i in range(config.num_layers):
        t, f = f"encoder.block.{i}.layer", f"blocks_{i}"
        if config.relative_bias_per_layer:
            rules.append(rule(_BIAS.format(i=i), f"{f}/relative_attention_bias"))
        rules.append(rule(f"{t}.0.layer_norm.weight", f"{f}/attention_norm/scale"))
        for name in ("q", "k", "v"):
            rules.append(rule(f"{t}.0.SelfAttention.{name}.weight", f"{f}/attention/{name}/kernel", linear((h, dk))))
        rules.append(rule(f"{t}.0.SelfAttention.o.weight", f"{f}/attention/o/kernel", linear(in_shape=(h, dk))))
        rules.append(rule(f"{t}.1.layer_norm.weight", f"{f}/ff_norm/scale"))
        rules += [rule(f"{t}.1.DenseReluDense.{n}.weight", f"{f}/ff/{n}/kernel", linear()) for n in ff]
    return rules


# ---- config ----------------------------------------------------------------------------------------------------


def config_from_transformers(d: Mapping[str, Any], **overrides: Any) -> T5Config:
    """A ``T5Config`` from a transformers T5, mT5 or UMT5 ``config.json`` dict (missing fields take that
    transformers config class's defaults)."""
    model_type = d.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r} is not supported: expected one of {MODEL_TYPES}")
    defaults = _HF_DEFAULTS if model_type == "t5" else _MT5_DEFAULTS
    fields = {k: d.get(k, default) for k, default in defaults.items()}
    fields["layer_norm_epsilon"] = float(fields["layer_norm_epsilon"])
    fields.update(model_type=model_type, relative_bias_per_layer=model_type == "umt5")
    return T5Config(**{**fields, **overrides})


def config_to_transformers(config: T5Config) -> dict[str, Any]:
    """The transformers ``T5EncoderModel`` / ``MT5EncoderModel`` / ``UMT5EncoderModel`` ``config.json`` dict of
    ``config`` (by its ``model_type``)."""
    d = {k: getattr(config, k) for k in _HF_DEFAULTS}
    return {"architectures": [_ARCHITECTURES[config.model_type]], "model_type": config.model_type, **d}


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the T5 config: key {key!r} is missing")
    return tuple(np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> T5Config:
    """A ``T5Config`` from key names and shapes. ``relative_attention_max_distance`` (128), ``layer_norm_epsilon``
    (1e-6) and, for gated nets, the activation (GELU-tanh) are not in the weights: pass them as ``overrides``. A bias
    table in block 1 means UMT5; otherwise a 250112-token vocabulary means mT5 (a one-block UMT5 or an mT5 with
    another vocabulary needs ``model_type=`` and ``relative_bias_per_layer=``)."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if not blocks:
        raise ConversionError("cannot infer the T5 config: no encoder.block.{i} keys")
    vocab, d_model = _shape(state_dict, "shared.weight")
    buckets, heads = _shape(state_dict, _BIAS.format(i=0))
    per_layer = _BIAS.format(i=1) in state_dict
    model_type = "umt5" if per_layer else "mt5" if vocab == _MT5_VOCAB else "t5"
    inner = _shape(state_dict, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state_dict
    wi = "wi_0" if gated else "wi"
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=_shape(state_dict, f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
        num_layers=1 + max(blocks),
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        relative_bias_per_layer=per_layer,
        model_type=model_type,
    )
    return T5Config(**{**fields, **overrides})


# ---- reading ---------------------------------------------------------------------------------------------------


def read_t5(
    path: str | os.PathLike, *, convert: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """``(state_dict, transformers config or None, source name)`` of a T5/mT5/UMT5 folder, a pipeline folder with
    ``text_encoder/``, or one weights file / shard index (its sibling ``config.json`` is used when present)."""
    return io.read_transformers(path, what="T5", config_keys=("model_type", "d_model"), hint="", convert=convert)


def _ignored(key: str) -> bool:
    return key.startswith("decoder.") or key in ("lm_head.weight", _EMBED_COPY)


def t5_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: T5Config | None = None,
    quantize: Any = None,
    kernel_dtype: Any = None,
    **overrides: Any,
) -> tuple[T5Config, dict[str, Any]]:
    """Import a T5, mT5 or UMT5 encoder → ``(T5Config, float32 params)``.

    ``source``: a transformers folder (``config.json`` + ``model.safetensors``, sharded or ``.bin``), a diffusers
    pipeline folder (its ``text_encoder/``), one weights file, or a state dict. The config comes from ``config``,
    else ``config.json``, else the weight shapes; ``overrides`` replace fields (e.g. ``dtype="bfloat16"``).
    ``quantize`` (``"int8"``, ``"int4"``, a ``QuantizeConfig``) quantises the kernels as they are read; ``kernel_dtype``
    (e.g. ``jnp.bfloat16``) stores the other kernels in that dtype (a memory-mapped safetensors file is never held as
    float32 whole).
    """
    if isinstance(source, Mapping):
        sd, hf_config, name = {k: io.to_float32(v) for k, v in source.items()}, None, "state dict"
    else:
        sd, hf_config, name = read_t5(source, convert=False)
    sd = dict(sd)
    if "shared.weight" not in sd and _EMBED_COPY in sd:
        sd["shared.weight"] = sd[_EMBED_COPY]
    elif _EMBED_COPY in sd and not np.array_equal(sd[_EMBED_COPY], sd["shared.weight"]):
        raise ConversionError(f"{name}: {_EMBED_COPY} differs from shared.weight (they are tied in T5)")
    if config is None:
        config = config_from_transformers(hf_config, **overrides) if hf_config else infer_config(sd, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    params = import_params(
        t5_rules(config),
        sd,
        config,
        quantize=quantize,
        kernel_dtype=kernel_dtype,
        ignore=_ignored,
        source=f"{name} (transformers {_ARCHITECTURES[config.model_type]} keys)",
    )
    return config, params


def t5_to_torch(config: T5Config, params: Mapping[str, Any], *, tied_copy: bool = True) -> dict[str, np.ndarray]:
    """Export params to a transformers ``T5EncoderModel`` / ``MT5EncoderModel`` / ``UMT5EncoderModel`` state dict
    (numpy); ``tied_copy`` adds ``encoder.embed_tokens.weight`` (= ``shared.weight``), as their ``state_dict()`` has
    it."""
    sd = export(t5_rules(config), params)
    if tied_copy:
        sd[_EMBED_COPY] = sd["shared.weight"]
    return sd


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch``/``save_torch`` for every family) ----
# A text encoder has one layout (transformers'); both of api's format names mean it.

FAMILY = "t5"
DIFFUSERS_CLASS = "T5EncoderModel"
TORCH_WRAP: dict[str, str] = {}


_API = TextEncoderConversion(
    model_types=MODEL_TYPES,
    marker="encoder.block.0.layer.0.SelfAttention.q.weight",
    from_torch=t5_from_torch,
    to_torch=t5_to_torch,
    config_from=lambda d, state_dict, **overrides: config_from_transformers(d, **overrides),
    write=lambda path, config, params, overwrite=False: io.write_transformers_folder(
        path, config_to_transformers(config), t5_to_torch(config, params), overwrite=overwrite
    ),
)
detect = _API.detect
is_diffusers_config = _API.is_diffusers_config
claims_folder = _API.claims_folder
import_path = _API.import_path
import_checkpoint = _API.import_checkpoint
export_checkpoint = _API.export_checkpoint
write_folder = _API.write_folder
diffusers_config = config_to_transformers
