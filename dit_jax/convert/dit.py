"""DiT conversion: facebookresearch/DiT (``original``) and diffusers ``DiTTransformer2DModel`` (``diffusers``).

Key mapping as in MODELS.md §1.2–1.3. The two formats also differ in numerics (§1.4): an original checkpoint gets
``timestep_freq_shift=0, mlp_norm_eps=1e-6``, a diffusers one ``1`` and its ``norm_eps`` (1e-5 by default), so each
import reproduces its own reference. diffusers copies the timestep/label embedders into every block (``{*}``).
"""

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import infer
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, expand, linear, rule, stacked_bias, stacked_linear
from dit_jax.models.dit import DiTConfig
from dit_jax.nn.embeddings import sincos_pos_embed

FAMILY = "dit"
CONFIG = DiTConfig
DIFFUSERS_CLASS = "DiTTransformer2DModel"
DIFFUSERS_VERSION = "0.42.1"

_ORIGINAL_MARK = "y_embedder.embedding_table.weight"
_DIFFUSERS_MARK = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
_EMB = "transformer_blocks.{*}.norm1.emb"


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are a DiT's, else None."""
    if _ORIGINAL_MARK in keys:
        return "original"
    if _DIFFUSERS_MARK in keys:
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of a DiT (``DiTTransformer2DModel`` or ``Transformer2DModel`` + ada_norm_zero)."""
    name = d.get("_class_name")
    return name == DIFFUSERS_CLASS or (name == "Transformer2DModel" and d.get("norm_type") == "ada_norm_zero")


def rules(config: DiTConfig, fmt: str) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies."""
    h = config.num_heads
    dh = config.hidden_size // h
    if fmt == "original":
        table = [
            rule("x_embedder.proj.weight", "x_embedder/proj/kernel", conv()),
            rule("x_embedder.proj.bias", "x_embedder/proj/bias"),
            rule("t_embedder.mlp.0.weight", "t_embedder/linear_1/kernel", linear()),
            rule("t_embedder.mlp.0.bias", "t_embedder/linear_1/bias"),
            rule("t_embedder.mlp.2.weight", "t_embedder/linear_2/kernel", linear()),
            rule("t_embedder.mlp.2.bias", "t_embedder/linear_2/bias"),
            rule("y_embedder.embedding_table.weight", "y_embedder/embedding"),
            rule("blocks.{i}.attn.qkv.weight", "blocks_{i}/attn/qkv/kernel", linear(out_shape=(3, h, dh))),
            rule("blocks.{i}.attn.qkv.bias", "blocks_{i}/attn/qkv/bias", bias((3, h, dh))),
            rule("blocks.{i}.attn.proj.weight", "blocks_{i}/attn/proj/kernel", linear(in_shape=(h, dh))),
            rule("blocks.{i}.attn.proj.bias", "blocks_{i}/attn/proj/bias"),
            rule("blocks.{i}.mlp.fc1.weight", "blocks_{i}/mlp/fc1/kernel", linear()),
            rule("blocks.{i}.mlp.fc1.bias", "blocks_{i}/mlp/fc1/bias"),
            rule("blocks.{i}.mlp.fc2.weight", "blocks_{i}/mlp/fc2/kernel", linear()),
            rule("blocks.{i}.mlp.fc2.bias", "blocks_{i}/mlp/fc2/bias"),
            rule("blocks.{i}.adaLN_modulation.1.weight", "blocks_{i}/adaLN_modulation/linear/kernel", linear()),
            rule("blocks.{i}.adaLN_modulation.1.bias", "blocks_{i}/adaLN_modulation/linear/bias"),
            rule("final_layer.adaLN_modulation.1.weight", "final_layer/adaLN_modulation/linear/kernel", linear()),
            rule("final_layer.adaLN_modulation.1.bias", "final_layer/adaLN_modulation/linear/bias"),
            rule("final_layer.linear.weight", "final_layer/linear/kernel", linear()),
            rule("final_layer.linear.bias", "final_layer/linear/bias"),
        ]
        return expand(table, config.depth), 1
    if fmt == "diffusers":
        blk = "transformer_blocks.{i}"
        qkv = tuple(f"{blk}.attn1.to_{n}" for n in "qkv")
        table = [
            rule("pos_embed.proj.weight", "x_embedder/proj/kernel", conv()),
            rule("pos_embed.proj.bias", "x_embedder/proj/bias"),
            rule(f"{_EMB}.timestep_embedder.linear_1.weight", "t_embedder/linear_1/kernel", linear()),
            rule(f"{_EMB}.timestep_embedder.linear_1.bias", "t_embedder/linear_1/bias"),
            rule(f"{_EMB}.timestep_embedder.linear_2.weight", "t_embedder/linear_2/kernel", linear()),
            rule(f"{_EMB}.timestep_embedder.linear_2.bias", "t_embedder/linear_2/bias"),
            rule(f"{_EMB}.class_embedder.embedding_table.weight", "y_embedder/embedding"),
            rule(tuple(f"{k}.weight" for k in qkv), "blocks_{i}/attn/qkv/kernel", stacked_linear(3, (h, dh))),
            rule(tuple(f"{k}.bias" for k in qkv), "blocks_{i}/attn/qkv/bias", stacked_bias(3, (h, dh))),
            rule(f"{blk}.attn1.to_out.0.weight", "blocks_{i}/attn/proj/kernel", linear(in_shape=(h, dh))),
            rule(f"{blk}.attn1.to_out.0.bias", "blocks_{i}/attn/proj/bias"),
            rule(f"{blk}.ff.net.0.proj.weight", "blocks_{i}/mlp/fc1/kernel", linear()),
            rule(f"{blk}.ff.net.0.proj.bias", "blocks_{i}/mlp/fc1/bias"),
            rule(f"{blk}.ff.net.2.weight", "blocks_{i}/mlp/fc2/kernel", linear()),
            rule(f"{blk}.ff.net.2.bias", "blocks_{i}/mlp/fc2/bias"),
            rule(f"{blk}.norm1.linear.weight", "blocks_{i}/adaLN_modulation/linear/kernel", linear()),
            rule(f"{blk}.norm1.linear.bias", "blocks_{i}/adaLN_modulation/linear/bias"),
            rule("proj_out_1.weight", "final_layer/adaLN_modulation/linear/kernel", linear()),
            rule("proj_out_1.bias", "final_layer/adaLN_modulation/linear/bias"),
            rule("proj_out_2.weight", "final_layer/linear/kernel", linear()),
            rule("proj_out_2.bias", "final_layer/linear/bias"),
        ]
        return expand(table, config.depth), config.depth
    raise ValueError(f"unknown DiT checkpoint format {fmt!r}; expected 'original' or 'diffusers'")


def ignored(fmt: str):
    """Keys dropped on import: the fixed positional table (we compute it)."""
    return lambda key: key in ("pos_embed", "pos_embed.pos_embed")


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """diffusers keeps one embedder copy per block; we share one, so the copies must be identical."""
    if fmt != "diffusers":
        return
    for key in (k for k in state_dict if k.startswith("transformer_blocks.0.norm1.emb.")):
        for j in range(1, depth):
            other = key.replace("transformer_blocks.0.", f"transformer_blocks.{j}.", 1)
            if other in state_dict and not np.array_equal(state_dict[key], state_dict[other]):
                raise ConversionError(
                    f"{source}: {other} differs from {key}; this DiT shares one timestep/label embedder, so the "
                    "per-block copies of a diffusers checkpoint must be identical"
                )


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture and numerics of a DiT checkpoint (keys/shapes, or the diffusers ``config.json``)."""
    inf = infer.Inference()
    f = inf.fields
    keys = set(state_dict)
    if fmt == "diffusers":
        f.update(timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    else:
        f.update(timestep_freq_shift=0.0, mlp_norm_eps=1e-6)
    if diffusers_config is not None:
        c = diffusers_config
        _check_diffusers_config(c, source)
        f["num_heads"] = int(c.get("num_attention_heads", 16))
        f["hidden_size"] = f["num_heads"] * int(c.get("attention_head_dim", 72))
        f["in_channels"] = int(c.get("in_channels", 4))
        out = c.get("out_channels") or f["in_channels"]
        if out not in (f["in_channels"], 2 * f["in_channels"]):
            raise ConversionError(f"{source}: out_channels={out} is neither in_channels nor 2·in_channels")
        f["learn_sigma"] = out == 2 * f["in_channels"]
        f["depth"] = int(c.get("num_layers", 28))
        f["patch_size"] = int(c.get("patch_size", 2))
        f["input_size"] = int(c.get("sample_size", 32))
        f["num_classes"] = int(c.get("num_embeds_ada_norm", 1000))
        f["mlp_norm_eps"] = float(c.get("norm_eps", 1e-5))
        return inf
    pre = "pos_embed" if fmt == "diffusers" else "x_embedder"
    d, cin, p, _ = infer.shape(state_dict, f"{pre}.proj.weight", source)
    f.update(hidden_size=d, in_channels=cin, patch_size=p)
    if fmt == "original":
        f["depth"] = infer.depth_from(keys, "blocks.{n}.adaLN_modulation.1.weight", source)
        classes = infer.shape(state_dict, _ORIGINAL_MARK, source)[0]
        fc1 = infer.shape(state_dict, "blocks.0.mlp.fc1.weight", source)[0]
        final = infer.shape(state_dict, "final_layer.linear.weight", source)[0]
    else:
        f["depth"] = infer.depth_from(keys, "transformer_blocks.{n}.norm1.linear.weight", source)
        classes = infer.shape(state_dict, _DIFFUSERS_MARK, source)[0]
        fc1 = infer.shape(state_dict, "transformer_blocks.0.ff.net.0.proj.weight", source)[0]
        final = infer.shape(state_dict, "proj_out_2.weight", source)[0]
    f["num_classes"] = classes - 1
    f["mlp_ratio"] = fc1 / d
    f["learn_sigma"] = infer.out_channels(final, p, cin, source)
    infer.heads(d, inf)
    pos_key = next((k for k in ("pos_embed", "pos_embed.pos_embed") if k in state_dict), None)
    if pos_key is not None:
        side = infer.grid_from_pos_embed(np.shape(state_dict[pos_key]), d, source)
        f["input_size"] = side * p
        found = infer.match_pe_interpolation(state_dict[pos_key], d, infer.PE_INTERPOLATION_CANDIDATES)
        if 1.0 in found or len(found) == 1:  # the original's table is interpolation 1; a 1×1 grid fits any
            f["pe_interpolation"] = 1.0 if 1.0 in found else found[0]
        else:
            inf.missing["pe_interpolation"] = "the stored pos_embed is not a sin-cos table of its grid"
    else:
        inf.missing["input_size"] = "the checkpoint stores no pos_embed (the training latent size)"
    return inf


def _check_diffusers_config(c: Mapping[str, Any], source: str) -> None:
    expected = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for k, v in expected.items():
        if k in c and c[k] != v:
            raise ConversionError(f"{source}: config.json has {k}={c[k]!r}; a DiT needs {v!r}")


def export_extras(config: DiTConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Keys beyond the rule table: the original loads strictly, so it gets its fixed ``pos_embed``."""
    if fmt != "original":
        return {}
    g = config.base_size
    pos = sincos_pos_embed(g, g, config.hidden_size, base_size=g, interpolation=config.pe_interpolation)
    return {"pos_embed": pos[None]}


def check_export(config: DiTConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; warnings where its reference computes differently."""
    if fmt == "diffusers":
        if config.mlp_ratio != 4.0:
            raise ConversionError(
                f"diffusers' DiTTransformer2DModel has mlp_ratio 4; this model has {config.mlp_ratio}"
            )
        if config.timestep_freq_shift != 1.0:
            warnings.warn(
                f"exporting a DiT with timestep_freq_shift={config.timestep_freq_shift} (original numerics) to "
                "diffusers, whose DiTTransformer2DModel always uses downscale_freq_shift=1: outputs will differ",
                stacklevel=3,
            )
    elif config.timestep_freq_shift != 0.0 or config.mlp_norm_eps != 1e-6:
        warnings.warn(
            f"exporting a DiT with timestep_freq_shift={config.timestep_freq_shift}, mlp_norm_eps="
            f"{config.mlp_norm_eps} (diffusers numerics) to the original format, which uses 0 and 1e-6: outputs "
            "will differ",
            stacklevel=3,
        )


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``DiTTransformer2DModel``."""
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
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": config.mlp_norm_eps,
    }
