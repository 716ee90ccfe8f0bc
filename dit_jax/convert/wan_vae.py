"""Wan VAE conversion: diffusers ``AutoencoderKLWan`` and original Wan (``Wan2.1_VAE.pth``) key tables, config.json.

Diffusers keys mirror our paths (``encoder.down_blocks.{n}.conv1``, ``decoder.up_blocks.{i}.upsamplers.0.time_conv``).
The original Wan code names the same modules by position: ``encoder.conv1``, ``encoder.downsamples.{n}`` (the same
flat list as diffusers' ``down_blocks``), ``{encoder,decoder}.middle.{0,1,2}`` (resnet, attention, resnet),
``{encoder,decoder}.head.{0,2}`` (norm, conv), ``decoder.upsamples.{n}`` (one flat list: per level its resnets,
then its upsampler), ``conv1``/``conv2`` (quant/post-quant convs); inside a residual block ``residual.0`` (norm1),
``residual.2`` (conv1), ``residual.3`` (norm2), ``residual.6`` (conv2), ``shortcut``. Layouts: causal Conv3d
(O, I, t, h, w) ↔ (t, h, w, I, O); resampling Conv2d (O, I, h, w) ↔ (h, w, I, O); RMS norm ``gamma`` (C, 1, 1[, 1])
↔ scale (C,); the attention 1×1 convs (O, I, 1, 1) ↔ Dense (I, O). One table per format serves import and export.

The original decoder also puts attention blocks after its up-block resnets where ``attn_scales`` says so; diffusers
(whose numerics ``dit_jax.encoders.wan_vae`` follows) has none there. Every released Wan 2.1 VAE has
``attn_scales=[]``; the original format is refused for other configs.
"""

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import expected_shapes
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, export, import_, rule
from dit_jax.encoders.wan_vae import PRESETS, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAEConfig

FORMATS = ("diffusers", "original")
_expected_shapes = functools.cache(expected_shapes)  # configs are hashable; tracing the model once per config
_KEYS = {  # per format: names that differ (diffusers ↔ original)
    "diffusers": dict(norm1="norm1", conv1="conv1", norm2="norm2", conv2="conv2", shortcut="conv_shortcut"),
    "original": dict(
        norm1="residual.0", conv1="residual.2", norm2="residual.3", conv2="residual.6", shortcut="shortcut"
    ),
}


# ---- transforms and small tables ------------------------------------------------------------------------------


def _conv3d():
    """torch Conv3d weight (O, I, t, h, w) ↔ (t, h, w, I, O)."""
    return (lambda w: w.transpose(2, 3, 4, 1, 0)), (lambda k: k.transpose(4, 3, 0, 1, 2))


def _gamma(ndim: int):
    """RMS norm gamma (C, 1, …) with ``ndim`` axes ↔ scale (C,)."""
    return (lambda g: g.reshape(-1)), (lambda s: s.reshape((-1,) + (1,) * (ndim - 1)))


def _pointwise():
    """1×1 Conv2d weight (O, I, 1, 1) ↔ Dense kernel (I, O)."""
    return (lambda w: w[:, :, 0, 0].T), (lambda k: k.T[:, :, None, None])


def _conv(t: str, f: str) -> list[Rule]:
    return [rule(f"{t}.weight", f"{f}/kernel", _conv3d()), rule(f"{t}.bias", f"{f}/bias", bias())]


def _resnet(t: str, f: str, shortcut: bool, fmt: str) -> list[Rule]:
    k = _KEYS[fmt]
    rules = [rule(f"{t}.{k['norm1']}.gamma", f"{f}/norm1/scale", _gamma(4))]
    rules += _conv(f"{t}.{k['conv1']}", f"{f}/conv1")
    rules += [rule(f"{t}.{k['norm2']}.gamma", f"{f}/norm2/scale", _gamma(4))]
    rules += _conv(f"{t}.{k['conv2']}", f"{f}/conv2")
    if shortcut:
        rules += _conv(f"{t}.{k['shortcut']}", f"{f}/conv_shortcut")
    return rules


def _attention(t: str, f: str) -> list[Rule]:
    rules = [rule(f"{t}.norm.gamma", f"{f}/norm/scale", _gamma(3))]
    for name in ("to_qkv", "proj"):
        rules += [
            rule(f"{t}.{name}.weight", f"{f}/{name}/kernel", _pointwise()),
            rule(f"{t}.{name}.bias", f"{f}/{name}/bias"),
        ]
    return rules


def _resample(t: str, f: str, temporal: bool) -> list[Rule]:
    rules = [
        rule(f"{t}.resample.1.weight", f"{f}/resample/kernel", conv()),
        rule(f"{t}.resample.1.bias", f"{f}/resample/bias"),
    ]
    return rules + (_conv(f"{t}.time_conv", f"{f}/time_conv") if temporal else [])


def _mid(t: str, f: str, fmt: str) -> list[Rule]:
    names = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
    if fmt == "original":
        names = ("middle.0", "middle.1", "middle.2")
    rules = _resnet(f"{t}.{names[0]}", f"{f}/mid_block/resnets_0", False, fmt)
    rules += _attention(f"{t}.{names[1]}", f"{f}/mid_block/attentions_0")
    return rules + _resnet(f"{t}.{names[2]}", f"{f}/mid_block/resnets_1", False, fmt)


def _head(t: str, f: str, fmt: str) -> list[Rule]:
    norm, out = ("norm_out", "conv_out") if fmt == "diffusers" else ("head.0", "head.2")
    return [rule(f"{t}.{norm}.gamma", f"{f}/norm_out/scale", _gamma(4))] + _conv(f"{t}.{out}", f"{f}/conv_out")


def _check_format(config: WanVAEConfig, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown Wan VAE key format {fmt!r}; expected one of {FORMATS}")
    if fmt == "original" and config.attn_scales:
        raise ConversionError(
            f"the original Wan VAE format is supported for attn_scales=() only (got {config.attn_scales}): the "
            "original decoder adds attention blocks that diffusers' AutoencoderKLWan (and this port) lacks"
        )


def wan_vae_rules(config: WanVAEConfig, format: str = "diffusers") -> list[Rule]:
    """The conversion table (torch key ↔ Flax path) of ``config`` in ``format`` (``diffusers`` or ``original``)."""
    _check_format(config, format)
    d = format == "diffusers"
    rules = _conv("encoder.conv_in" if d else "encoder.conv1", "encoder/conv_in")
    down = "encoder.down_blocks" if d else "encoder.downsamples"
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    n, scale, last = 0, 1.0, len(config.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims, dims[1:])):
        for _ in range(config.num_res_blocks):
            rules += _resnet(f"{down}.{n}", f"encoder/down_blocks_{n}", in_dim != out_dim, format)
            in_dim, n = out_dim, n + 1
            if scale in config.attn_scales:
                rules += _attention(f"{down}.{n}", f"encoder/down_blocks_{n}")
                n += 1
        if i < last:
            rules += _resample(f"{down}.{n}", f"encoder/down_blocks_{n}", config.temporal_downsample[i])
            n, scale = n + 1, scale / 2
    rules += _mid("encoder", "encoder", format) + _head("encoder", "encoder", format)
    rules += _conv("quant_conv" if d else "conv1", "quant_conv") + _conv(
        "post_quant_conv" if d else "conv2", "post_quant_conv"
    )

    base = config.decoder_base_dim or config.base_dim
    dims = [base * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
    temporal_up = tuple(reversed(config.temporal_downsample))
    rules += _conv("decoder.conv_in" if d else "decoder.conv1", "decoder/conv_in") + _mid("decoder", "decoder", format)
    n = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims, dims[1:])):
        in_dim = in_dim // 2 if i > 0 else in_dim
        for j in range(config.num_res_blocks + 1):
            t = f"decoder.up_blocks.{i}.resnets.{j}" if d else f"decoder.upsamples.{n}"
            rules += _resnet(t, f"decoder/up_blocks_{i}/resnets_{j}", in_dim != out_dim, format)
            in_dim, n = out_dim, n + 1
        if i < last:
            t = f"decoder.up_blocks.{i}.upsamplers.0" if d else f"decoder.upsamples.{n}"
            rules += _resample(t, f"decoder/up_blocks_{i}/upsampler", temporal_up[i])
            n += 1
    return rules + _head("decoder", "decoder", format)


# ---- key format, config ---------------------------------------------------------------------------------------

_MARKS = {"original": "decoder.middle.0.residual.0.gamma", "diffusers": "decoder.mid_block.resnets.0.norm1.gamma"}


def detect_format(keys) -> str:
    """``diffusers`` or ``original`` from the key names."""
    keys = set(keys)
    for fmt, mark in _MARKS.items():
        if mark in keys:
            return fmt
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise ConversionError(
        f"not a Wan VAE state dict: found neither {_MARKS['diffusers']!r} (diffusers) nor {_MARKS['original']!r} "
        f"(original Wan); first keys: {sample}"
    )


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the Wan VAE config: key {key!r} is missing")
    return tuple(np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], format: str | None = None, **overrides: Any) -> WanVAEConfig:
    """A ``WanVAEConfig`` from key names and shapes. ``latents_mean``/``latents_std`` are not in the weights: a
    16-channel VAE gets Wan 2.1's (diffusers' defaults), any other must pass them; ``preset=`` supplies defaults."""
    fmt = format or detect_format(state_dict)
    d = fmt == "diffusers"
    down = "encoder.down_blocks" if d else "encoder.downsamples"
    pattern = re.compile(rf"{re.escape(down)}\.(\d+)\.")
    count = 1 + max((int(m.group(1)) for k in state_dict if (m := pattern.match(k))), default=-1)
    if not count:
        raise ConversionError(f"cannot infer the Wan VAE config: no {down}.* keys")
    base = _shape(state_dict, f"encoder.{'conv_in' if d else 'conv1'}.weight")
    conv1 = "conv1" if d else "residual.2"
    widths, blocks, temporal, attn, level_blocks, scale, width = [], [], [], [], 0, 1.0, base[0]
    for n in range(count):
        b = f"{down}.{n}"
        if f"{b}.{conv1}.weight" in state_dict:
            width, level_blocks = _shape(state_dict, f"{b}.{conv1}.weight")[0], level_blocks + 1
        elif f"{b}.to_qkv.weight" in state_dict:
            attn.append(scale)
        elif f"{b}.resample.1.weight" in state_dict:
            widths.append(width)
            blocks.append(level_blocks)
            temporal.append(f"{b}.time_conv.weight" in state_dict)
            level_blocks, scale = 0, scale / 2
        else:
            raise ConversionError(
                f"cannot infer the Wan VAE config: {b}.* is neither a residual, attention nor resample block"
            )
    widths.append(width)
    blocks.append(level_blocks)
    if len(set(blocks)) != 1:
        raise ConversionError(f"cannot infer the Wan VAE config: levels have {blocks} residual blocks; expected equal")
    dim = base[0]
    if any(w % dim for w in widths):
        raise ConversionError(f"cannot infer the Wan VAE config: widths {widths} are not multiples of base_dim={dim}")
    dim_mult = tuple(w // dim for w in widths)
    dec_width = _shape(state_dict, f"decoder.{'conv_out' if d else 'head.2'}.weight")
    z_dim = _shape(state_dict, f"{'post_quant_conv' if d else 'conv2'}.weight")[0]
    fields: dict[str, Any] = {}
    if (preset := overrides.pop("preset", None)) is not None:
        fields.update(PRESETS[_preset_name(preset)].to_dict())
        fields.pop("family")
    fields.update(
        base_dim=dim,
        decoder_base_dim=None if dec_width[1] == dim * dim_mult[0] else dec_width[1] // dim_mult[0],
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=blocks[0],
        attn_scales=tuple(sorted(set(attn), reverse=True)),
        temporal_downsample=tuple(temporal),
        in_channels=base[1],
        out_channels=dec_width[0],
    )
    if "latents_mean" not in fields or len(fields["latents_mean"]) != z_dim:
        fields.update(_default_stats(z_dim, overrides))
    return WanVAEConfig.from_dict({**fields, **overrides})


def _default_stats(z_dim: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if z_dim == len(WAN21_LATENTS_MEAN):
        return {"latents_mean": WAN21_LATENTS_MEAN, "latents_std": WAN21_LATENTS_STD}
    absent = [k for k in ("latents_mean", "latents_std") if k not in overrides]
    if absent:
        raise ConversionError(
            f"cannot infer {' and '.join(absent)} of a {z_dim}-channel Wan VAE from its weights; pass "
            f"{', '.join(f'{k}=...' for k in absent)} ({z_dim} values each)"
        )
    return {}


def _preset_name(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown Wan VAE preset {name!r}; known presets: {sorted(PRESETS)}")
    return name


def config_from_diffusers(d: Mapping[str, Any], **overrides: Any) -> WanVAEConfig:
    """A ``WanVAEConfig`` from a diffusers ``AutoencoderKLWan`` ``config.json`` dict (``_``-keys ignored)."""
    cls = d.get("_class_name", "AutoencoderKLWan")
    if cls != "AutoencoderKLWan":
        raise ConversionError(f"config.json describes a {cls!r}, not an AutoencoderKLWan")
    if d.get("is_residual", False):
        raise ConversionError("config.json: is_residual=True (the Wan 2.2 VAE) is not supported; expected False")
    if d.get("patch_size") is not None:
        raise ConversionError(f"config.json: patch_size={d['patch_size']} (the Wan 2.2 VAE) is not supported")
    default = WanVAEConfig()
    fields = dict(
        base_dim=int(d.get("base_dim", default.base_dim)),
        decoder_base_dim=d.get("decoder_base_dim"),
        z_dim=int(d.get("z_dim", default.z_dim)),
        dim_mult=tuple(d.get("dim_mult", default.dim_mult)),
        num_res_blocks=int(d.get("num_res_blocks", default.num_res_blocks)),
        attn_scales=tuple(float(s) for s in d.get("attn_scales", ())),
        temporal_downsample=tuple(bool(t) for t in d.get("temperal_downsample", default.temporal_downsample)),
        dropout=float(d.get("dropout", 0.0)),
        latents_mean=tuple(float(v) for v in d.get("latents_mean", default.latents_mean)),
        latents_std=tuple(float(v) for v in d.get("latents_std", default.latents_std)),
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
    )
    return WanVAEConfig(**{**fields, **overrides})


def config_to_diffusers(config: WanVAEConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKLWan`` ``config.json`` dict of ``config``."""
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": config.base_dim,
        "decoder_base_dim": config.decoder_base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": list(config.attn_scales),
        "temperal_downsample": list(config.temporal_downsample),
        "dropout": config.dropout,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
        "is_residual": False,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "patch_size": None,
        "scale_factor_temporal": config.temporal_factor,
        "scale_factor_spatial": config.spatial_factor,
    }


# ---- public entry points ---------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """A weights file, a diffusers ``AutoencoderKLWan`` folder, or a pipeline folder with ``vae/``."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"
    if path.is_dir() and not (path / "config.json").exists():
        raise ConversionError(f"{path}: no config.json (nor vae/config.json); not a diffusers Wan VAE folder")
    return io.read_checkpoint(path)


def wan_vae_from_torch(
    source: str | os.PathLike | Mapping[str, Any], *, config: WanVAEConfig | None = None, **overrides: Any
) -> tuple[WanVAEConfig, dict[str, Any]]:
    """Import a Wan VAE → ``(WanVAEConfig, float32 params)``.

    ``source``: a diffusers folder (``config.json`` + weights, or a pipeline folder's ``vae/``), one
    ``.safetensors``/``.pth`` file (e.g. the original ``Wan2.1_VAE.pth``), or a state dict; diffusers or original
    keys. The config is ``config`` if given, else the folder's config.json, else inferred from the weights;
    ``overrides`` (config fields, or ``preset="Wan2.1-VAE"``) win. Every missing, unexpected or mis-shaped key is
    reported in one ``ConversionError``.
    """
    name, diffusers_cfg = "state dict", None
    if isinstance(source, Mapping):
        sd = {k: io.to_float32(v) for k, v in source.items()}
    else:
        sd, diffusers_cfg, name = _read(Path(source))
    fmt = detect_format(sd)
    if config is None:
        if diffusers_cfg is not None:
            if "preset" in overrides:  # config.json tells every field; its absent keys default to Wan 2.1's anyway
                _preset_name(overrides.pop("preset"))
            config = config_from_diffusers(diffusers_cfg, **overrides)
        else:
            config = infer_config(sd, fmt, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    params = import_(wan_vae_rules(config, fmt), sd, expected=_expected_shapes(config), source=f"{name} ({fmt} keys)")
    return config, params


def wan_vae_to_torch(
    config: WanVAEConfig, params: Mapping[str, Any], format: str = "diffusers"
) -> dict[str, np.ndarray]:
    """Export params to a torch state dict (numpy) with ``diffusers`` or ``original`` keys."""
    return export(wan_vae_rules(config, format), params)


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch`` for every family) -------------------

FAMILY = "wan_vae"
CONFIG = WanVAEConfig
DIFFUSERS_CLASS = "AutoencoderKLWan"
TORCH_WRAP: dict[str, str] = {}


def detect(keys) -> str | None:
    """``"original"`` / ``"diffusers"`` for a Wan VAE state dict, else None."""
    keys = set(keys)
    return next((fmt for fmt, mark in _MARKS.items() if mark in keys), None)


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    return d.get("_class_name") == DIFFUSERS_CLASS


def import_checkpoint(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str, **overrides: Any
) -> tuple[WanVAEConfig, dict[str, Any]]:
    """``convert.from_torch`` of a Wan VAE: the config from ``config.json`` when there is one, else the weights."""
    config = None
    if diffusers_config is not None:
        if "preset" in overrides:  # config.json tells every field
            _preset_name(overrides.pop("preset"))
        config = config_from_diffusers(diffusers_config, **overrides)
        overrides = {}
    return wan_vae_from_torch(state_dict, config=config, **overrides)


def export_checkpoint(config: WanVAEConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """``convert.to_torch`` of a Wan VAE: original Wan keys for ``"original"``, diffusers keys for ``"diffusers"``."""
    return wan_vae_to_torch(config, params, fmt)


diffusers_config = config_to_diffusers
