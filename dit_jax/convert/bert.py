"""BERT encoder conversion: the transformers key table, config mapping, folder reading, export.

Keys of transformers ``BertModel`` (Hunyuan-DiT's ``text_encoder/``): ``embeddings.{word,position,token_type}_embeddings
.weight``, ``embeddings.LayerNorm.{weight,bias}``, ``encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}``,
``encoder.layer.{i}.attention.output.{dense,LayerNorm}.{weight,bias}``, ``encoder.layer.{i}.intermediate.dense.{weight,
bias}``, ``encoder.layer.{i}.output.{dense,LayerNorm}.{weight,bias}`` and, with the pooler, ``pooler.dense.{weight,
bias}``. Checkpoints of the pre-training heads (``BertForMaskedLM``, ``BertForPreTraining``: keys under ``bert.``, heads
under ``cls.``) and TensorFlow-era names (``LayerNorm.gamma``/``beta``) are read too; the heads and the
``position_ids``/``token_type_ids`` buffers are ignored. One table serves import and export
(``dit_jax.convert.rules``), so round trips are bit-exact.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import import_params
from dit_jax.convert.common import TextEncoderConversion
from dit_jax.convert.rules import ConversionError, Rule, bias, dense, export, linear, norm, rule
from dit_jax.encoders.bert import BertConfig

MODEL_TYPES = ("bert",)
PREFIX = "bert."  # the encoder inside BertForMaskedLM / BertForPreTraining checkpoints
_POOLER = "pooler.dense.weight"
# transformers BertConfig defaults, for fields a config.json leaves out
_HF_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                    layer_norm_eps=1e-12, pad_token_id=0)  # fmt: skip


def bert_rules(config: BertConfig) -> list[Rule]:
    """The conversion table (transformers ``BertModel`` key ↔ Flax path) of a BERT encoder."""
    h, dh = config.num_attention_heads, config.head_dim
    rules = [
        rule("embeddings.word_embeddings.weight", "word_embeddings"),
        rule("embeddings.position_embeddings.weight", "position_embeddings"),
        rule("embeddings.token_type_embeddings.weight", "token_type_embeddings"),
        *norm("embeddings.LayerNorm", "embeddings_norm"),
    ]
    for i in range(config.num_hidden_layers):
        t, f = f"encoder.layer.{i}", f"blocks_{i}"
        for torch_name, name in (("query", "q"), ("key", "k"), ("value", "v")):
            rules += dense(f"{t}.attention.self.{torch_name}", f"{f}/attention/{name}", linear((h, dh)), bias((h, dh)))
        rules += dense(f"{t}.attention.output.dense", f"{f}/attention/o", linear(in_shape=(h, dh)))
        rules += norm(f"{t}.attention.output.LayerNorm", f"{f}/attention_norm")
        rules += dense(f"{t}.intermediate.dense", f"{f}/mlp/fc1") + dense(f"{t}.output.dense", f"{f}/mlp/fc2")
        rules += norm(f"{t}.output.LayerNorm", f"{f}/mlp_norm")
    if config.add_pooling_layer:
        rules += dense("pooler.dense", "pooler")
    return rules


# ---- config ----------------------------------------------------------------------------------------------------


def config_from_transformers(d: Mapping[str, Any], *, pooler: bool = True, **overrides: Any) -> BertConfig:
    """A ``BertConfig`` from a transformers BERT ``config.json`` dict (missing fields take transformers' defaults);
    ``pooler``: whether the weights hold ``pooler.dense`` (the config does not say)."""
    model_type = d.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r} is not supported: expected one of {MODEL_TYPES}")
    positions = d.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ConversionError(f"config.json position_embedding_type={positions!r} is not supported (only 'absolute')")
    fields = {k: d.get(k, default) for k, default in _HF_DEFAULTS.items()}
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    fields["pad_token_id"] = fields["pad_token_id"] or 0
    return BertConfig(**{**fields, "add_pooling_layer": pooler, **overrides})


def config_to_transformers(config: BertConfig) -> dict[str, Any]:
    """The transformers ``BertModel`` ``config.json`` dict of ``config``."""
    d = {k: getattr(config, k) for k in _HF_DEFAULTS}
    return {"architectures": ["BertModel"], "model_type": "bert", "position_embedding_type": "absolute", **d}


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the BERT config: key {key!r} is missing")
    return tuple(np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> BertConfig:
    """A ``BertConfig`` from key names and shapes (``BertModel`` keys). The head count (64-wide heads), the activation
    (erf GELU) and the eps (1e-12) are not in the weights: pass ``overrides`` where they differ."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if not layers:
        raise ConversionError("cannot infer the BERT config: no encoder.layer.{i} keys")
    vocab, d = _shape(state_dict, "embeddings.word_embeddings.weight")
    fields = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=1 + max(layers),
        num_attention_heads=max(1, d // 64),
        intermediate_size=_shape(state_dict, "encoder.layer.0.intermediate.dense.weight")[0],
        hidden_act="gelu",
        max_position_embeddings=_shape(state_dict, "embeddings.position_embeddings.weight")[0],
        type_vocab_size=_shape(state_dict, "embeddings.token_type_embeddings.weight")[0],
        layer_norm_eps=1e-12,
        add_pooling_layer=_POOLER in state_dict,
    )
    return BertConfig(**{**fields, **overrides})


# ---- reading ---------------------------------------------------------------------------------------------------


def read_bert(
    path: str | os.PathLike, *, convert: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """``(state_dict, transformers config or None, source name)`` of a BERT folder (e.g. Hunyuan-DiT's
    ``text_encoder/``), a pipeline folder with ``text_encoder/``, or one weights file / shard index (its sibling
    ``config.json`` is used when present)."""
    return io.read_transformers(path, what="BERT", config_keys=("model_type", "hidden_size"), hint="", convert=convert)


def _ignored(key: str) -> bool:
    return key.startswith("cls.") or key in ("embeddings.position_ids", "embeddings.token_type_ids")


def bertmodel_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A BERT state dict in ``BertModel``'s key layout: the ``bert.`` prefix of pre-training checkpoints removed and
    TensorFlow-era ``LayerNorm.gamma``/``beta`` renamed ``weight``/``bias``; others as is."""
    prefixed = any(k.startswith(PREFIX + "embeddings.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if prefixed and k.startswith(PREFIX):
            k = k[len(PREFIX) :]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        out[k] = v
    return out


def bert_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    config: BertConfig | None = None,
    quantize: Any = None,
    kernel_dtype: Any = None,
    **overrides: Any,
) -> tuple[BertConfig, dict[str, Any]]:
    """Import a BERT encoder → ``(BertConfig, float32 params)``.

    ``source``: a transformers folder (``config.json`` + ``model.safetensors``, sharded or ``.bin``) such as
    Hunyuan-DiT's ``text_encoder/``, a pipeline folder (its ``text_encoder/``), one weights file, or a state dict.
    The config comes from ``config``, else ``config.json`` (the pooler from the keys), else the weight shapes;
    ``overrides`` replace fields (e.g. ``dtype="bfloat16"``).
    ``quantize`` (``"int8"``, ``"int4"``, a ``QuantizeConfig``) quantises the kernels as they are read; ``kernel_dtype``
    (e.g. ``jnp.bfloat16``) stores the other kernels in that dtype (a memory-mapped safetensors file is never held as
    float32 whole).
    """
    if isinstance(source, Mapping):
        sd, hf_config, name = {k: io.to_float32(v) for k, v in source.items()}, None, "state dict"
    else:
        sd, hf_config, name = read_bert(source, convert=False)
    sd = bertmodel_keys(sd)
    if config is None:
        if hf_config:
            config = config_from_transformers(hf_config, pooler=_POOLER in sd, **overrides)
        else:
            config = infer_config(sd, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    params = import_params(
        bert_rules(config),
        sd,
        config,
        quantize=quantize,
        kernel_dtype=kernel_dtype,
        ignore=_ignored,
        source=f"{name} (transformers BertModel keys)",
    )
    return config, params


def bert_to_torch(config: BertConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Export params to a transformers ``BertModel`` state dict (numpy), as ``BertModel.state_dict()`` has it."""
    return export(bert_rules(config), params)


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch``/``save_torch`` for every family) ----
# A text encoder has one layout (transformers'); both of api's format names mean it.

FAMILY = "bert"
DIFFUSERS_CLASS = "BertModel"
TORCH_WRAP: dict[str, str] = {}


_API = TextEncoderConversion(
    model_types=MODEL_TYPES,
    marker="encoder.layer.0.attention.self.query.weight",
    from_torch=bert_from_torch,
    to_torch=bert_to_torch,
    config_from=lambda d, state_dict, **overrides: config_from_transformers(
        d, pooler=_POOLER in bertmodel_keys(state_dict), **overrides
    ),
    write=lambda path, config, params, overwrite=False: io.write_transformers_folder(
        path, config_to_transformers(config), bert_to_torch(config, params), overwrite=overwrite
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
