"""AutoencoderKL conversion: diffusers and LDM/original key tables, format detection, config inference.

Two key formats (MODELS.md §6): diffusers (``encoder.down_blocks.0.resnets.1.conv2``) and LDM, used by the original
latent-diffusion/SD/SGM code, BFL's ``ae.safetensors`` and single-file SD/SDXL/SD3 checkpoints under the prefix
``first_stage_model.`` (or ``vae.``): ``down.{i}.block.{j}``, ``mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}``
(1×1 convs ↔ linear), ``nin_shortcut``, ``norm_out``, and decoder ``up.{k}`` ↔ ``up_blocks.{n−1−k}`` (reversed).
One table per format serves import and export (``dit_jax.convert.rules``), so round trips are bit-exact.
"""

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert import io
from dit_jax.convert.api import expected_shapes
from dit_jax.convert.rules import ConversionError, Rule, bias, conv, export, import_, linear, rule
from dit_jax.encoders.vae import PRESETS, VAEConfig

FORMATS = ("diffusers", "ldm")
PREFIXES = ("first_stage_model.", "vae.")
_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# config fields that weights cannot tell; taken from a preset (or the caller)
_NON_WEIGHT_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size", "force_upcast")


# ---- rule tables ----------------------------------------------------------------------------------------------


def _conv1x1_linear():
    """LDM attention 1×1 conv weight (O, I, 1, 1) ↔ Dense kernel (I, O)."""
    return (lambda w: w[:, :, 0, 0].T), (lambda k: k.T[:, :, None, None])


def _conv(t: str, f: str) -> list[Rule]:
    return [rule(f"{t}.weight", f"{f}/kernel", conv()), rule(f"{t}.bias", f"{f}/bias", bias())]


def _norm(t: str, f: str) -> list[Rule]:
    return [rule(f"{t}.weight", f"{f}/scale"), rule(f"{t}.bias", f"{f}/bias")]


def _linear(t: str, f: str, fmt: str) -> list[Rule]:
    w = linear() if fmt == "diffusers" else _conv1x1_linear()
    return [rule(f"{t}.weight", f"{f}/kernel", w), rule(f"{t}.bias", f"{f}/bias", bias())]


def _resnet(t: str, f: str, shortcut: bool, fmt: str) -> list[Rule]:
    rules = _norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1")
    rules += _norm(f"{t}.norm2", f"{f}/norm2") + _conv(f"{t}.conv2", f"{f}/conv2")
    if shortcut:
        rules += _conv(f"{t}.{'conv_shortcut' if fmt == 'diffusers' else 'nin_shortcut'}", f"{f}/conv_shortcut")
    return rules


def _mid(t: str, f: str, attention: bool, fmt: str) -> list[Rule]:
    d = fmt == "diffusers"
    rules = _resnet(f"{t}.{'mid_block.resnets.0' if d else 'mid.block_1'}", f"{f}/mid_block/resnets_0", False, fmt)
    if attention:
        a, fa = f"{t}.{'mid_block.attentions.0' if d else 'mid.attn_1'}", f"{f}/mid_block/attentions_0"
        rules += _norm(f"{a}.{'group_norm' if d else 'norm'}", f"{fa}/group_norm")
        for tn, fn in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            rules += _linear(f"{a}.{tn if d else fn}", f"{fa}/{tn.replace('.0', '')}", fmt)
    rules += _resnet(f"{t}.{'mid_block.resnets.1' if d else 'mid.block_2'}", f"{f}/mid_block/resnets_1", False, fmt)
    return rules


def vae_rules(config: VAEConfig, format: str = "diffusers") -> list[Rule]:
    """The conversion table (torch key ↔ Flax path) of ``config`` in ``format`` (``diffusers`` or ``ldm``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown VAE key format {format!r}; expected one of {FORMATS}")
    d = format == "diffusers"
    widths, n, layers = config.block_out_channels, len(config.block_out_channels), config.layers_per_block
    attn = config.mid_block_add_attention
    rules = _conv("encoder.conv_in", "encoder/conv_in")
    prev = widths[0]
    for i, ch in enumerate(widths):
        block = f"encoder.down_blocks.{i}" if d else f"encoder.down.{i}"
        for j in range(layers):
            t = f"{block}.resnets.{j}" if d else f"{block}.block.{j}"
            rules += _resnet(t, f"encoder/down_blocks_{i}/resnets_{j}", j == 0 and prev != ch, format)
        if i < n - 1:
            t = f"{block}.downsamplers.0.conv" if d else f"{block}.downsample.conv"
            rules += _conv(t, f"encoder/down_blocks_{i}/downsample")
        prev = ch
    rules += _mid("encoder", "encoder", attn, format)
    rules += _norm(f"encoder.{'conv_norm_out' if d else 'norm_out'}", "encoder/conv_norm_out")
    rules += _conv("encoder.conv_out", "encoder/conv_out")

    rev = tuple(reversed(widths))
    rules += _conv("decoder.conv_in", "decoder/conv_in")
    rules += _mid("decoder", "decoder", attn, format)
    prev = rev[0]
    for i, ch in enumerate(rev):
        block = f"decoder.up_blocks.{i}" if d else f"decoder.up.{n - 1 - i}"  # LDM numbers up blocks bottom-up
        for j in range(layers + 1):
            t = f"{block}.resnets.{j}" if d else f"{block}.block.{j}"
            rules += _resnet(t, f"decoder/up_blocks_{i}/resnets_{j}", j == 0 and prev != ch, format)
        if i < n - 1:
            t = f"{block}.upsamplers.0.conv" if d else f"{block}.upsample.conv"
            rules += _conv(t, f"decoder/up_blocks_{i}/upsample")
        prev = ch
    rules += _norm(f"decoder.{'conv_norm_out' if d else 'norm_out'}", "decoder/conv_norm_out")
    rules += _conv("decoder.conv_out", "decoder/conv_out")
    if config.use_quant_conv:
        rules += _conv("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        rules += _conv("post_quant_conv", "post_quant_conv")
    return rules


# ---- key format, prefixes, config ------------------------------------------------------------------------------


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The VAE's keys of a state dict: the ``first_stage_model.``/``vae.`` subset (prefix removed) when present
    (other keys of a full checkpoint are dropped), else the whole dict."""
    for p in PREFIXES:
        sub = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
        if any(k.startswith(_ROOTS) for k in sub):
            return sub
    return dict(state_dict)


def detect_format(keys) -> str:
    """``diffusers`` or ``ldm`` from the key names (prefixes already stripped)."""
    keys = list(keys)
    if any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in keys):
        return "diffusers"
    if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in keys):
        return "ldm"
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise ConversionError(
        "not an AutoencoderKL state dict: found neither diffusers (encoder.down_blocks.*) nor LDM (encoder.down.*) "
        f"keys; first keys: {sample}"
    )


def _guess_preset(full_keys, latent_channels: int) -> tuple[str, bool]:
    """(preset name, certain?) for the fields weights cannot tell, from the rest of a full checkpoint."""
    if any(".joint_blocks." in k for k in full_keys):
        return "sd3", True
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in full_keys):
        return "flux", True
    if any(k.startswith("conditioner.embedders.1.") for k in full_keys):
        return "sdxl", True
    if any(k.startswith("cond_stage_model.") for k in full_keys):
        return "sd", True
    return ("sd" if latent_channels == 4 else "flux"), False


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the VAE config: key {key!r} is missing")
    return tuple(np.shape(sd[key]))


def infer_config(state_dict: Mapping[str, Any], format: str | None = None, **overrides: Any) -> VAEConfig:
    """A ``VAEConfig`` from key names and shapes (prefix-stripped state dict). ``norm_num_groups`` (default 32, as
    in every released VAE), the scaling/shift factors and ``sample_size`` are not in the weights: pass them as
    ``overrides``, or they come from ``preset=...`` (an override naming a preset in ``PRESETS``)."""
    fmt = format or detect_format(state_dict)
    d = fmt == "diffusers"
    pattern = re.compile(
        r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." if d else r"encoder\.down\.(\d+)\.block\.(\d+)\."
    )
    found = [tuple(map(int, m.groups())) for k in state_dict if (m := pattern.match(k))]
    if not found:
        raise ConversionError("cannot infer the VAE config: no encoder down-block resnet keys")
    n = 1 + max(i for i, _ in found)
    layers = 1 + max(j for i, j in found if i == 0)
    block = (lambda i: f"encoder.down_blocks.{i}.resnets.0") if d else (lambda i: f"encoder.down.{i}.block.0")
    widths = tuple(_shape(state_dict, f"{block(i)}.conv1.weight")[0] for i in range(n))
    attn = "encoder.mid_block.attentions.0.to_q.weight" if d else "encoder.mid.attn_1.q.weight"
    arch = dict(
        block_out_channels=widths,
        layers_per_block=layers,
        in_channels=_shape(state_dict, "encoder.conv_in.weight")[1],
        out_channels=_shape(state_dict, "decoder.conv_out.weight")[0],
        latent_channels=_shape(state_dict, "decoder.conv_in.weight")[1],
        use_quant_conv="quant_conv.weight" in state_dict,
        use_post_quant_conv="post_quant_conv.weight" in state_dict,
        mid_block_add_attention=attn in state_dict,
    )
    base = _preset_fields(overrides.pop("preset", None))
    return VAEConfig(**{**base, **arch, **overrides})


def _preset_fields(name: str | None) -> dict[str, Any]:
    """The fields weights cannot tell (factors, sample size) of preset ``name``; {} for None."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known presets: {sorted(PRESETS)}")
    return {f: getattr(PRESETS[name], f) for f in _NON_WEIGHT_FIELDS}


def config_from_diffusers(d: Mapping[str, Any], **overrides: Any) -> VAEConfig:
    """A ``VAEConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` dict (unknown ``_``-keys ignored)."""
    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ConversionError(f"config.json describes a {cls!r}, not an AutoencoderKL")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in d.get(key, [want]) if t != want]
        if bad:
            raise ConversionError(f"config.json {key}={d[key]} is not supported: expected only {want!r}")
    fields = dict(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        block_out_channels=tuple(d.get("block_out_channels", (64,))),
        layers_per_block=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4),
        norm_num_groups=d.get("norm_num_groups", 32),
        act_fn=d.get("act_fn", "silu"),
        mid_block_add_attention=d.get("mid_block_add_attention", True),
        use_quant_conv=d.get("use_quant_conv", True),
        use_post_quant_conv=d.get("use_post_quant_conv", True),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=float(d.get("shift_factor") or 0.0),
        latents_mean=None if d.get("latents_mean") is None else tuple(map(float, d["latents_mean"])),
        latents_std=None if d.get("latents_std") is None else tuple(map(float, d["latents_std"])),
        sample_size=int(d.get("sample_size", 32)),
        force_upcast=bool(d.get("force_upcast", True)),
    )
    if len(fields["block_out_channels"]) != len(d.get("down_block_types", fields["block_out_channels"])):
        raise ConversionError(
            f"config.json: {len(d['down_block_types'])} down_block_types for block_out_channels "
            f"{fields['block_out_channels']}"
        )
    return VAEConfig(**{**fields, **overrides})


def config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` ``config.json`` dict of ``config``."""
    n = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": config.act_fn,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor or None,
        "latents_mean": None if config.latents_mean is None else list(config.latents_mean),
        "latents_std": None if config.latents_std is None else list(config.latents_std),
        "force_upcast": config.force_upcast,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


# ---- reading --------------------------------------------------------------------------------------------------


def _read_folder(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """A diffusers ``AutoencoderKL`` folder (config.json + weights) or a pipeline folder with ``vae/``."""
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    if not (folder / "config.json").exists():
        raise ConversionError(f"{folder}: no config.json (nor vae/config.json); not a diffusers VAE folder")
    sd, cfg, name = io.read_checkpoint(folder)
    return sd, cfg, name


# ---- public entry points ---------------------------------------------------------------------------------------


def vae_from_torch(
    source: str | os.PathLike | Mapping[str, Any], *, config: VAEConfig | None = None, **overrides: Any
) -> tuple[VAEConfig, dict[str, Any]]:
    """Import an AutoencoderKL → ``(VAEConfig, float32 params)``.

    ``source``: a diffusers folder (``config.json`` + weights, or a pipeline folder's ``vae/``), one ``.safetensors``
    / ``.pt`` / ``.ckpt`` file, or a state dict; diffusers or LDM keys, optionally under ``first_stage_model.`` or
    ``vae.`` (a full SD/SDXL/SD3/Flux checkpoint: the other keys are ignored). The config is ``config`` if given,
    else the folder's config.json, else inferred from the weights (``infer_config``) with the factors of the preset
    that the checkpoint's other keys reveal; ``overrides`` (e.g. ``norm_num_groups=``, ``preset="sdxl"``) win.
    Every missing, unexpected or mis-shaped key is reported in one ``ConversionError``.
    """
    name = "state dict"
    diffusers_cfg = None
    if isinstance(source, Mapping):
        full = {k: io.to_float32(v) for k, v in source.items()}
    else:
        path = Path(source)
        if path.is_dir():
            full, diffusers_cfg, name = _read_folder(path)
        else:
            full, diffusers_cfg, name = io.read_checkpoint(path)
    sd = strip_prefix(full)
    fmt = detect_format(sd)
    if config is None:
        if diffusers_cfg is not None:
            config = config_from_diffusers(
                diffusers_cfg, **{**_preset_fields(overrides.pop("preset", None)), **overrides}
            )
        else:
            if "preset" not in overrides and not any(f in overrides for f in ("scaling_factor", "shift_factor")):
                latent = _shape(sd, "decoder.conv_in.weight")[1]
                guess, certain = _guess_preset(full, latent)
                if not certain:
                    warnings.warn(
                        f"{name}: a bare {latent}-channel VAE; using the {guess!r} preset's scaling/shift factors "
                        f"({PRESETS[guess].scaling_factor}, {PRESETS[guess].shift_factor}). Pass preset=... "
                        "(e.g. 'sdxl', 'sd3') if that is not the right model.",
                        stacklevel=2,
                    )
                overrides["preset"] = guess
            config = infer_config(sd, fmt, **overrides)
    elif overrides:
        config = config.replace(**{**_preset_fields(overrides.pop("preset", None)), **overrides})
    params = import_(
        vae_rules(config, fmt),
        sd,
        expected=expected_shapes(config),
        ignore=lambda k: fmt == "ldm" and k.startswith("loss."),  # LDM training checkpoints keep the loss nets
        source=f"{name} ({fmt} keys)",
    )
    return config, params


def vae_to_torch(config: VAEConfig, params: Mapping[str, Any], format: str = "diffusers") -> dict[str, np.ndarray]:
    """Export params to a torch state dict (numpy) with ``diffusers`` or ``ldm`` keys (no prefix)."""
    return export(vae_rules(config, format), params)


# ---- the conversion interface of convert/api.py (``from_torch``/``to_torch`` for every family) -------------------

FAMILY = "vae"
DIFFUSERS_CLASS = "AutoencoderKL"
TORCH_WRAP: dict[str, str] = {}
_API_FORMATS = {"original": "ldm", "diffusers": "diffusers"}  # api's format names → this module's


def detect(keys) -> str | None:
    """``"original"`` (LDM keys) / ``"diffusers"`` for an AutoencoderKL state dict (optionally under
    ``first_stage_model.``/``vae.``), else None."""
    sd = strip_prefix(dict.fromkeys(keys))
    if "decoder.conv_in.weight" not in sd or "encoder.conv_in.weight" not in sd:
        return None
    if any(k.endswith(".gamma") for k in sd):  # RMS-norm gammas: a causal video VAE (convert/wan_vae.py)
        return None
    try:
        return "original" if detect_format(sd) == "ldm" else "diffusers"
    except ConversionError:
        return None


def is_diffusers_config(d: Mapping[str, Any]) -> bool:
    return d.get("_class_name") == DIFFUSERS_CLASS


def import_checkpoint(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any] | None, fmt: str, source: str, **overrides: Any
) -> tuple[VAEConfig, dict[str, Any]]:
    """``convert.from_torch`` of a VAE: the config from ``config.json`` when there is one, else from the weights."""
    config = None
    if diffusers_config is not None:
        config = config_from_diffusers(
            diffusers_config, **{**_preset_fields(overrides.pop("preset", None)), **overrides}
        )
        overrides = {}
    return vae_from_torch(state_dict, config=config, **overrides)


def export_checkpoint(config: VAEConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """``convert.to_torch`` of a VAE: LDM keys for ``"original"``, diffusers keys for ``"diffusers"``."""
    return vae_to_torch(config, params, _API_FORMATS[fmt])


diffusers_config = config_to_diffusers
