"""PixArt-α/Σ conversion: PixArt-alpha/-sigma ``original`` checkpoints and diffusers ``PixArtTransformer2DModel``.

Key mapping as in MODELS.md §2.2–2.3, plus the original's qk-norm (``attn.q_norm/k_norm``) and KV-compression keys
(``attn.sr.*`` depthwise conv, ``attn.norm.*`` LayerNorm → ``attn/compress/sr``, ``attn/compress/norm``), which
diffusers cannot hold. A stored ``pos_embed`` gives the training latent size and, by matching our sin-cos table
against candidates, ``pe_interpolation``; ``y_embedder.y_embedding`` is α's learned null caption.
"""

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import infer
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, expand, linear, rule, stacked_bias, stacked_linear
from dit_jax.models.pixart import PixArtConfig
from dit_jax.nn.embeddings import sincos_pos_embed

FAMILY = "pixart"
CONFIG = PixArtConfig
DIFFUSERS_CLASS = "PixArtTransformer2DModel"
DIFFUSERS_VERSION = "0.42.1"

_ORIGINAL_MARK = "t_block.1.weight"
_DIFFUSERS_MARK = "adaln_single.linear.weight"


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are a PixArt's, else None."""
    if _ORIGINAL_MARK in keys:
        return "original"
    if _DIFFUSERS_MARK in keys:
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of a PixArt (``PixArtTransformer2DModel``, or an adaLN-single one)."""
    name = d.get("_class_name")
    return name == DIFFUSERS_CLASS or (name == "Transformer2DModel" and d.get("norm_type") == "ada_norm_single")


def _mlp(torch_prefix: str, flax_prefix: str, names: tuple[str, str]) -> list[Rule]:
    out = []
    for t, f in zip(names, ("linear_1", "linear_2")):
        out += [
            rule(f"{torch_prefix}.{t}.weight", f"{flax_prefix}/{f}/kernel", linear()),
            rule(f"{torch_prefix}.{t}.bias", f"{flax_prefix}/{f}/bias"),
        ]
    return out


def _dense(torch_prefix: str, flax_prefix: str, transform=None, bias_transform=None) -> list[Rule]:
    return [
        rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", transform or linear()),
        rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias", bias_transform),
    ]


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"), rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def rules(config: PixArtConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (always 1 for PixArt)."""
    h = config.num_heads
    dh = config.hidden_size // h
    qkv_t = (linear(out_shape=(3, h, dh)), bias((3, h, dh)))
    q_t = (linear(out_shape=(h, dh)), bias((h, dh)))
    proj_t = linear(in_shape=(h, dh))
    compressed = config.kv_compress_layers if config.kv_compress_op == "conv" else ()
    if fmt == "original":
        table = [
            rule("x_embedder.proj.weight", "x_embedder/proj/kernel", conv()),
            rule("x_embedder.proj.bias", "x_embedder/proj/bias"),
            *_mlp("t_embedder.mlp", "t_embedder", ("0", "2")),
            *_dense("t_block.1", "t_block"),
            rule("blocks.{i}.scale_shift_table", "blocks_{i}/scale_shift_table"),
            *_dense("blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv", *qkv_t),
            *_dense("blocks.{i}.attn.proj", "blocks_{i}/attn/proj", proj_t),
            *_dense("blocks.{i}.cross_attn.q_linear", "blocks_{i}/cross_attn/q", *q_t),
            *_dense(
                "blocks.{i}.cross_attn.kv_linear",
                "blocks_{i}/cross_attn/kv",
                linear(out_shape=(2, h, dh)),
                bias((2, h, dh)),
            ),
            *_dense("blocks.{i}.cross_attn.proj", "blocks_{i}/cross_attn/proj", proj_t),
            *_dense("blocks.{i}.mlp.fc1", "blocks_{i}/mlp/fc1"),
            *_dense("blocks.{i}.mlp.fc2", "blocks_{i}/mlp/fc2"),
            rule("final_layer.scale_shift_table", "final_layer/scale_shift_table"),
            *_dense("final_layer.linear", "final_layer/linear"),
        ]
        if config.caption_channels is not None:
            table += [
                *_dense("y_embedder.y_proj.fc1", "y_embedder/y_proj/fc1"),
                *_dense("y_embedder.y_proj.fc2", "y_embedder/y_proj/fc2"),
            ]
        if config.learned_null_caption:
            table.append(rule("y_embedder.y_embedding", "y_embedder/y_embedding"))
        if config.micro_conditions:
            table += _mlp("csize_embedder.mlp", "csize_embedder/mlp", ("0", "2"))
            table += _mlp("ar_embedder.mlp", "ar_embedder/mlp", ("0", "2"))
        if config.qk_norm:
            table += _norm("blocks.{i}.attn.q_norm", "blocks_{i}/attn/q_norm")
            table += _norm("blocks.{i}.attn.k_norm", "blocks_{i}/attn/k_norm")
        table = expand(table, config.depth)
        for n in compressed:
            table += [
                rule(f"blocks.{n}.attn.sr.weight", f"blocks_{n}/attn/compress/sr/kernel", conv()),
                rule(f"blocks.{n}.attn.sr.bias", f"blocks_{n}/attn/compress/sr/bias"),
                *_norm(f"blocks.{n}.attn.norm", f"blocks_{n}/attn/compress/norm"),
            ]
        return table, 1
    if fmt == "diffusers":
        if compressed:
            raise ConversionError(
                "diffusers' PixArtTransformer2DModel has no KV compression; export this model "
                f"(kv_compress_layers={config.kv_compress_layers}) with format='original'"
            )
        blk = "transformer_blocks.{i}"
        to_qkv = tuple(f"{blk}.attn1.to_{n}" for n in "qkv")
        to_kv = tuple(f"{blk}.attn2.to_{n}" for n in "kv")
        table = [
            rule("pos_embed.proj.weight", "x_embedder/proj/kernel", conv()),
            rule("pos_embed.proj.bias", "x_embedder/proj/bias"),
            *_mlp("adaln_single.emb.timestep_embedder", "t_embedder", ("linear_1", "linear_2")),
            *_dense("adaln_single.linear", "t_block"),
            rule(f"{blk}.scale_shift_table", "blocks_{i}/scale_shift_table"),
            rule(tuple(f"{k}.weight" for k in to_qkv), "blocks_{i}/attn/qkv/kernel", stacked_linear(3, (h, dh))),
            rule(tuple(f"{k}.bias" for k in to_qkv), "blocks_{i}/attn/qkv/bias", stacked_bias(3, (h, dh))),
            *_dense(f"{blk}.attn1.to_out.0", "blocks_{i}/attn/proj", proj_t),
            *_dense(f"{blk}.attn2.to_q", "blocks_{i}/cross_attn/q", *q_t),
            rule(tuple(f"{k}.weight" for k in to_kv), "blocks_{i}/cross_attn/kv/kernel", stacked_linear(2, (h, dh))),
            rule(tuple(f"{k}.bias" for k in to_kv), "blocks_{i}/cross_attn/kv/bias", stacked_bias(2, (h, dh))),
            *_dense(f"{blk}.attn2.to_out.0", "blocks_{i}/cross_attn/proj", proj_t),
            *_dense(f"{blk}.ff.net.0.proj", "blocks_{i}/mlp/fc1"),
            *_dense(f"{blk}.ff.net.2", "blocks_{i}/mlp/fc2"),
            rule("scale_shift_table", "final_layer/scale_shift_table"),
            *_dense("proj_out", "final_layer/linear"),
        ]
        if config.caption_channels is not None:
            table += [
                *_dense("caption_projection.linear_1", "y_embedder/y_proj/fc1"),
                *_dense("caption_projection.linear_2", "y_embedder/y_proj/fc2"),
            ]
        if config.learned_null_caption and not for_export:
            table.append(rule("caption_projection.y_embedding", "y_embedder/y_embedding"))
        if config.micro_conditions:
            table += _mlp("adaln_single.emb.resolution_embedder", "csize_embedder/mlp", ("linear_1", "linear_2"))
            table += _mlp("adaln_single.emb.aspect_ratio_embedder", "ar_embedder/mlp", ("linear_1", "linear_2"))
        if config.qk_norm:
            table += _norm(f"{blk}.attn1.q_norm", "blocks_{i}/attn/q_norm")
            table += _norm(f"{blk}.attn1.k_norm", "blocks_{i}/attn/k_norm")
        return expand(table, config.depth), 1
    raise ValueError(f"unknown PixArt checkpoint format {fmt!r}; expected 'original' or 'diffusers'")


def ignored(fmt: str):
    """Keys dropped on import: the fixed positional table (we compute it)."""
    return lambda key: key in ("pos_embed", "pos_embed.pos_embed")


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Nothing beyond the rule table to check for PixArt."""


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of a PixArt checkpoint (keys/shapes, or the diffusers ``config.json``)."""
    inf = infer.Inference()
    f = inf.fields
    keys = set(state_dict)
    f.update(norm_eps=1e-6, timestep_freq_shift=0.0, kv_compress_layers=(), kv_compress_op="conv")
    if fmt == "original":
        names = {
            "patch": "x_embedder.proj.weight",
            "blocks": "blocks.{n}.scale_shift_table",
            "fc1": "blocks.0.mlp.fc1.weight",
            "final": "final_layer.linear.weight",
            "caption": "y_embedder.y_proj.fc1.weight",
            "kv": "blocks.0.cross_attn.kv_linear.weight",
            "null": "y_embedder.y_embedding",
            "micro": "csize_embedder.mlp.0.weight",
            "q_norm": "blocks.{n}.attn.q_norm.weight",
        }
    else:
        names = {
            "patch": "pos_embed.proj.weight",
            "blocks": "transformer_blocks.{n}.scale_shift_table",
            "fc1": "transformer_blocks.0.ff.net.0.proj.weight",
            "final": "proj_out.weight",
            "caption": "caption_projection.linear_1.weight",
            "kv": "transformer_blocks.0.attn2.to_k.weight",
            "null": "caption_projection.y_embedding",
            "micro": "adaln_single.emb.resolution_embedder.linear_1.weight",
            "q_norm": "transformer_blocks.{n}.attn1.q_norm.weight",
        }
    if names["null"] in keys:
        f.update(learned_null_caption=True, caption_length=int(np.shape(state_dict[names["null"]])[0]))
    else:
        f["learned_null_caption"] = False
    f["qk_norm"] = bool(infer.block_indices(keys, names["q_norm"]))

    if diffusers_config is not None:
        c = diffusers_config
        _check_diffusers_config(c, source)
        f["num_heads"] = int(c.get("num_attention_heads", 16))
        f["hidden_size"] = f["num_heads"] * int(c.get("attention_head_dim", 72))
        f["in_channels"] = int(c.get("in_channels", 4))
        out = c.get("out_channels", 8)  # diffusers' default; None means in_channels
        out = f["in_channels"] if out is None else out
        if out not in (f["in_channels"], 2 * f["in_channels"]):
            raise ConversionError(f"{source}: out_channels={out} is neither in_channels nor 2·in_channels")
        f["learn_sigma"] = out == 2 * f["in_channels"]
        f["depth"] = int(c.get("num_layers", 28))
        f["patch_size"] = int(c.get("patch_size", 2))
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

    d, cin, p, _ = infer.shape(state_dict, names["patch"], source)
    f.update(hidden_size=d, in_channels=cin, patch_size=p)
    f["depth"] = infer.depth_from(keys, names["blocks"], source)
    f["mlp_ratio"] = infer.shape(state_dict, names["fc1"], source)[0] / d
    f["learn_sigma"] = infer.out_channels(infer.shape(state_dict, names["final"], source)[0], p, cin, source)
    if names["caption"] in keys:
        f.update(caption_channels=infer.shape(state_dict, names["caption"], source)[1], cross_attention_dim=None)
    else:
        f.update(caption_channels=None, cross_attention_dim=infer.shape(state_dict, names["kv"], source)[1])
    f["micro_conditions"] = names["micro"] in keys
    if fmt == "original":
        layers = infer.block_indices(keys, "blocks.{n}.attn.sr.weight")
        if layers:
            ratios = {int(np.shape(state_dict[f"blocks.{n}.attn.sr.weight"])[-1]) for n in layers}
            if len(ratios) != 1:
                raise ConversionError(f"{source}: KV-compression convs of different sizes {sorted(ratios)}")
            f.update(kv_compress_layers=tuple(layers), kv_compress_ratio=ratios.pop())
    infer.heads(d, inf)

    pos_key = next((k for k in ("pos_embed", "pos_embed.pos_embed") if k in state_dict), None)
    if pos_key is None:
        why = "the checkpoint stores no pos_embed"
        inf.missing["input_size"] = f"{why} (the training latent size)"
        inf.missing["pe_interpolation"] = f"{why} (its interpolation)"
        return inf
    side = infer.grid_from_pos_embed(np.shape(state_dict[pos_key]), d, source)
    f["input_size"] = side * p
    candidates = (*infer.PE_INTERPOLATION_CANDIDATES, side * p / 64)
    found = infer.match_pe_interpolation(state_dict[pos_key], d, candidates)
    if len(found) == 1:
        f["pe_interpolation"] = found[0]
    elif not found:
        inf.missing["pe_interpolation"] = (
            f"the stored pos_embed matches no sin-cos table with pe_interpolation in {sorted(set(candidates))}"
        )
    else:
        inf.missing["pe_interpolation"] = f"the stored pos_embed fits several pe_interpolation values {found}"
    return inf


def _check_diffusers_config(c: Mapping[str, Any], source: str) -> None:
    expected = {
        "norm_type": "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "attention_type": "default",
    }
    for k, v in expected.items():
        if k in c and c[k] != v:
            raise ConversionError(f"{source}: config.json has {k}={c[k]!r}; a PixArt needs {v!r}")


def export_extras(config: PixArtConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Keys beyond the rule table: the original's fixed ``pos_embed`` buffer for its training grid."""
    if fmt != "original":
        return {}
    g = config.input_size // config.patch_size
    pos = sincos_pos_embed(
        g, g, config.hidden_size, base_size=config.grid_base_size, interpolation=config.pe_interpolation
    )
    return {"pos_embed": pos[None]}


def check_export(config: PixArtConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; warnings where its reference computes differently or drops weights."""
    if fmt == "diffusers" and config.kv_compress_layers:
        raise ConversionError(
            "diffusers' PixArtTransformer2DModel has no KV compression; export this model "
            f"(kv_compress_layers={config.kv_compress_layers}) with format='original'"
        )
    if config.timestep_freq_shift != 0.0:
        warnings.warn(
            f"exporting a PixArt with timestep_freq_shift={config.timestep_freq_shift}; PixArt references use 0",
            stacklevel=3,
        )
    if fmt != "diffusers":
        return
    if config.mlp_ratio != 4.0:
        raise ConversionError(f"diffusers' PixArtTransformer2DModel has mlp_ratio 4; this model has {config.mlp_ratio}")
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
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": config.hidden_size if config.caption_channels is not None else config.caption_width,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps,
        "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_conditions,
        "caption_channels": config.caption_channels,
        "attention_type": "default",
    }
