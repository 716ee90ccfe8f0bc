"""Hunyuan-DiT conversion: Tencent ``hydit`` checkpoints (``original``: ``pytorch_model_{ema,module,distill}.pt`` bare
state dicts, or DeepSpeed ``*_model_states.pt`` whose ``'ema'``/``'module'`` entries ``convert.io.unwrap`` picks
with ``weights="ema"``/``"model"``) and diffusers ``HunyuanDiT2DModel`` (``diffusers``).

Key mapping as in MODELS.md §5.2–5.3. Our parameter names follow the original; diffusers splits the fused ``Wqkv`` and
``kv_proj``, swaps the names ``norm2`` (pre-FFN in the original) and ``norm3`` (pre-cross-attention), and stores the
final modulation as (scale, shift) where the original and we store (shift, scale). The two formats also differ in
numerics: the RoPE base grid each reference samples (``HunyuanConfig.rope_convention``, MODELS.md §5.4), so an import
sets the convention of its format and an export to the other format warns.
"""

import math
import warnings
from collections.abc import Callable, Mapping
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
from dit_jax.models.hunyuan import POOLER_HEADS, HunyuanConfig

FAMILY = "hunyuan"
CONFIG = HunyuanConfig
DIFFUSERS_CLASS = "HunyuanDiT2DModel"
TORCH_WRAP: dict[str, str] = {}  # hydit's pytorch_model_*.pt are bare state dicts

_NAME = "Hunyuan-DiT"
# diffusers HunyuanDiT2DModel defaults (a config.json may omit any of them; in_channels/patch_size then come from
# the weights)
_DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 88,
    "in_channels": None,
    "patch_size": None,
    "activation_fn": "gelu-approximate",
    "sample_size": 32,
    "hidden_size": 1152,
    "num_layers": 28,
    "mlp_ratio": 4.0,
    "learn_sigma": True,
    "cross_attention_dim": 1024,
    "norm_type": "layer_norm",
    "cross_attention_dim_t5": 2048,
    "pooled_projection_dim": 1024,
    "text_len": 77,
    "text_len_t5": 256,
    "use_style_cond_and_image_meta_size": True,
}

# Per format, the torch names the inference reads; ``{n}`` is a block index.
_KEYS = {
    "original": {
        "patch": "x_embedder.proj.weight",
        "block": "blocks.{n}.norm1.weight",
        "head": "blocks.0.attn1.q_norm.weight",
        "mlp": "blocks.0.mlp.fc1.weight",
        "final": "final_layer.linear.weight",
        "kv": "blocks.0.attn2.kv_proj.weight",
        "t5": "mlp_t5.0.weight",
        "padding": "text_embedding_padding",
        "pos": "pooler.positional_embedding",
        "pooled": "pooler.c_proj.weight",
        "style": "style_embedder.weight",
    },
    "diffusers": {
        "patch": "pos_embed.proj.weight",
        "block": "blocks.{n}.norm1.norm.weight",
        "head": "blocks.0.attn1.norm_q.weight",
        "mlp": "blocks.0.ff.net.0.proj.weight",
        "final": "proj_out.weight",
        "kv": "blocks.0.attn2.to_k.weight",
        "t5": "text_embedder.linear_1.weight",
        "padding": "text_embedding_padding",
        "pos": "time_extra_emb.pooler.positional_embedding",
        "pooled": "time_extra_emb.pooler.c_proj.weight",
        "style": "time_extra_emb.style_embedder.weight",
    },
}


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are a Hunyuan-DiT's (the mT5 projection is the mark)."""
    if _KEYS["original"]["t5"] in keys:
        return "original"
    if _KEYS["diffusers"]["t5"] in keys and _KEYS["diffusers"]["pos"] in keys:
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of a ``HunyuanDiT2DModel``."""
    return d.get("_class_name") == DIFFUSERS_CLASS


def ignored(fmt: str) -> Callable[[str], bool]:
    """Hunyuan-DiT checkpoints hold no buffers (no stored positions: RoPE is computed): nothing is dropped."""
    return lambda key: False


# ---- transforms ------------------------------------------------------------------------------------------------------


def _swap_halves(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _swapped_linear():
    """diffusers ``norm_out.linear`` weight (2D, D) as (scale, shift) ↔ our kernel (D, 2D) as (shift, scale)."""
    return (lambda w: _swap_halves(w).T), (lambda k: _swap_halves(k.T))


def _swapped_bias():
    return _swap_halves, _swap_halves


# ---- rule tables -------------------------------------------------------------------------------------------------


def _pooler_rules(prefix: str, config: HunyuanConfig) -> list[Rule]:
    """The mT5 attention pooler: q/k/v projections split into its 8 heads, ``c_proj`` back from them."""
    ph = (POOLER_HEADS, config.text_dim_t5 // POOLER_HEADS)
    out = [rule(f"{prefix}.positional_embedding", "pooler/positional_embedding")]
    for n in ("q_proj", "k_proj", "v_proj"):
        out += dense(f"{prefix}.{n}", f"pooler/{n}", linear(out_shape=ph), bias(ph))
    return out + dense(f"{prefix}.c_proj", "pooler/c_proj", linear(in_shape=ph))


def _block_rules(config: HunyuanConfig, fmt: str) -> list[Rule]:
    """Block ``{i}`` without its skip layers."""
    hd = (config.num_heads, config.head_dim)
    b, f = "blocks.{i}", "blocks_{i}"
    if fmt == "original":
        return [
            *norm(f"{b}.norm1", f"{f}/norm1"),
            *dense(f"{b}.default_modulation.1", f"{f}/default_modulation"),
            *dense(f"{b}.attn1.Wqkv", f"{f}/attn1/qkv", linear(out_shape=(3, *hd)), bias((3, *hd))),
            *norm(f"{b}.attn1.q_norm", f"{f}/attn1/q_norm"),
            *norm(f"{b}.attn1.k_norm", f"{f}/attn1/k_norm"),
            *dense(f"{b}.attn1.out_proj", f"{f}/attn1/proj", linear(in_shape=hd)),
            *norm(f"{b}.norm3", f"{f}/norm3"),
            *dense(f"{b}.attn2.q_proj", f"{f}/attn2/q", linear(out_shape=hd), bias(hd)),
            *dense(f"{b}.attn2.kv_proj", f"{f}/attn2/kv", linear(out_shape=(2, *hd)), bias((2, *hd))),
            *norm(f"{b}.attn2.q_norm", f"{f}/attn2/q_norm"),
            *norm(f"{b}.attn2.k_norm", f"{f}/attn2/k_norm"),
            *dense(f"{b}.attn2.out_proj", f"{f}/attn2/proj", linear(in_shape=hd)),
            *norm(f"{b}.norm2", f"{f}/norm2"),
            *dense(f"{b}.mlp.fc1", f"{f}/mlp/fc1"),
            *dense(f"{b}.mlp.fc2", f"{f}/mlp/fc2"),
        ]
    return [
        *norm(f"{b}.norm1.norm", f"{f}/norm1"),
        *dense(f"{b}.norm1.linear", f"{f}/default_modulation"),
        *stacked_dense(tuple(f"{b}.attn1.to_{n}" for n in "qkv"), f"{f}/attn1/qkv", hd),
        *norm(f"{b}.attn1.norm_q", f"{f}/attn1/q_norm"),
        *norm(f"{b}.attn1.norm_k", f"{f}/attn1/k_norm"),
        *dense(f"{b}.attn1.to_out.0", f"{f}/attn1/proj", linear(in_shape=hd)),
        *norm(f"{b}.norm2", f"{f}/norm3"),  # diffusers' norm2 is the pre-cross-attention norm
        *dense(f"{b}.attn2.to_q", f"{f}/attn2/q", linear(out_shape=hd), bias(hd)),
        *stacked_dense((f"{b}.attn2.to_k", f"{b}.attn2.to_v"), f"{f}/attn2/kv", hd),
        *norm(f"{b}.attn2.norm_q", f"{f}/attn2/q_norm"),
        *norm(f"{b}.attn2.norm_k", f"{f}/attn2/k_norm"),
        *dense(f"{b}.attn2.to_out.0", f"{f}/attn2/proj", linear(in_shape=hd)),
        *norm(f"{b}.norm3", f"{f}/norm2"),  # diffusers' norm3 is the pre-FFN norm
        *dense(f"{b}.ff.net.0.proj", f"{f}/mlp/fc1"),
        *dense(f"{b}.ff.net.2", f"{f}/mlp/fc2"),
    ]


def rules(config: HunyuanConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (always 1)."""
    if fmt == "original":
        emb = ""
        table = [
            *dense("x_embedder.proj", "x_embedder/proj", conv()),
            *mlp("t_embedder.mlp", "t_embedder", ("0", "2")),
            *mlp("mlp_t5", "mlp_t5", ("0", "2")),
            *mlp("extra_embedder", "extra_embedder", ("0", "2")),
            *dense("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation/linear"),
            *dense("final_layer.linear", "final_layer/linear"),
        ]
    elif fmt == "diffusers":
        emb = "time_extra_emb."
        names = ("linear_1", "linear_2")
        table = [
            *dense("pos_embed.proj", "x_embedder/proj", conv()),
            *mlp(f"{emb}timestep_embedder", "t_embedder", names),
            *mlp("text_embedder", "mlp_t5", names),
            *mlp(f"{emb}extra_embedder", "extra_embedder", names),
            *dense("norm_out.linear", "final_layer/adaLN_modulation/linear", _swapped_linear(), _swapped_bias()),
            *dense("proj_out", "final_layer/linear"),
        ]
    else:
        raise common.unknown_format(_NAME, fmt)
    table += [rule("text_embedding_padding", "text_embedding_padding"), *_pooler_rules(f"{emb}pooler", config)]
    if config.use_style_cond_and_image_meta_size:
        table.append(rule(f"{emb}style_embedder.weight", "style_embedder/embedding"))
    table = expand(table + _block_rules(config, fmt), config.depth)
    for i, kind in enumerate(config.layer_kinds()):
        if kind["skip"]:
            table += expand(
                [
                    *norm(f"blocks.{i}.skip_norm", f"blocks_{i}/skip_norm"),
                    *dense(f"blocks.{i}.skip_linear", f"blocks_{i}/skip_linear"),
                ]
            )
    return table, 1


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Nothing beyond the rule table to check for Hunyuan-DiT."""


# ---- import: inference ---------------------------------------------------------------------------------------------


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio r with ``int(width · r) == hidden`` (the models' MLP width): the shortest one of 4 decimals where it
    fits (DiT-g/2: 6144 / 1408 → 4.3637, the released config's value), else the exact quotient."""
    short = math.ceil(hidden / width * 1e4) / 1e4
    if int(width * short) == hidden:
        return short
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


def _read_diffusers_config(
    c: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], inf: infer.Inference, source: str
) -> None:
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in c.items() if k in _DIFFUSERS_DEFAULTS}}
    if cfg["activation_fn"] != "gelu-approximate":
        raise ConversionError(
            f"{source}: config.json has activation_fn={cfg['activation_fn']!r}; a {_NAME} needs 'gelu-approximate'"
        )
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    if int(cfg["hidden_size"]) != heads * head_dim:
        raise ConversionError(
            f"{source}: config.json has hidden_size={cfg['hidden_size']} but {heads} heads × {head_dim} = "
            f"{heads * head_dim}; a {DIFFUSERS_CLASS} needs them equal"
        )
    patch = infer.shape(state_dict, _KEYS["diffusers"]["patch"], source)
    f = inf.fields
    f.update(
        num_heads=heads,
        hidden_size=heads * head_dim,
        in_channels=int(cfg["in_channels"] if cfg["in_channels"] is not None else patch[1]),
        patch_size=int(cfg["patch_size"] if cfg["patch_size"] is not None else patch[2]),
        input_size=int(cfg["sample_size"]),
        depth=int(cfg["num_layers"]),
        mlp_ratio=float(cfg["mlp_ratio"]),
        learn_sigma=bool(cfg["learn_sigma"]),
        text_dim=int(cfg["cross_attention_dim"]),
        text_dim_t5=int(cfg["cross_attention_dim_t5"]),
        pooled_dim=int(cfg["pooled_projection_dim"]),
        text_len=int(cfg["text_len"]),
        text_len_t5=int(cfg["text_len_t5"]),
        use_style_cond_and_image_meta_size=bool(cfg["use_style_cond_and_image_meta_size"]),
    )


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of a Hunyuan-DiT checkpoint (keys/shapes, or the diffusers ``config.json``) and the RoPE
    convention of its format. The training size is not stored and no parameter depends on it: ``input_size`` is
    guessed as 128 (1024 px) for original checkpoints; the RoPE base grid is the released 512 px."""
    inf = infer.Inference()
    f = inf.fields
    f["rope_convention"] = fmt
    inf.soft.update(input_size=128, rope_img="base512")
    if diffusers_config is not None:
        _read_diffusers_config(diffusers_config, state_dict, inf, source)
        return inf

    k = _KEYS[fmt]
    d, cin, p, _ = infer.shape(state_dict, k["patch"], source)
    head_dim = infer.shape(state_dict, k["head"], source)[0]
    if not head_dim or d % head_dim:
        raise ConversionError(f"{source}: {k['head']} has {head_dim} entries, which does not divide the width {d}")
    text_total = infer.shape(state_dict, k["padding"], source)[0]
    text_len_t5 = infer.shape(state_dict, k["pos"], source)[0] - 1
    if text_total <= text_len_t5:
        raise ConversionError(
            f"{source}: {k['padding']} has {text_total} tokens, not more than the pooler's {text_len_t5} mT5 tokens"
        )
    f.update(
        hidden_size=d,
        in_channels=cin,
        patch_size=p,
        num_heads=d // head_dim,
        depth=infer.depth_from(state_dict, k["block"], source),
        mlp_ratio=_mlp_ratio(infer.shape(state_dict, k["mlp"], source)[0], d),
        learn_sigma=infer.out_channels(infer.shape(state_dict, k["final"], source)[0], p, cin, source),
        text_dim=infer.shape(state_dict, k["kv"], source)[1],
        text_dim_t5=infer.shape(state_dict, k["t5"], source)[1],
        pooled_dim=infer.shape(state_dict, k["pooled"], source)[0],
        text_len=text_total - text_len_t5,
        text_len_t5=text_len_t5,
        use_style_cond_and_image_meta_size=k["style"] in state_dict,
    )
    return inf


# ---- export --------------------------------------------------------------------------------------------------------


def export_extras(config: HunyuanConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Hunyuan-DiT checkpoints hold nothing beyond the rule table."""
    return {}


def check_export(config: HunyuanConfig, fmt: str) -> None:
    """Warnings where ``fmt``'s reference computes RoPE otherwise than this model (the weights convert exactly)."""
    if fmt not in ("original", "diffusers"):
        raise common.unknown_format(_NAME, fmt)
    notes = []
    if config.rope_convention != fmt:
        notes.append(
            f"samples the RoPE base grid the {fmt} way, not the {config.rope_convention} way of this model "
            "(the same for square latents, different otherwise)"
        )
    if fmt == "diffusers" and config.rope_img != "base512":
        notes.append(f"builds RoPE on the 512 px base grid, not this model's rope_img={config.rope_img!r}")
    if notes:
        what = "diffusers' HunyuanDiTPipeline" if fmt == "diffusers" else "the original hydit sampler"
        warnings.warn(f"exporting a Hunyuan-DiT to the {fmt} format: {what} " + "; ".join(notes), stacklevel=3)


def diffusers_config(config: HunyuanConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``HunyuanDiT2DModel`` (every field written out)."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": common.DIFFUSERS_VERSION,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "sample_size": config.input_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.depth,
        "mlp_ratio": config.mlp_ratio,
        "learn_sigma": config.learn_sigma,
        "cross_attention_dim": config.text_dim,
        "norm_type": "layer_norm",
        "cross_attention_dim_t5": config.text_dim_t5,
        "pooled_projection_dim": config.pooled_dim,
        "text_len": config.text_len,
        "text_len_t5": config.text_len_t5,
        "use_style_cond_and_image_meta_size": config.use_style_cond_and_image_meta_size,
    }
