"""DiT conversion: facebookresearch/DiT (``original``) and diffusers ``DiTTransformer2DModel`` (``diffusers``).

Key mapping as in MODELS.md §1.2–1.3. The two formats also differ in numerics (§1.4): an original checkpoint gets
``timestep_freq_shift=0, mlp_norm_eps=1e-6``, a diffusers one ``1`` and its ``norm_eps`` (1e-5 by default), so each
import reproduces its own reference. diffusers copies the timestep/label embedders into every block (``{*}``).
"""

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert import common, infer
from dit_jax.convert.rules import ConversionError, Rule, dense, expand, mlp, rule
from dit_jax.models.dit import DiTConfig

FAMILY = "dit"
CONFIG = DiTConfig
DIFFUSERS_CLASS = "DiTTransformer2DModel"
TORCH_WRAP: dict[str, str] = {}

_NAME = "DiT"
_NORM_TYPE = "ada_norm_zero"
_EMB = "transformer_blocks.{*}.norm1.emb"
# Per format: the label table (also the detection mark), block {i}'s adaLN linear (after ``blocks.{i}.``) and the
# final layer's adaLN and output linears.
_LABELS = {
    "original": "y_embedder.embedding_table.weight",
    "diffusers": "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
}
_ADA = {"original": "adaLN_modulation.1", "diffusers": "norm1.linear"}
_FINAL = {
    "original": ("final_layer.adaLN_modulation.1", "final_layer.linear"),
    "diffusers": ("proj_out_1", "proj_out_2"),
}

detect = common.detector(_LABELS["original"], _LABELS["diffusers"], _NAME)
is_diffusers_config = common.diffusers_config_matcher(DIFFUSERS_CLASS, _NORM_TYPE, _NAME)
ignored = common.ignored


def rules(config: DiTConfig, fmt: str, *, for_export: bool = False) -> tuple[list[Rule], int]:
    """The (expanded) rule table for ``fmt`` and the number of ``{*}`` copies (``for_export`` changes nothing)."""
    h = config.num_heads
    dh = config.hidden_size // h
    if fmt == "original":
        t_embedder, star = mlp("t_embedder.mlp", "t_embedder", ("0", "2")), 1
        labels = _LABELS[fmt]
    elif fmt == "diffusers":
        t_embedder, star = mlp(f"{_EMB}.timestep_embedder", "t_embedder", ("linear_1", "linear_2")), config.depth
        labels = f"{_EMB}.class_embedder.embedding_table.weight"
    else:
        raise common.unknown_format(_NAME, fmt)
    table = [
        *common.patch_embed_rules(fmt),
        *t_embedder,
        rule(labels, "y_embedder/embedding"),
        *common.attention_rules(fmt, h, dh),
        *common.mlp_rules(fmt),
        *dense(f"{common.BLOCK[fmt]}.{_ADA[fmt]}", "blocks_{i}/adaLN_modulation/linear"),
        *dense(_FINAL[fmt][0], "final_layer/adaLN_modulation/linear"),
        *dense(_FINAL[fmt][1], "final_layer/linear"),
    ]
    return expand(table, config.depth), star


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
    if fmt == "diffusers":
        f.update(timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    else:
        f.update(timestep_freq_shift=0.0, mlp_norm_eps=1e-6)
    if diffusers_config is not None:
        c = diffusers_config
        common.read_diffusers_config(c, inf, source, name=_NAME, norm_type=_NORM_TYPE)
        f["input_size"] = int(c.get("sample_size", 32))
        f["num_classes"] = int(c.get("num_embeds_ada_norm", 1000))
        f["mlp_norm_eps"] = float(c.get("norm_eps", 1e-5))
        return inf
    d, p = common.infer_backbone(
        state_dict, inf, fmt, source, block_key=f"{_ADA[fmt]}.weight", final=f"{_FINAL[fmt][1]}.weight"
    )
    f["num_classes"] = infer.shape(state_dict, _LABELS[fmt], source)[0] - 1
    pos = infer.stored_pos_embed(state_dict, d, p, inf, source)
    if pos is not None:
        found = infer.match_pe_interpolation(pos, d, infer.PE_INTERPOLATION_CANDIDATES)
        if 1.0 in found or len(found) == 1:  # the original's table is interpolation 1; a 1×1 grid fits any
            f["pe_interpolation"] = 1.0 if 1.0 in found else found[0]
        else:
            inf.missing["pe_interpolation"] = "the stored pos_embed is not a sin-cos table of its grid"
    return inf


def export_extras(config: DiTConfig, params: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """Keys beyond the rule table: the original loads strictly, so it gets its fixed ``pos_embed``."""
    g = config.base_size
    return common.pos_embed_export(fmt, g, config.hidden_size, g, config.pe_interpolation)


def check_export(config: DiTConfig, fmt: str) -> None:
    """Errors for what ``fmt`` cannot hold; warnings where its reference computes differently."""
    if fmt == "diffusers":
        common.check_mlp_ratio(config, DIFFUSERS_CLASS)
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
    return common.diffusers_config(
        config,
        DIFFUSERS_CLASS,
        norm_type=_NORM_TYPE,
        norm_eps=config.mlp_norm_eps,
        num_embeds_ada_norm=config.num_classes,
    )
