"""Block stacks: a python loop (``blocks_{i}``) or ``nn.scan`` stages (``stage_{j}``) with optional remat.

Compile time stays flat in depth when a stack is scanned (DESIGN.md rule 7). A stack whose blocks differ (e.g. KV
compression on the deep layers only) is split into homogeneous stages: each run of consecutive blocks built with
the same arguments is one scan. ``scan_layout``/``unscan_layout`` convert parameters between the two layouts.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dit_jax.nn import cpu_dense

_policies = jax.checkpoint_policies
_dense_kernel = _policies.save_only_these_names(cpu_dense.NAME)  # the CPU dense kernel's products count as dots
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _dense_kernel),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable, _dense_kernel),
}


def stage_bounds(layer_kwargs: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of consecutive layers with identical constructor arguments."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(layer_kwargs) + 1):
        if i == len(layer_kwargs) or layer_kwargs[i] != layer_kwargs[start]:
            bounds.append((start, i))
            start = i
    return bounds


def _scan_body(block: nn.Module, carry, *args):
    return block(carry, *args), None


def run_blocks(
    block_cls: type[nn.Module],
    layer_kwargs: Sequence[Mapping[str, Any]],
    x: jax.Array,
    *args,
    scan: bool = False,
    remat: str = "none",
) -> jax.Array:
    """Apply ``block_cls(**layer_kwargs[i])(x, *args) -> x`` for every layer i, in order.

    Must be called inside a parent's compact method; the blocks become the parent's submodules.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    cls = block_cls
    if remat != "none":
        cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if not scan:
        for i, kwargs in enumerate(layer_kwargs):
            x = cls(**kwargs, name=f"blocks_{i}")(x, *args)
        return x
    for j, (start, end) in enumerate(stage_bounds(layer_kwargs)):
        scanned = nn.scan(
            _scan_body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=end - start,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(cls(**layer_kwargs[start], name=f"stage_{j}"), x, *args)
    return x


def scan_layout(params: Mapping[str, Any], layer_kwargs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``blocks_{i}`` subtrees → ``stage_{j}`` subtrees stacked on a leading layer axis."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    for j, (start, end) in enumerate(stage_bounds(layer_kwargs)):
        layers = [params[f"blocks_{i}"] for i in range(start, end)]
        out[f"stage_{j}"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return out


def unscan_layout(params: Mapping[str, Any], layer_kwargs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Inverse of ``scan_layout``."""
    out = {k: v for k, v in params.items() if not k.startswith("stage_")}
    for j, (start, end) in enumerate(stage_bounds(layer_kwargs)):
        stacked = params[f"stage_{j}"]
        for i in range(start, end):
            out[f"blocks_{i}"] = jax.tree.map(lambda x, k=i - start: np.asarray(x)[k], stacked)
    return out
