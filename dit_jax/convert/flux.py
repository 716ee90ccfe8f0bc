"""Flux conversion: black-forest-labs ``original`` checkpoints (``flux1-dev.safetensors``) and diffusers
``FluxTransformer2DModel`` (``diffusers``).

Key mapping as in MODELS.md §4.2–4.3. The fused BFL tensors map one-to-one onto ours (double-block ``qkv``; single-block
``linear1`` = q|k|v|mlp and ``linear2``); diffusers splits them (``to_q``/``to_k``/``to_v``/``proj_mlp``), and its
``norm_out`` stores the final (scale, shift) where BFL and we store (shift, scale). Neither format stores the packing
(2×2), the RoPE axes or theta: the original's come from the released ``FluxParams`` (axes (16, 56, 56) for head_dim
128, theta 10000), diffusers' from ``config.json`` (theta is fixed at 10000 there).
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dit_jax.convert import common, infer
from dit_jax.convert.rules import ConversionError, Rule, bias, dense, expand, linear, mlp, rule, stacked_dense
from dit_jax.models.flux import FluxConfig

FAMILY = "flux"
CONFIG = FluxConfig
DIFFUSERS_CLASS = "FluxTransformer2DModel"
TORCH_WRAP: dict[str, str] = {}

_NAME = "Flux"
_PACK = 2  # the 2×2 latent packing both references do outside the transformer
_BFL_AXES = (16, 56, 56)  # FluxParams.axes_dim of every released model (head_dim 128)
_THETA = 10000.0
# diffusers FluxTransformer2DModel defaults (a config.json may omit any of them)
_DIFFUSERS_DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

# Per format, the torch names the inference reads: ``{n}`` is a block index.
_KEYS = {
    "original": {
        "img_in": "img_in.weight",
        "txt_in": "txt_in.weight",
        "final": "final_layer.linear.weight",
        "vector": "vector_in.in_layer.weight",
        "guidance": "guidance_in.in_layer.weight",
        "double": "double_blocks.{n}.img_mod.lin.weight",
        "single": "single_blocks.{n}.linear1.weight",
        "q_norm": "double_blocks.0.img_attn.norm.query_norm.scale",
        "mlp": "double_blocks.0.img_mlp.0.weight",
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias",
    },
    "diffusers": {
        "img_in": "x_embedder.weight",
        "txt_in": "context_embedder.weight",
        "final": "proj_out.weight",
        "vector": "time_text_embed.text_embedder.linear_1.weight",
        "guidance": "time_text_embed.guidance_embedder.linear_1.weight",
        "double": "transformer_blocks.{n}.norm1.linear.weight",
        "single": "single_transformer_blocks.{n}.norm.linear.weight",
        "q_norm": "transformer_blocks.0.attn.norm_q.weight",
        "mlp": "transformer_blocks.0.ff.net.0.proj.weight",
        "qkv_bias": "transformer_blocks.0.attn.to_q.bias",
    },
}


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are a Flux's (BFL ``img_in``; diffusers' Linear ``x_embedder``)."""
    if "img_in.weight" in keys:
        return "original"
    if "x_embedder.weight" in keys:
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of a ``FluxTransformer2DModel``."""
    return d.get("_class_name") == DIFFUSERS_CLASS


def ignored(fmt: str) -> Callable[[str], bool]:
    """Flux checkpoints hold no buffers: nothing is dropped on import."""
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


def _split_linear(sizes: tuple[int, ...], out_shape: tuple[int, ...]):
    """Several torch Linear weights (out_j, in) stacked along out (e.g. to_q|to_k|to_v|proj_mlp) ↔ one kernel
    (in, *out_shape)."""
    cuts = np.cumsum(sizes)[:-1]

    def to_flax(*ws):
        w = np.concatenate(ws, axis=0)
        return w.T.reshape((w.shape[1], *out_shape))

    def to_torch(k):
        return tuple(np.split(k.reshape(k.shape[0], -1).T, cuts, axis=0))

    return to_flax, to_torch


def _split_bias(sizes: tuple[int, ...], out_shape: tuple[int, ...]):
    cuts = np.cumsum(sizes)[:-1]
    return (lambda *bs: np.concatenate(bs).reshape(out_shape)), (lambda b: tuple(np.split(b.reshape(-1), cuts)))


# ---- rule tables -------------------------------------------------------------------------------------------------


def _double_rules(config: FluxConfig, fmt: str) -> list[Rule]:
    """Double-stream block ``{i}`` (image and text streams)."""
    hd = (config.num_heads, config.head_dim)
    out = []
    for s in ("img", "txt"):
        f = f"blocks_{{i}}/{s}"
        if fmt == "original":
            b = f"double_blocks.{{i}}.{s}"
            qkv = [rule(f"{b}_attn.qkv.weight", f"{f}_attn/qkv/kernel", linear(out_shape=(3, *hd)))]
            if config.qkv_bias:
                qkv.append(rule(f"{b}_attn.qkv.bias", f"{f}_attn/qkv/bias", bias((3, *hd))))
            out += [
                *dense(f"{b}_mod.lin", f"{f}_mod/linear"),
                *qkv,
                rule(f"{b}_attn.norm.query_norm.scale", f"{f}_attn/query_norm/scale"),
                rule(f"{b}_attn.norm.key_norm.scale", f"{f}_attn/key_norm/scale"),
                *dense(f"{b}_attn.proj", f"{f}_attn/proj", linear(in_shape=hd)),
                *dense(f"{b}_mlp.0", f"{f}_mlp/fc1"),
                *dense(f"{b}_mlp.2", f"{f}_mlp/fc2"),
            ]
            continue
        b = "transformer_blocks.{i}"
        img = s == "img"
        proj_names = ("to_q", "to_k", "to_v") if img else ("add_q_proj", "add_k_proj", "add_v_proj")
        norms = ("norm_q", "norm_k") if img else ("norm_added_q", "norm_added_k")
        ff = "ff" if img else "ff_context"
        out += [
            *dense(f"{b}.{'norm1' if img else 'norm1_context'}.linear", f"{f}_mod/linear"),
            *stacked_dense(tuple(f"{b}.attn.{n}" for n in proj_names), f"{f}_attn/qkv", hd),
            rule(f"{b}.attn.{norms[0]}.weight", f"{f}_attn/query_norm/scale"),
            rule(f"{b}.attn.{norms[1]}.weight", f"{f}_attn/key_norm/scale"),
            *dense(f"{b}.attn.{'to_out.0' if img else 'to_add_out'}", f"{f}_attn/proj", linear(in_shape=hd)),
            *dense(f"{b}.{ff}.net.0.proj", f"{f}_mlp/fc1"),
            *dense(f"{b}.{ff}.net.2", f"{f}_mlp/fc2"),
        ]
    return out


def _single_rules(config: FluxConfig, fmt: str, j: int) -> list[Rule]:
    """Single-stream block ``j`` (our ``blocks_{depth + j}``)."""
    d, r = config.hidden_size, config.mlp_chunks
    hd = (config.num_heads, config.head_dim)
    f = f"blocks_{config.depth + j}"
    linear1, linear2 = (3 + r, *hd), linear(in_shape=(1 + r, *hd))
    if fmt == "original":
        b = f"single_blocks.{j}"
        return [
            *dense(f"{b}.modulation.lin", f"{f}/modulation/linear"),
            *dense(f"{b}.linear1", f"{f}/linear1", linear(out_shape=linear1), bias(linear1)),
            rule(f"{b}.norm.query_norm.scale", f"{f}/query_norm/scale"),
            rule(f"{b}.norm.key_norm.scale", f"{f}/key_norm/scale"),
            *dense(f"{b}.linear2", f"{f}/linear2", linear2),
        ]
    b = f"single_transformer_blocks.{j}"
    parts = tuple(f"{b}.attn.to_{n}" for n in "qkv") + (f"{b}.proj_mlp",)
    sizes = (d, d, d, r * d)
    return [
        *dense(f"{b}.norm.linear", f"{f}/modulation/linear"),
        rule(tuple(f"{p}.weight" for p in parts), f"{f}/linear1/kernel", _split_linear(sizes, linear1)),
        rule(tuple(f"{p}.bias" for p in parts), f"{f}/linear1/bias", _split_bias(sizes, linear1)),
        rule(f"{b}.attn.norm_q.weight", f"{f}/query_norm/scale"),
        rule(f"{b}.attn.norm_k.weight", f"{f}/key_norm/scale"),
        *dense(f"{b}.proj_out", f"{f}/linear2", linear2),
    ]


def rules(config: FluxConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (always 1 for Flux)."""
    if fmt == "original":
        table = [
            *dense("img_in", "img_in"),
            *dense("txt_in", "txt_in"),
            *mlp("time_in", "time_in", ("in_layer", "out_layer")),
            *mlp("vector_in", "vector_in", ("in_layer", "out_layer")),
            *dense("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation/linear"),
            *dense("final_layer.linear", "final_layer/linear"),
        ]
        if config.guidance_embeds:
            table += mlp("guidance_in", "guidance_in", ("in_layer", "out_layer"))
    elif fmt == "diffusers":
        emb, names = "time_text_embed", ("linear_1", "linear_2")
        table = [
            *dense("x_embedder", "img_in"),
            *dense("context_embedder", "txt_in"),
            *mlp(f"{emb}.timestep_embedder", "time_in", names),
            *mlp(f"{emb}.text_embedder", "vector_in", names),
            *dense("norm_out.linear", "final_layer/adaLN_modulation/linear", _swapped_linear(), _swapped_bias()),
            *dense("proj_out", "final_layer/linear"),
        ]
        if config.guidance_embeds:
            table += mlp(f"{emb}.guidance_embedder", "guidance_in", names)
    else:
        raise common.unknown_format(_NAME, fmt)
    table = expand(table + _double_rules(config, fmt), config.depth)
    for j in range(config.depth_single):
        table += expand(_single_rules(config, fmt, j))
    return table, 1


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Nothing beyond the rule table to check for Flux."""


# ---- import: inference ---------------------------------------------------------------------------------------------


def _unpacked(features: int, what: str, source: str) -> int:
    if features % (_PACK * _PACK):
        raise ConversionError(
            f"{source}: {what} has {features} features; expected 2×2-packed latents (a multiple of 4)"
        )
    return features // (_PACK * _PACK)


def _read_diffusers_config(c: Mapping[str, Any], inf: infer.Inference, source: str) -> None:
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in c.items() if k in _DIFFUSERS_DEFAULTS}}
    if cfg["patch_size"] != 1:
        raise ConversionError(
            f"{source}: config.json has patch_size={cfg['patch_size']!r}; a Flux transformer takes 2×2-packed latents "
            "with patch_size 1"
        )
    f = inf.fields
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    cin = int(cfg["in_channels"])
    cout = cin if cfg["out_channels"] is None else int(cfg["out_channels"])
    f.update(
        num_heads=heads,
        hidden_size=heads * head_dim,
        in_channels=_unpacked(cin, "in_channels", source),
        out_channels=_unpacked(cout, "out_channels", source),
        depth=int(cfg["num_layers"]),
        depth_single=int(cfg["num_single_layers"]),
        context_dim=int(cfg["joint_attention_dim"]),
        pooled_dim=int(cfg["pooled_projection_dim"]),
        guidance_embeds=bool(cfg["guidance_embeds"]),
        axes_dims=tuple(int(a) for a in cfg["axes_dims_rope"]),
        mlp_ratio=4.0,
        qkv_bias=True,
    )


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of a Flux checkpoint (keys/shapes, or the diffusers ``config.json``). The training size is not
    stored and no parameter depends on it: ``input_size`` is guessed as 128 (1024 px)."""
    inf = infer.Inference()
    f = inf.fields
    f["patch_size"] = _PACK
    inf.soft["input_size"] = 128
    if fmt == "diffusers":
        f["theta"] = _THETA  # FluxTransformer2DModel fixes it
    else:
        inf.soft["theta"] = _THETA
    if diffusers_config is not None:
        _read_diffusers_config(diffusers_config, inf, source)
        return inf

    k = _KEYS[fmt]
    d, cin = infer.shape(state_dict, k["img_in"], source)
    head_dim = infer.shape(state_dict, k["q_norm"], source)[0]
    if not head_dim or d % head_dim:
        raise ConversionError(f"{source}: {k['q_norm']} has {head_dim} entries, which does not divide the width {d}")
    f.update(
        hidden_size=d,
        num_heads=d // head_dim,
        in_channels=_unpacked(cin, k["img_in"], source),
        out_channels=_unpacked(infer.shape(state_dict, k["final"], source)[0], k["final"], source),
        context_dim=infer.shape(state_dict, k["txt_in"], source)[1],
        pooled_dim=infer.shape(state_dict, k["vector"], source)[1],
        guidance_embeds=k["guidance"] in state_dict,
        depth=infer.depth_from(state_dict, k["double"], source),
        mlp_ratio=infer.shape(state_dict, k["mlp"], source)[0] / d,
        qkv_bias=fmt == "diffusers" or k["qkv_bias"] in state_dict,  # diffusers' attention always has biases
    )
    singles = infer.block_indices(state_dict, k["single"])
    f["depth_single"] = infer.depth_from(state_dict, k["single"], source) if singles else 0
    if head_dim == sum(_BFL_AXES):
        inf.soft["axes_dims"] = _BFL_AXES
    else:
        inf.missing["axes_dims"] = (
            f"the RoPE axes are not stored in the checkpoint and head_dim {head_dim} is not the released 128 "
            f"(axes {_BFL_AXES})"
        )
    return inf


# ---- export --------------------------------------------------------------------------------------------------------


def export_extras(config: FluxConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Flux checkpoints hold nothing beyond the rule table."""
    return {}


def check_export(config: FluxConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; a warning where the original format does not record a setting."""
    if config.patch_size != _PACK:
        raise ConversionError(
            f"Flux checkpoints assume 2×2-packed latents (BFL's prepare, FluxPipeline); this model has "
            f"patch_size={config.patch_size}"
        )
    if fmt == "diffusers":
        problems = []
        if config.mlp_ratio != 4.0:
            problems.append(f"mlp_ratio 4 (this model has {config.mlp_ratio})")
        if not config.qkv_bias:
            problems.append("qkv biases (this model has qkv_bias=False)")
        if config.theta != _THETA:
            problems.append(f"RoPE theta 10000 (this model has {config.theta})")
        if problems:
            raise ConversionError(f"diffusers' {DIFFUSERS_CLASS} has " + "; ".join(problems))
    elif tuple(config.axes_dims) != _BFL_AXES or config.theta != _THETA:
        warnings.warn(
            f"the original Flux format does not store the RoPE axes {tuple(config.axes_dims)} or theta "
            f"{config.theta}; BFL's FluxParams must be set to them (the released models use {_BFL_AXES}, 10000)",
            stacklevel=3,
        )


def diffusers_config(config: FluxConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``FluxTransformer2DModel`` (every field written out)."""
    packed = _PACK * _PACK
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": common.DIFFUSERS_VERSION,
        "patch_size": 1,
        "in_channels": config.in_channels * packed,
        "out_channels": config.out_channels * packed,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "pooled_projection_dim": config.pooled_dim,
        "guidance_embeds": config.guidance_embeds,
        "axes_dims_rope": list(config.axes_dims),
    }
