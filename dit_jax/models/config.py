"""What every model config shares: execution switches, validation, JSON round trip.

A config is a frozen dataclass holding every architecture and numerics switch of one model (DESIGN.md rule 3);
``to_dict``/``from_dict`` make it JSON so a checkpoint describes itself.
"""

import dataclasses
import types
import typing
from typing import Any, ClassVar

from dit_jax.nn.attention import available_backends
from dit_jax.nn.layers import DTYPE_NAMES
from dit_jax.nn.stack import REMAT_POLICIES


def check(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise one clear ``ValueError`` naming the field, the value and what was expected."""
    if not ok:
        raise ValueError(f"config field {field}={value!r} is invalid: expected {expected}")


def check_patch_transformer(config: Any) -> None:
    """The checks every patch-based transformer config shares: heads divide the width, sin-cos positions fit, the
    training size is a whole number of patches."""
    d, heads = config.hidden_size, config.num_heads
    check(d % heads == 0, "hidden_size", d, f"a multiple of num_heads={heads}")
    check(d % 4 == 0, "hidden_size", d, "a multiple of 4 (sin-cos positions)")
    s, p = config.input_size, config.patch_size
    check(s % p == 0, "input_size", s, f"a multiple of patch_size={p}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    """How a model runs (not what it computes): compute dtype, scanned blocks, remat policy, attention backend.

    Parameters always stay float32; ``dtype`` is the compute dtype. ``scan_blocks`` changes the parameter layout
    (stacked ``stage_{j}`` instead of ``blocks_{i}``); see ``dit_jax.models.set_scan``.
    """

    family: ClassVar[str] = ""

    dtype: str = "float32"
    scan_blocks: bool = False
    remat: str = "none"
    attention_backend: str = "auto"

    def __post_init__(self):
        check(self.dtype in DTYPE_NAMES, "dtype", self.dtype, f"one of {tuple(DTYPE_NAMES)}")
        check(self.remat in REMAT_POLICIES, "remat", self.remat, f"one of {sorted(REMAT_POLICIES)}")
        backends = available_backends()
        check(self.attention_backend in backends, "attention_backend", self.attention_backend, f"one of {backends}")

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {"family": self.family}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"config family {family!r} does not match {cls.__name__} ({cls.family!r})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in d.items()})


def _coerce(hint, value):
    """JSON → field type: lists back to tuples, ints to floats where a float is declared."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(args[0], value) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
