"""SD3/SD3.5 MM-DiT conversion: Stability AI ``original`` checkpoints and diffusers ``SD3Transformer2DModel``.

Key mapping as in MODELS.md §3.2–3.3. Original keys are those of SAI's single-file checkpoints without their
``model.diffusion_model.`` prefix (the files also hold the VAE and text encoders; ``convert.from_state_dict`` passes
the transformer's part). The stored ``pos_embed`` is a parameter here
(diffusers: the persistent ``pos_embed.pos_embed`` buffer). diffusers' ``AdaLayerNormContinuous`` (``norm_out``, the
last block's ``norm1_context``) splits (scale, shift) where SAI and we split (shift, scale): those rows are swapped.

Original-format architecture comes from keys and shapes as SAI's loader reads them: depth from the blocks, width
from ``x_embedder``, qk-norm from ``ln_k`` keys, MMDiT-X layers from ``attn2`` keys, ``pos_embed_max_size`` from the
table; heads are hidden/64 (SAI's head_dim) unless a qk-norm scale gives the head_dim.
"""

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import common, infer
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, dense, linear, mlp, rule, stacked_dense
from dit_jax.models.mmdit import MMDiTConfig

FAMILY = "sd3"
CONFIG = MMDiTConfig
DIFFUSERS_CLASS = "SD3Transformer2DModel"
TORCH_WRAP: dict[str, str] = {}

_NAME = "SD3 MM-DiT"
PREFIX = "model.diffusion_model."  # SAI single-file checkpoints; the keys below are read without it
_SAI_HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class _Attn:
    """An attention's torch names after the block prefix: one fused qkv (original) or three, proj, qk-norms."""

    qkv: tuple[str, ...]
    proj: str
    ln: tuple[str, str]


@dataclasses.dataclass(frozen=True)
class _Stream:
    ada: str
    attn: _Attn
    mlp: tuple[str, str]


@dataclasses.dataclass(frozen=True)
class _Keys:
    """One format's torch names (``block``: the prefix of block ``i``)."""

    pos_embed: str
    patch: str
    t_embedder: str
    y_embedder: str
    mlp_layers: tuple[str, str]
    context: str
    block: str
    streams: dict[str, _Stream]  # x_block, context_block
    attn2: _Attn
    final_ada: str
    final: str


def _original_stream(side: str) -> _Stream:
    a = f"{side}.attn"
    return _Stream(
        ada=f"{side}.adaLN_modulation.1",
        attn=_Attn((f"{a}.qkv",), f"{a}.proj", (f"{a}.ln_q", f"{a}.ln_k")),
        mlp=(f"{side}.mlp.fc1", f"{side}.mlp.fc2"),
    )


_KEYS = {
    "original": _Keys(
        pos_embed="pos_embed",
        patch="x_embedder.proj",
        t_embedder="t_embedder.mlp",
        y_embedder="y_embedder.mlp",
        mlp_layers=("0", "2"),
        context="context_embedder",
        block="joint_blocks.{i}",
        streams={"x_block": _original_stream("x_block"), "context_block": _original_stream("context_block")},
        attn2=_Attn(("x_block.attn2.qkv",), "x_block.attn2.proj", ("x_block.attn2.ln_q", "x_block.attn2.ln_k")),
        final_ada="final_layer.adaLN_modulation.1",
        final="final_layer.linear",
    ),
    "diffusers": _Keys(
        pos_embed="pos_embed.pos_embed",
        patch="pos_embed.proj",
        t_embedder="time_text_embed.timestep_embedder",
        y_embedder="time_text_embed.text_embedder",
        mlp_layers=("linear_1", "linear_2"),
        context="context_embedder",
        block="transformer_blocks.{i}",
        streams={
            "x_block": _Stream(
                "norm1.linear",
                _Attn(("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", ("attn.norm_q", "attn.norm_k")),
                ("ff.net.0.proj", "ff.net.2"),
            ),
            "context_block": _Stream(
                "norm1_context.linear",
                _Attn(
                    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                    "attn.to_add_out",
                    ("attn.norm_added_q", "attn.norm_added_k"),
                ),
                ("ff_context.net.0.proj", "ff_context.net.2"),
            ),
        },
        attn2=_Attn(("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.to_out.0", ("attn2.norm_q", "attn2.norm_k")),
        final_ada="norm_out.linear",
        final="proj_out",
    ),
}
# Detection marks: a block-0 key only SAI's MM-DiT has (also under SAI's prefix); diffusers' patch conv with a text
# projection (DiT/PixArt have no context_embedder, Flux no pos_embed.proj).
_ORIGINAL_MARK = "joint_blocks.0.x_block.adaLN_modulation.1.weight"
_DIFFUSERS_MARKS = ("pos_embed.proj.weight", "context_embedder.weight")


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are an SD3 MM-DiT's, else None."""
    if _ORIGINAL_MARK in keys or PREFIX + _ORIGINAL_MARK in keys:
        return "original"
    if all(k in keys for k in _DIFFUSERS_MARKS):
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of an ``SD3Transformer2DModel``."""
    return d.get("_class_name") == DIFFUSERS_CLASS


def ignored(fmt: str):
    """Nothing is dropped on import: ``pos_embed`` is a parameter of this family."""
    return lambda key: False


# ---- rules -------------------------------------------------------------------------------------------------------


def _swap(x: np.ndarray) -> np.ndarray:
    """(scale, shift) ↔ (shift, scale) halves along the first axis (its own inverse)."""
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]], axis=0)


def _swapped_dense(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """A torch Linear whose outputs are (scale, shift) ↔ our adaLN kernel/bias in (shift, scale) order."""
    to_flax, to_torch = linear()
    return [
        rule(
            f"{torch_prefix}.weight",
            f"{flax_prefix}/kernel",
            (lambda w: to_flax(_swap(w)), lambda k: _swap(to_torch(k))),
        ),
        rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias", (_swap, _swap)),
    ]


def _attn_rules(a: _Attn, torch_block: str, flax: str, hd: tuple[int, int], qk: bool, proj: bool) -> list[Rule]:
    names = tuple(f"{torch_block}.{n}" for n in a.qkv)
    if len(names) == 1:
        table = dense(names[0], f"{flax}/qkv", linear(out_shape=(3, *hd)), bias((3, *hd)))
    else:
        table = stacked_dense(names, f"{flax}/qkv", hd)
    if proj:
        table += dense(f"{torch_block}.{a.proj}", f"{flax}/proj", linear(in_shape=hd))
    if qk:
        table += [
            rule(f"{torch_block}.{a.ln[0]}.weight", f"{flax}/ln_q/scale"),
            rule(f"{torch_block}.{a.ln[1]}.weight", f"{flax}/ln_k/scale"),
        ]
    return table


def rules(config: MMDiTConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (always 1; ``for_export`` changes
    nothing)."""
    if fmt not in _KEYS:
        raise common.unknown_format(_NAME, fmt)
    k = _KEYS[fmt]
    hd = (config.num_heads, config.head_dim)
    qk = config.qk_norm is not None
    table = [
        rule(k.pos_embed, "pos_embed", (lambda w: w.reshape(w.shape[-2:]), lambda p: p[None])),
        *dense(k.patch, "x_embedder/proj", conv()),
        *mlp(k.t_embedder, "t_embedder", k.mlp_layers),
        *mlp(k.y_embedder, "y_embedder", k.mlp_layers),
        *dense(k.context, "context_embedder"),
        *dense(k.final, "final_layer/linear"),
    ]
    if fmt == "diffusers":
        table += _swapped_dense(k.final_ada, "final_layer/adaLN_modulation/linear")
    else:
        table += dense(k.final_ada, "final_layer/adaLN_modulation/linear")
    for i, kind in enumerate(config.layer_kinds()):
        blk = k.block.format(i=i)
        for side, s in k.streams.items():
            flax = f"blocks_{i}/{side}"
            pre_only = side == "context_block" and kind["pre_only"]
            if pre_only and fmt == "diffusers":
                table += _swapped_dense(f"{blk}.{s.ada}", f"{flax}/adaLN_modulation/linear")
            else:
                table += dense(f"{blk}.{s.ada}", f"{flax}/adaLN_modulation/linear")
            table += _attn_rules(s.attn, blk, f"{flax}/attn", hd, qk, proj=not pre_only)
            if not pre_only:
                table += [r for t, f in zip(s.mlp, ("fc1", "fc2")) for r in dense(f"{blk}.{t}", f"{flax}/mlp/{f}")]
        if kind["dual"]:
            table += _attn_rules(k.attn2, blk, f"blocks_{i}/x_block/attn2", hd, qk, proj=True)
    return table, 1


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Nothing beyond the rule table to check (the prefix is caught while inferring the config)."""


# ---- import: the config from keys/shapes or config.json -------------------------------------------------------------


def _check_prefix(state_dict: Mapping[str, np.ndarray], source: str) -> None:
    prefixed = [key for key in state_dict if key.startswith(PREFIX)]
    if prefixed:
        others = sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith(PREFIX)})
        raise ConversionError(
            f"{source}: keys carry the {PREFIX!r} prefix of a Stability AI single-file checkpoint (e.g. "
            f"{prefixed[0]!r}; other top-level names: {others[:6]}); pass only the transformer's keys, with the "
            "prefix removed"
        )


def _read_diffusers_config(c: Mapping[str, Any], inf: infer.Inference, source: str) -> None:
    """Fields of an ``SD3Transformer2DModel`` ``config.json`` (its defaults where a key is absent)."""
    f = inf.fields
    heads, head_dim = int(c.get("num_attention_heads", 18)), int(c.get("attention_head_dim", 64))
    width = heads * head_dim
    caption = int(c.get("caption_projection_dim", 1152))
    if caption != width:
        raise ConversionError(
            f"{source}: config.json has caption_projection_dim={caption}; the blocks need it equal to "
            f"num_attention_heads·attention_head_dim = {width}"
        )
    qk = c.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ConversionError(f"{source}: config.json has qk_norm={qk!r}; expected null or 'rms_norm'")
    pos = c.get("pos_embed_max_size", 96)
    if pos is None:
        raise ConversionError(f"{source}: config.json has pos_embed_max_size=null; SD3 models store a positional table")
    in_channels = int(c.get("in_channels", 16))
    out = c.get("out_channels", 16)
    f.update(
        input_size=int(c.get("sample_size", 128)),
        patch_size=int(c.get("patch_size", 2)),
        in_channels=in_channels,
        out_channels=in_channels if out is None else int(out),
        depth=int(c.get("num_layers", 18)),
        num_heads=heads,
        hidden_size=width,
        joint_attention_dim=int(c.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(c.get("pooled_projection_dim", 2048)),
        pos_embed_max_size=int(pos),
        qk_norm=qk,
        dual_attention_layers=tuple(int(i) for i in c.get("dual_attention_layers", ())),
        mlp_ratio=4.0,
    )


def _infer_from_keys(state_dict: Mapping[str, np.ndarray], inf: infer.Inference, fmt: str, source: str) -> None:
    k, f = _KEYS[fmt], inf.fields
    keys = set(state_dict)
    blk0 = k.block.format(i=0)
    x = k.streams["x_block"]
    d, cin, p, _ = infer.shape(state_dict, f"{k.patch}.weight", source)
    f.update(hidden_size=d, in_channels=cin, patch_size=p)
    f["depth"] = infer.depth_from(keys, f"{k.block.replace('{i}', '{n}')}.{x.ada}.weight", source)
    f["mlp_ratio"] = infer.shape(state_dict, f"{blk0}.{x.mlp[0]}.weight", source)[0] / d
    out = infer.shape(state_dict, f"{k.final}.weight", source)[0]
    if out % (p * p):
        raise ConversionError(f"{source}: {k.final}.weight has {out} outputs, not a multiple of patch² = {p * p}")
    f["out_channels"] = out // (p * p)
    f["joint_attention_dim"] = infer.shape(state_dict, f"{k.context}.weight", source)[1]
    f["pooled_projection_dim"] = infer.shape(state_dict, f"{k.y_embedder}.{k.mlp_layers[0]}.weight", source)[1]
    pos = infer.shape(state_dict, k.pos_embed, source)
    f["pos_embed_max_size"] = infer.grid_from_pos_embed(pos, d, source)
    ln_k = f"{blk0}.{k.streams['context_block'].attn.ln[1]}.weight"  # SAI's loader looks at this key
    f["qk_norm"] = "rms_norm" if ln_k in keys else None
    # MMDiT-X blocks from their attn2 projection (SAI's loader uses attn2.ln_k, which exists only with qk-norm)
    attn2 = f"{k.block.replace('{i}', '{n}')}.{k.attn2.qkv[0]}.weight"
    f["dual_attention_layers"] = tuple(infer.block_indices(keys, attn2))
    if f["qk_norm"]:
        head_dim = infer.shape(state_dict, ln_k, source)[0]
        if d % head_dim:
            raise ConversionError(f"{source}: {ln_k} has {head_dim} entries, which do not divide the width {d}")
        f["num_heads"] = d // head_dim
    elif d % _SAI_HEAD_DIM == 0:
        inf.soft["num_heads"] = d // _SAI_HEAD_DIM
    else:
        inf.missing["num_heads"] = (
            f"the checkpoint has no qk-norm (which would give the head_dim) and its width {d} is not a multiple of "
            f"SAI's head_dim {_SAI_HEAD_DIM}"
        )
    # Not stored: SAI trains at 128 latents (1024 px); a smaller table caps it.
    inf.soft["input_size"] = min(128, f["pos_embed_max_size"] * p)


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of an SD3/SD3.5 checkpoint (keys/shapes, or the diffusers ``config.json``)."""
    _check_prefix(state_dict, source)
    inf = infer.Inference()
    if diffusers_config is not None:
        _read_diffusers_config(diffusers_config, inf, source)
    else:
        _infer_from_keys(state_dict, inf, fmt, source)
    return inf


# ---- export ------------------------------------------------------------------------------------------------------


def export_extras(config: MMDiTConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Nothing beyond the rule table (``pos_embed`` is in it)."""
    return {}


def check_export(config: MMDiTConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; warnings where SAI's loader would read the checkpoint otherwise."""
    if fmt == "diffusers":
        common.check_mlp_ratio(config, DIFFUSERS_CLASS)
        return
    if fmt != "original":
        raise common.unknown_format(_NAME, fmt)
    d = config.hidden_size
    # SAI's BaseModel derives depth = heads = width / 64 from x_embedder and uses mlp_ratio 4.
    if config.head_dim != _SAI_HEAD_DIM or config.depth != d // _SAI_HEAD_DIM or config.mlp_ratio != 4.0:
        warnings.warn(
            f"exporting an MM-DiT of width {d}, {config.depth} layers, {config.num_heads} heads, mlp_ratio "
            f"{config.mlp_ratio} to the original format: Stability AI's loader assumes depth = heads = width/64 and "
            "mlp_ratio 4, so only loaders that take the architecture explicitly will read it",
            stacklevel=3,
        )


def diffusers_config(config: MMDiTConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``SD3Transformer2DModel`` (every argument written out)."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": common.DIFFUSERS_VERSION,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_projection_dim,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": config.qk_norm,
    }
