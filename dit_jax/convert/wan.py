"""Wan 2.1 conversion: Wan-AI ``original`` checkpoints (``diffusion_pytorch_model*.safetensors`` of the Wan2.1-T2V
repositories, ``WanModel`` keys) and diffusers ``WanTransformer3DModel`` (``diffusers``).

One-to-one key mapping (FAMILIES.md; diffusers' single-file Wan loader): ``patch_embedding`` ↔ ``patch_embedding``;
``text_embedding.0/2`` ↔ ``condition_embedder.text_embedder.linear_1/2``; ``time_embedding.0/2`` ↔
``condition_embedder.time_embedder.linear_1/2``; ``time_projection.1`` ↔ ``condition_embedder.time_proj``; per block
``self_attn``/``cross_attn`` ↔ ``attn1``/``attn2`` with ``q/k/v/o`` ↔ ``to_q/to_k/to_v/to_out.0`` and ``norm_q/norm_k``
alike, ``modulation`` ↔ ``scale_shift_table``, ``ffn.0/2`` ↔ ``ffn.net.0.proj/ffn.net.2``, and the cross-attention
LayerNorm ``norm3`` ↔ ``norm2`` (the two formats swap the names; the FFN norm has no parameters in either);
``head.head`` ↔ ``proj_out``, ``head.modulation`` ↔ ``scale_shift_table``. Tables keep their torch shapes (1, 6, D)
and (1, 2, D); the Conv3d weight (D, C, pt, p, p) is our kernel (pt, p, p, C, D).

Neither format stores the number of heads: diffusers' ``config.json`` does, otherwise head_dim 128 (every released
Wan model) is assumed. Image-to-video checkpoints (CLIP image embedding, ``k_img``/``v_img``) are refused.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dit_jax.convert import common, infer
from dit_jax.convert.rules import ConversionError, Rule, bias, dense, expand, linear, mlp, norm, rule
from dit_jax.models.wan import WanConfig

FAMILY = "wan"
CONFIG = WanConfig
DIFFUSERS_CLASS = "WanTransformer3DModel"
TORCH_WRAP: dict[str, str] = {}

_NAME = "Wan"
_HEAD_DIM = 128  # every released Wan 2.1/2.2 transformer
_THETA = 10000.0  # both references fix it
_QK_NORM = "rms_norm_across_heads"
_LATENT_SIDE, _LATENT_FRAMES = 60, 21  # WanConfig's default training clip: 480 px, 81 frames
# diffusers WanTransformer3DModel defaults (a config.json may omit any of them)
_DIFFUSERS_DEFAULTS = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": _QK_NORM,
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
# Per format: torch names of the parts below (block ``{i}``).
_NAMES = {
    "original": {
        "text": ("text_embedding", ("0", "2")),
        "time": ("time_embedding", ("0", "2")),
        "time_proj": "time_projection.1",
        "block": "blocks.{i}",
        "table": "modulation",
        "self": "self_attn",
        "cross": "cross_attn",
        "proj": {"q": "q", "k": "k", "v": "v", "o": "o"},
        "cross_norm": "norm3",
        "ffn": ("ffn.0", "ffn.2"),
        "head": "head.head",
        "head_table": "head.modulation",
    },
    "diffusers": {
        "text": ("condition_embedder.text_embedder", ("linear_1", "linear_2")),
        "time": ("condition_embedder.time_embedder", ("linear_1", "linear_2")),
        "time_proj": "condition_embedder.time_proj",
        "block": "blocks.{i}",
        "table": "scale_shift_table",
        "self": "attn1",
        "cross": "attn2",
        "proj": {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"},
        "cross_norm": "norm2",
        "ffn": ("ffn.net.0.proj", "ffn.net.2"),
        "head": "proj_out",
        "head_table": "scale_shift_table",
    },
}
# Keys only image-to-video (and other non-T2V) Wan checkpoints have, per format.
_UNSUPPORTED = {
    "original": ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.", "vace_", "motion_encoder.", "face_adapter."),
    "diffusers": ("image_embedder.", ".add_k_proj.", ".add_v_proj.", ".norm_added_k.", "vace_", "motion_encoder."),
}


def detect(keys: set[str]) -> str | None:
    """``"original"``/``"diffusers"`` if the keys are a Wan transformer's (``head.modulation``; ``condition_embedder.
    time_proj``), else None."""
    if "head.modulation" in keys:
        return "original"
    if "condition_embedder.time_proj.weight" in keys:
        return "diffusers"
    return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    """A diffusers ``config.json`` of a ``WanTransformer3DModel``."""
    return d.get("_class_name") == DIFFUSERS_CLASS


def ignored(fmt: str) -> Callable[[str], bool]:
    """Wan checkpoints hold no buffers (the RoPE tables are not persistent): nothing is dropped on import."""
    return lambda key: False


# ---- transforms ------------------------------------------------------------------------------------------------------


def _conv3d():
    """torch Conv3d weight (D, C, pt, p, p) ↔ kernel (pt, p, p, C, D)."""
    return (lambda w: w.transpose(2, 3, 4, 1, 0)), (lambda k: k.transpose(4, 3, 0, 1, 2))


def _table():
    """A stored modulation table (1, n, D) ↔ ours (n, D)."""
    return (lambda a: a.reshape(a.shape[1:])), (lambda a: a[None])


# ---- rule tables -------------------------------------------------------------------------------------------------


def _attention_rules(config: WanConfig, fmt: str, part: str) -> list[Rule]:
    n = _NAMES[fmt]
    hd = (config.num_heads, config.head_dim)
    t, f = f"{n['block']}.{n[part]}", f"blocks_{{i}}/{'self_attn' if part == 'self' else 'cross_attn'}"
    out = []
    for x in "qkv":
        out += dense(f"{t}.{n['proj'][x]}", f"{f}/{x}", linear(out_shape=hd), bias(hd))
    out += dense(f"{t}.{n['proj']['o']}", f"{f}/o", linear(in_shape=hd))
    if config.qk_norm:
        out += [rule(f"{t}.norm_q.weight", f"{f}/norm_q/scale"), rule(f"{t}.norm_k.weight", f"{f}/norm_k/scale")]
    return out


def _block_rules(config: WanConfig, fmt: str) -> list[Rule]:
    n = _NAMES[fmt]
    b = n["block"]
    out = [
        rule(f"{b}.{n['table']}", "blocks_{i}/scale_shift_table", _table()),
        *_attention_rules(config, fmt, "self"),
        *_attention_rules(config, fmt, "cross"),
        *dense(f"{b}.{n['ffn'][0]}", "blocks_{i}/ffn/fc1"),
        *dense(f"{b}.{n['ffn'][1]}", "blocks_{i}/ffn/fc2"),
    ]
    if config.cross_attn_norm:
        out += norm(f"{b}.{n['cross_norm']}", "blocks_{i}/cross_norm")
    return out


def rules(config: WanConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The expanded rule table for ``fmt`` and the number of ``{*}`` copies (always 1 for Wan)."""
    if fmt not in _NAMES:
        raise common.unknown_format(_NAME, fmt)
    n = _NAMES[fmt]
    text, time = n["text"], n["time"]
    table = [
        *dense("patch_embedding", "patch_embedding", _conv3d()),
        *[r for t, f in zip(text[1], ("fc1", "fc2")) for r in dense(f"{text[0]}.{t}", f"text_embedding/{f}")],
        *mlp(time[0], "time_embedding", time[1]),
        *dense(n["time_proj"], "time_projection"),
        *dense(n["head"], "head/linear"),
        rule(n["head_table"], "head/scale_shift_table", _table()),
    ]
    return expand(table + _block_rules(config, fmt), config.depth), 1


def check_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, depth: int, source: str) -> None:
    """Refuse image-to-video and other Wan variants by their extra keys (one error naming them)."""
    extra = sorted(k for k in state_dict if any(m in k for m in _UNSUPPORTED[fmt]))
    if extra:
        raise ConversionError(
            f"{source}: a Wan image-to-video (or VACE/Animate) checkpoint: only text-to-video Wan transformers are "
            f"supported; found {extra[:6]}{' …' if len(extra) > 6 else ''}"
        )


# ---- import: inference ---------------------------------------------------------------------------------------------


def _read_diffusers_config(c: Mapping[str, Any], inf: infer.Inference, source: str) -> None:
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in c.items() if k in _DIFFUSERS_DEFAULTS}}
    for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if cfg[k] is not None:
            raise ConversionError(
                f"{source}: config.json has {k}={cfg[k]!r}: an image-to-video Wan transformer; only text-to-video "
                "Wan transformers are supported"
            )
    pt, ph, pw = (int(v) for v in cfg["patch_size"])
    if ph != pw:
        raise ConversionError(f"{source}: config.json has patch_size={list(cfg['patch_size'])}; expected (pt, p, p)")
    heads = int(cfg["num_attention_heads"])
    cin = int(cfg["in_channels"])
    inf.fields.update(
        patch_size=ph,
        patch_size_t=pt,
        num_heads=heads,
        hidden_size=heads * int(cfg["attention_head_dim"]),
        in_channels=cin,
        out_channels=cin if cfg["out_channels"] is None else int(cfg["out_channels"]),
        text_dim=int(cfg["text_dim"]),
        freq_dim=int(cfg["freq_dim"]),
        ffn_dim=int(cfg["ffn_dim"]),
        depth=int(cfg["num_layers"]),
        cross_attn_norm=bool(cfg["cross_attn_norm"]),
        qk_norm=True,  # diffusers' WanAttention always normalises q and k, whatever config.json's qk_norm says
        eps=float(cfg["eps"]),
        rope_max_seq_len=int(cfg["rope_max_seq_len"]),
    )


def infer_config(
    state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str
) -> infer.Inference:
    """Architecture of a Wan checkpoint (keys/shapes, or the diffusers ``config.json``). The training clip size is not
    stored and no parameter depends on it; eps, theta and ``rope_max_seq_len`` take the released values."""
    inf = infer.Inference()
    f = inf.fields
    if fmt == "diffusers":
        f["theta"] = _THETA  # WanTransformer3DModel fixes it
    else:
        inf.soft.update(theta=_THETA, eps=1e-6, rope_max_seq_len=1024)
    if diffusers_config is not None:
        _read_diffusers_config(diffusers_config, inf, source)
    else:
        _infer_from_keys(state_dict, inf, fmt, source)
    # the default training clip (480 px, 81 frames), rounded down to whole patches
    p, pt = f["patch_size"], f["patch_size_t"]
    inf.soft.update(input_size=max(p, _LATENT_SIDE // p * p), input_frames=max(pt, _LATENT_FRAMES // pt * pt))
    return inf


def _infer_from_keys(state_dict: Mapping[str, np.ndarray], inf: infer.Inference, fmt: str, source: str) -> None:
    """Every stored dimension and switch from the keys and shapes; heads as a soft guess (head_dim 128)."""
    f = inf.fields
    n = _NAMES[fmt]
    d, cin, pt, ph, pw = infer.shape(state_dict, "patch_embedding.weight", source)
    if ph != pw:
        raise ConversionError(f"{source}: patch_embedding.weight has a {pt}x{ph}x{pw} kernel; expected (pt, p, p)")
    block0 = n["block"].format(i=0)
    out_features = infer.shape(state_dict, f"{n['head']}.weight", source)[0]
    volume = pt * ph * pw
    if out_features % volume:
        raise ConversionError(
            f"{source}: {n['head']}.weight has {out_features} outputs; expected a multiple of the patch volume {volume}"
        )
    f.update(
        hidden_size=d,
        in_channels=cin,
        patch_size=ph,
        patch_size_t=pt,
        out_channels=out_features // volume,
        text_dim=infer.shape(state_dict, f"{n['text'][0]}.{n['text'][1][0]}.weight", source)[1],
        freq_dim=infer.shape(state_dict, f"{n['time'][0]}.{n['time'][1][0]}.weight", source)[1],
        ffn_dim=infer.shape(state_dict, f"{block0}.{n['ffn'][0]}.weight", source)[0],
        depth=infer.depth_from(state_dict, f"{n['block'].replace('{i}', '{n}')}.{n['table']}", source),
        cross_attn_norm=f"{block0}.{n['cross_norm']}.weight" in state_dict,
        qk_norm=fmt == "diffusers" or f"{block0}.{n['self']}.norm_q.weight" in state_dict,
    )
    if d % _HEAD_DIM == 0:
        inf.soft["num_heads"] = d // _HEAD_DIM
    else:
        inf.missing["num_heads"] = (
            f"the number of heads is not stored in the checkpoint and the width {d} is not a multiple of the released "
            f"head_dim {_HEAD_DIM}"
        )


# ---- export --------------------------------------------------------------------------------------------------------


def export_extras(config: WanConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Wan checkpoints hold nothing beyond the rule table."""
    return {}


def check_export(config: WanConfig, fmt: str) -> None:
    """Errors for what diffusers' model cannot hold; a warning where the original format does not record a setting."""
    if fmt == "diffusers":
        problems = []
        if not config.qk_norm:
            problems.append("q/k RMSNorms (this model has qk_norm=False)")
        if config.theta != _THETA:
            problems.append(f"RoPE theta 10000 (this model has {config.theta})")
        if problems:
            raise ConversionError(f"diffusers' {DIFFUSERS_CLASS} has " + "; ".join(problems))
    elif fmt == "original" and (config.theta != _THETA or config.eps != 1e-6 or config.head_dim != _HEAD_DIM):
        warnings.warn(
            f"the original Wan format does not store the number of heads ({config.num_heads}), eps ({config.eps}) or "
            f"RoPE theta ({config.theta}); WanModel must be built with them (the released models use head_dim 128, "
            "eps 1e-6, theta 10000)",
            stacklevel=3,
        )


def diffusers_config(config: WanConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``WanTransformer3DModel`` (every field written out)."""
    p = config.patch_size
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": common.DIFFUSERS_VERSION,
        "patch_size": [config.patch_size_t, p, p],
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.depth,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": _QK_NORM,
        "eps": config.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": config.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }
