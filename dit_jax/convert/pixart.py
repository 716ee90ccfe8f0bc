"""PixArt-α/Σ conversion: PixArt-alpha/-sigma ``original`` checkpoints and diffusers ``PixArtTransformer2DModel``.

Key mapping as in MODELS.md §2.2–2.3, plus the original's qk-norm (``attn.q_norm/k_norm``) and KV-compression keys
(``attn.sr.*`` depthwise conv, ``attn.norm.*`` LayerNorm → ``attn/compress/sr``, ``attn/compress/norm``), which
diffusers cannot hold. A stored ``pos_embed`` gives the training latent size and, by matching our sin-cos table
against candidates, ``pe_interpolation``; ``y_embedder.y_embedding`` is α's learned null caption.
"""

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import common, infer
from dit_jax.convert.rules import (
    ConversionError,
    Rule,
    bias,
    conv,
    dense,
    expand,
    linear,
    mlp,
    norm,
    rule,
    stacked_dense,
)
from dit_jax.models.pixart import PixArtConfig

FAMILY = "pixart"
CONFIG = PixArtConfig
DIFFUSERS_CLASS = "PixArtTransformer2DModel"
TORCH_WRAP: dict[str, str] = {"original": "state_dict"}  # as the PixArt scripts load a .pt

_NAME = "PixArt"
_NORM_TYPE = "ada_norm_single"
_DIFFUSERS_EXTRA = {"attention_type": "default"}


@dataclasses.dataclass(frozen=True)
class _Keys:
    """One format's torch names beyond the parts ``common`` shares with DiT (``{i}``: the block)."""

    t_embedder: str
    mlp_layers: tuple[str, str]  # the two Linears of the timestep and micro-condition MLPs
    t_block: str
    attn: str
    cross_attn: str
    cross_q: str
    cross_kv: tuple[str, ...]  # one fused k/v Linear (original) or to_k, to_v (diffusers)
    cross_proj: str
    final_table: str
    final: str
    caption: tuple[str, str]
    null: str
    csize: str
    ar: str


_KEYS = {
    "original": _Keys(
        t_embedder="t_embedder.mlp",
        mlp_layers=("0", "2"),
        t_block="t_block.1",
        attn="blocks.{i}.attn",
        cross_attn="blocks.{i}.cross_attn",
        cross_q="q_linear",
        cross_kv=("kv_linear",),
        cross_proj="proj",
        final_table="final_layer.scale_shift_table",
        final="final_layer.linear",
        caption=("y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2"),
        null="y_embedder.y_embedding",
        csize="csize_embedder.mlp",
        ar="ar_embedder.mlp",
    ),
    "diffusers": _Keys(
        t_embedder="adaln_single.emb.timestep_embedder",
        mlp_layers=("linear_1", "linear_2"),
        t_block="adaln_single.linear",
        attn="transformer_blocks.{i}.attn1",
        cross_attn="transformer_blocks.{i}.attn2",
        cross_q="to_q",
        cross_kv=("to_k", "to_v"),
        cross_proj="to_out.0",
        final_table="scale_shift_table",
        final="proj_out",
        caption=("caption_projection.linear_1", "caption_projection.linear_2"),
        null="caption_projection.y_embedding",
        csize="adaln_single.emb.resolution_embedder",
        ar="adaln_single.emb.aspect_ratio_embedder",
    ),
}

detect = common.detector(_KEYS["original"].t_block + ".weight", _KEYS["diffusers"].t_block + ".weight", _NAME)
is_diffusers_config = common.diffusers_config_matcher(DIFFUSERS_CLASS, _NORM_TYPE, _NAME)
ignored = common.ignored


def _no_kv_compression(config: PixArtConfig) -> ConversionError:
    return ConversionError(
        "diffusers' PixArtTransformer2DModel has no KV compression; export this model "
        f"(kv_compress_layers={config.kv_compress_layers}) with format='original'"
    )


def rules(config: PixArtConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (always 1 for PixArt)."""
    if fmt not in _KEYS:
        raise common.unknown_format(_NAME, fmt)
    compressed = config.kv_compress_layers if config.kv_compress_op == "conv" else ()
    if fmt == "diffusers" and compressed:
        raise _no_kv_compression(config)
    k = _KEYS[fmt]
    hd = (config.num_heads, config.hidden_size // config.num_heads)
    ca, blk = k.cross_attn, "blocks_{i}"
    if fmt == "original":
        kv = dense(f"{ca}.{k.cross_kv[0]}", f"{blk}/cross_attn/kv", linear(out_shape=(2, *hd)), bias((2, *hd)))
    else:
        kv = stacked_dense(tuple(f"{ca}.{n}" for n in k.cross_kv), f"{blk}/cross_attn/kv", hd)
    table = [
        *common.patch_embed_rules(fmt),
        *mlp(k.t_embedder, "t_embedder", k.mlp_layers),
        *dense(k.t_block, "t_block"),
        rule(f"{common.BLOCK[fmt]}.scale_shift_table", f"{blk}/scale_shift_table"),
        *common.attention_rules(fmt, *hd),
        *dense(f"{ca}.{k.cross_q}", f"{blk}/cross_attn/q", linear(out_shape=hd), bias(hd)),
        *kv,
        *dense(f"{ca}.{k.cross_proj}", f"{blk}/cross_attn/proj", linear(in_shape=hd)),
        *common.mlp_rules(fmt),
        rule(k.final_table, "final_layer/scale_shift_table"),
        *dense(k.final, "final_layer/linear"),
    ]
    if config.caption_channels is not None:
        table += [*dense(k.caption[0], "y_embedder/y_proj/fc1"), *dense(k.caption[1], "y_embedder/y_proj/fc2")]
    if config.learned_null_caption and not (fmt == "diffusers" and for_export):
        table.append(rule(k.null, "y_embedder/y_embedding"))
    if config.micro_conditions:
        table += mlp(k.csize, "csize_embedder/mlp", k.mlp_layers)
        table += mlp(k.ar, "ar_embedder/mlp", k.mlp_layers)
    if config.qk_norm:
        table += [*norm(f"{k.attn}.q_norm", f"{blk}/attn/q_norm"), *norm(f"{k.attn}.k_norm", f"{blk}/attn/k_norm")]
    table = expand(table, config.depth)
    for n in compressed:
        table += [
            *dense(f"blocks.{n}.attn.sr", f"blocks_{n}/attn/compress/sr", conv()),
            *norm(f"blocks.{n}.attn.norm", f"blocks_{n}/attn/compress/norm"),
        ]
    return table, 1


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Nothing beyond the rule table to check for PixArt."""


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of a PixArt checkpoint (keys/shapes, or the diffusers ``config.json``)."""
    inf = infer.Inference()
    f = inf.fields
    keys = set(state_dict)
    k = _KEYS[fmt]
    f.update(norm_eps=1e-6, timestep_freq_shift=0.0, kv_compress_layers=(), kv_compress_op="conv")
    if k.null in keys:
        f.update(learned_null_caption=True, caption_length=int(np.shape(state_dict[k.null])[0]))
    else:
        f["learned_null_caption"] = False
    f["qk_norm"] = bool(infer.block_indices(keys, f"{k.attn.replace('{i}', '{n}')}.q_norm.weight"))

    if diffusers_config is not None:
        c = diffusers_config
        common.read_diffusers_config(
            c, inf, source, name=_NAME, norm_type=_NORM_TYPE, out_default=8, expected=_DIFFUSERS_EXTRA
        )  # out_channels 8: diffusers' default
        sample = int(c.get("sample_size", 128))
        f["input_size"] = sample
        scale = c.get("interpolation_scale")
        f["pe_interpolation"] = float(scale if scale is not None else max(sample // 64, 1))
        micro = c.get("use_additional_conditions")
        f["micro_conditions"] = bool(micro if micro is not None else sample == 128)
        f["caption_channels"] = c.get("caption_channels")
        f["cross_attention_dim"] = None if f["caption_channels"] is not None else c.get("cross_attention_dim", 1152)
        f["norm_eps"] = float(c.get("norm_eps", 1e-6))
        return inf

    d, _ = common.infer_backbone(state_dict, inf, fmt, source, block_key="scale_shift_table", final=f"{k.final}.weight")
    caption = f"{k.caption[0]}.weight"
    if caption in keys:
        f.update(caption_channels=infer.shape(state_dict, caption, source)[1], cross_attention_dim=None)
    else:
        kv = f"{k.cross_attn.format(i=0)}.{k.cross_kv[0]}.weight"
        f.update(caption_channels=None, cross_attention_dim=infer.shape(state_dict, kv, source)[1])
    f["micro_conditions"] = f"{k.csize}.{k.mlp_layers[0]}.weight" in keys
    if fmt == "original":
        layers = infer.block_indices(keys, "blocks.{n}.attn.sr.weight")
        if layers:
            ratios = {int(np.shape(state_dict[f"blocks.{n}.attn.sr.weight"])[-1]) for n in layers}
            if len(ratios) != 1:
                raise ConversionError(f"{source}: KV-compression convs of different sizes {sorted(ratios)}")
            f.update(kv_compress_layers=tuple(layers), kv_compress_ratio=ratios.pop())

    pos = infer.stored_pos_embed(state_dict, d, f["patch_size"], inf, source)
    if pos is None:
        inf.missing["pe_interpolation"] = "the checkpoint stores no pos_embed (its interpolation)"
        return inf
    candidates = (*infer.PE_INTERPOLATION_CANDIDATES, f["input_size"] / 64)
    found = infer.match_pe_interpolation(pos, d, candidates)
    if len(found) == 1:
        f["pe_interpolation"] = found[0]
    elif not found:
        inf.missing["pe_interpolation"] = (
            f"the stored pos_embed matches no sin-cos table with pe_interpolation in {sorted(set(candidates))}"
        )
    else:
        inf.missing["pe_interpolation"] = f"the stored pos_embed fits several pe_interpolation values {found}"
    return inf


def export_extras(config: PixArtConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Keys beyond the rule table: the original's fixed ``pos_embed`` buffer for its training grid."""
    g = config.input_size // config.patch_size
    return common.pos_embed_export(fmt, g, config.hidden_size, config.grid_base_size, config.pe_interpolation)


def check_export(config: PixArtConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; warnings where its reference computes differently or drops weights."""
    if fmt == "diffusers" and config.kv_compress_layers:
        raise _no_kv_compression(config)
    if config.timestep_freq_shift != 0.0:
        warnings.warn(
            f"exporting a PixArt with timestep_freq_shift={config.timestep_freq_shift}; PixArt references use 0",
            stacklevel=3,
        )
    if fmt != "diffusers":
        return
    common.check_mlp_ratio(config, DIFFUSERS_CLASS)
    if config.base_size is not None and config.base_size != config.input_size // config.patch_size:
        raise ConversionError(
            f"diffusers' PixArtTransformer2DModel uses base_size = sample_size // patch_size; this model has "
            f"base_size={config.base_size}, input_size={config.input_size}, patch_size={config.patch_size}"
        )
    if config.qk_norm:
        warnings.warn(
            "diffusers' PixArtTransformer2DModel has no qk-norm: the attn1.q_norm/k_norm keys are written as the "
            "PixArt-Σ converter names them, but that class will not load them",
            stacklevel=3,
        )
    if config.learned_null_caption:
        warnings.warn(
            "the diffusers format has no learned null caption: y_embedder/y_embedding is not exported", stacklevel=3
        )


def diffusers_config(config: PixArtConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``PixArtTransformer2DModel`` (every default written out)."""
    return common.diffusers_config(
        config,
        DIFFUSERS_CLASS,
        norm_type=_NORM_TYPE,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.hidden_size if config.caption_channels is not None else config.caption_width,
        num_embeds_ada_norm=1000,
        interpolation_scale=config.pe_interpolation,
        use_additional_conditions=config.micro_conditions,
        caption_channels=config.caption_channels,
        **_DIFFUSERS_EXTRA,
    )
