"""Architecture inference shared by the family converters: shapes of keys, heads by width, stored positions.

A family's ``infer`` returns an ``Inference``: ``fields`` read from the checkpoint (they beat a preset), ``soft``
guesses (e.g. heads from the width; a preset beats them) and ``missing`` fields it could not infer, each with the
reason. ``from_torch`` merges them with the preset and overrides and names any field still missing.
"""

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dit_jax.convert.rules import ConversionError
from dit_jax.nn.embeddings import sincos_pos_embed

# Heads of the published widths (DiT-S/B/L/XL, PixArt-XL).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
PE_INTERPOLATION_CANDIDATES = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0)
# Where checkpoints store the fixed sin-cos table (original; diffusers' PatchEmbed buffer).
POS_EMBED_KEYS = ("pos_embed", "pos_embed.pos_embed")


@dataclasses.dataclass
class Inference:
    """Config fields inferred from a checkpoint: certain ``fields``, ``soft`` guesses, ``missing`` with reasons."""

    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    soft: dict[str, Any] = dataclasses.field(default_factory=dict)
    missing: dict[str, str] = dataclasses.field(default_factory=dict)


def shape(state_dict: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    """The shape of ``key``; a clear error if the checkpoint lacks it."""
    if key not in state_dict:
        raise ConversionError(f"{source}: key {key!r} is missing (needed to infer the architecture)")
    return tuple(np.shape(state_dict[key]))


def block_indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted indices N of keys matching ``pattern`` with ``{n}`` for the index, e.g. ``blocks.{n}.attn.sr.weight``."""
    rx = re.compile("^" + re.escape(pattern).replace(re.escape("{n}"), r"(\d+)") + "$")
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def depth_from(keys: Iterable[str], pattern: str, source: str) -> int:
    """Number of blocks, checking the indices are 0..N-1 without gaps."""
    idx = block_indices(keys, pattern)
    if not idx:
        raise ConversionError(f"{source}: no keys match {pattern.replace('{n}', 'N')}; cannot infer the depth")
    if idx != list(range(len(idx))):
        gaps = sorted(set(range(max(idx) + 1)) - set(idx))
        raise ConversionError(f"{source}: blocks {gaps} are missing (found blocks up to {max(idx)})")
    return len(idx)


def heads(width: int, inf: Inference) -> None:
    """Heads of a published width as a soft guess; other widths need ``num_heads``."""
    if width in HEADS_BY_WIDTH:
        inf.soft["num_heads"] = HEADS_BY_WIDTH[width]
    else:
        inf.missing["num_heads"] = (
            f"the number of heads is not stored in the checkpoint and width {width} is not a published one "
            f"({sorted(HEADS_BY_WIDTH)})"
        )


def out_channels(out_features: int, patch: int, in_channels: int, source: str) -> bool:
    """``learn_sigma`` from the final linear's width: p²·2C (learned sigma) or p²·C."""
    c = out_features // (patch * patch)
    if c * patch * patch != out_features or c not in (in_channels, 2 * in_channels):
        raise ConversionError(
            f"{source}: the final layer has {out_features} outputs; expected patch²·C or patch²·2C with "
            f"patch={patch}, C={in_channels}"
        )
    return c == 2 * in_channels


def grid_from_pos_embed(pos_shape: tuple[int, ...], width: int, source: str) -> int:
    """Token grid side of a stored square ``pos_embed (1, T, D)``."""
    t = pos_shape[-2] if len(pos_shape) >= 2 else -1
    side = math.isqrt(t) if t > 0 else 0
    if len(pos_shape) not in (2, 3) or pos_shape[-1] != width or side * side != t:
        raise ConversionError(f"{source}: pos_embed has shape {pos_shape}; expected (1, T, {width}) with T a square")
    return side


def stored_pos_embed(
    state_dict: Mapping[str, np.ndarray], width: int, patch: int, inf: Inference, source: str
) -> np.ndarray | None:
    """The stored ``pos_embed`` with ``input_size`` from its grid, or None with ``input_size`` missing."""
    key = next((k for k in POS_EMBED_KEYS if k in state_dict), None)
    if key is None:
        inf.missing["input_size"] = "the checkpoint stores no pos_embed (the training latent size)"
        return None
    inf.fields["input_size"] = grid_from_pos_embed(np.shape(state_dict[key]), width, source) * patch
    return state_dict[key]


def match_pe_interpolation(pos: np.ndarray, width: int, candidates: Iterable[float], tol: float = 1e-2) -> list[float]:
    """``pe_interpolation`` values whose sin-cos table best matches the stored square ``pos`` (within ``tol``).

    Empty: no candidate matches. More than one: they give the same table (e.g. a 1×1 grid), so it is ambiguous.
    """
    pos = np.asarray(pos, np.float32).reshape(-1, width)
    side = math.isqrt(pos.shape[0])
    found = []
    for c in sorted(set(candidates)):
        table = sincos_pos_embed(side, side, width, base_size=side, interpolation=c)
        err = float(np.max(np.abs(table - pos)))
        if err < tol:
            found.append((err, c, table))
    if not found:
        return []
    found.sort(key=lambda f: f[0])
    best = found[0][2]
    return [c for _, c, table in found if np.array_equal(table, best)]
