"""Logical axis names and their default mapping onto the mesh axes ``data``, ``fsdp``, ``sequence`` and ``tensor``.

Every parameter in ``dit_jax`` carries logical names (``nn.with_logical_partitioning``) and activations are
constrained with the ``act_*`` names at block boundaries. Which mesh axis a logical name lands on is decided
here (or in an experiment config), never inside a model.

Parameter names:
  embed       the model width D (sharded over ``fsdp``: ZeRO-3 style parameter sharding)
  mlp         the MLP hidden width
  heads       attention heads (q/k/v output, attention output input)
  kv          the per-head feature axis
  modulation  adaLN modulation outputs (6·D, 2·D)
  classes     rows of the class-embedding table
  caption     caption (text-encoder) channels
  freq        sinusoid frequency channels
  patch       patch-embedding kernel spatial/input axes
  layers      the stacked-layer axis of scanned block stages
  channels    conv/GroupNorm channel axes of convolutional autoencoders (VAE); replicated by default, since their
              parameters are small next to their activations
Activation names:
  act_batch, act_length, act_embed, act_heads, act_mlp, act_kv
  act_length (image/joint tokens) lands on ``sequence``: with a ``sequence`` axis of n > 1 devices attention runs
  sequence-parallel (``dit_jax.parallel.sequence``); of size 1 it changes nothing.

A rule naming a mesh axis that the mesh in context lacks (e.g. the sampling pipelines' meshes have no ``sequence``)
is ignored by ``constrain``.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("modulation", "tensor"),
    ("classes", None),
    ("caption", None),
    ("freq", None),
    ("patch", None),
    ("layers", None),
    ("norm", None),
    ("channels", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv", None),
)


def logical_rules(overrides: Rules | None = None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """DEFAULT_RULES with ``overrides`` taking precedence (same logical name → the override's mesh axes)."""
    if not overrides:
        return DEFAULT_RULES
    override = {name: axes for name, axes in overrides}
    merged = [(name, override.pop(name)) if name in override else (name, axes) for name, axes in DEFAULT_RULES]
    return tuple(merged) + tuple(override.items())


def constrain(x, names: tuple[str | None, ...]):
    """Constrain an activation to logical axis names (a no-op without a mesh and rules in context); mesh axes the
    mesh in context does not have are left out."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules and not mesh.empty:
        rules = tuple((name, _present(axes, mesh.axis_names)) for name, axes in rules)
    return nn.with_logical_constraint(x, names, rules=rules)


def _present(axes: str | tuple[str, ...] | None, mesh_axes: Sequence[str]) -> str | tuple[str, ...] | None:
    if isinstance(axes, str):
        return axes if axes in mesh_axes else None
    kept = tuple(a for a in axes or () if a in mesh_axes)
    return kept or None
