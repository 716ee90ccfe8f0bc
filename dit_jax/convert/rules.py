"""Conversion tables: one list of rules per model family and checkpoint format, used in both directions.

A ``Rule`` ties one or more torch keys to one Flax parameter path with a pair of inverse transforms, so import and
export come from the same table and a torch → JAX → torch round trip is exact by construction (DESIGN.md rule 4).

Patterns may hold ``{i}`` (expanded over ``range(n)`` given to ``expand``) and ``{*}`` in torch keys: a parameter
that the torch format stores once per block (diffusers DiT copies the timestep/label embedders into every block).
On import the ``{*}`` copy of index 0 is read; on export the value is written to every index.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray


class ConversionError(ValueError):
    """A checkpoint does not fit the expected layout; the message lists every offending key."""


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Rule:
    """``torch`` key pattern(s) ↔ ``flax`` path pattern (``/``-separated).

    ``to_flax(*torch_arrays) -> flax_array`` and ``to_torch(flax_array) -> torch_array | tuple`` must be inverses.
    """

    torch: str | tuple[str, ...]
    flax: str
    to_flax: Callable[..., Array] = _identity
    to_torch: Callable[[Array], Array | tuple[Array, ...]] = _identity

    @property
    def torch_keys(self) -> tuple[str, ...]:
        return (self.torch,) if isinstance(self.torch, str) else tuple(self.torch)


# ---- transforms (numpy; exact: only transposes, reshapes, concatenations) ----------------------------------------


def linear(out_shape: Sequence[int] | None = None, in_shape: Sequence[int] | None = None):
    """torch Linear weight (out, in) ↔ kernel (*in_shape, *out_shape)."""

    def to_flax(w):
        k = w.T
        ins = tuple(in_shape) if in_shape else (k.shape[0],)
        outs = tuple(out_shape) if out_shape else (k.shape[1],)
        return k.reshape(ins + outs)

    def to_torch(k):
        n_in = len(in_shape) if in_shape else 1
        k = k.reshape(int(np.prod(k.shape[:n_in])), -1)
        return k.T

    return to_flax, to_torch


def bias(out_shape: Sequence[int] | None = None):
    """torch bias (out,) ↔ (*out_shape)."""
    if out_shape is None:
        return _identity, _identity
    return (lambda b: b.reshape(tuple(out_shape))), (lambda b: b.reshape(-1))


def conv():
    """torch Conv2d weight (O, I, kh, kw) ↔ Flax (kh, kw, I, O)."""
    return (lambda w: w.transpose(2, 3, 1, 0)), (lambda k: k.transpose(3, 2, 0, 1))


def stacked_linear(n: int, out_shape: Sequence[int]):
    """n torch Linear weights (out, in) (e.g. to_q, to_k, to_v) ↔ one kernel (in, n, *out_shape)."""

    def to_flax(*ws):
        return np.stack([w.T.reshape((w.shape[1],) + tuple(out_shape)) for w in ws], axis=1)

    def to_torch(k):
        return tuple(k[:, j].reshape(k.shape[0], -1).T for j in range(n))

    return to_flax, to_torch


def stacked_bias(n: int, out_shape: Sequence[int]):
    """n torch biases (out,) ↔ one (n, *out_shape)."""
    return (lambda *bs: np.stack([b.reshape(tuple(out_shape)) for b in bs])), (
        lambda b: tuple(b[j].reshape(-1) for j in range(n))
    )


def rule(torch: str | tuple[str, ...], flax: str, transform=None) -> Rule:
    """Shorthand: ``rule("a.weight", "a/kernel", linear())``."""
    if transform is None:
        return Rule(torch, flax)
    return Rule(torch, flax, *transform)


def dense(torch_prefix: str, flax_prefix: str, transform=None, bias_transform=None) -> list[Rule]:
    """``{torch_prefix}.weight/.bias`` ↔ ``{flax_prefix}/kernel`` (``transform``, default ``linear()``) ``/bias``."""
    return [
        rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", transform or linear()),
        rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias", bias_transform),
    ]


def stacked_dense(torch_prefixes: Sequence[str], flax_prefix: str, out_shape: Sequence[int]) -> list[Rule]:
    """n torch Linears (e.g. ``to_q/to_k/to_v``) ↔ one ``{flax_prefix}/kernel`` (in, n, *out_shape) and bias."""
    n = len(torch_prefixes)
    return [
        rule(tuple(f"{p}.weight" for p in torch_prefixes), f"{flax_prefix}/kernel", stacked_linear(n, out_shape)),
        rule(tuple(f"{p}.bias" for p in torch_prefixes), f"{flax_prefix}/bias", stacked_bias(n, out_shape)),
    ]


def norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """LayerNorm ``{torch_prefix}.weight/.bias`` ↔ ``{flax_prefix}/scale``, ``/bias``."""
    return [rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale"), rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def mlp(torch_prefix: str, flax_prefix: str, names: tuple[str, str]) -> list[Rule]:
    """Two Linears ``{torch_prefix}.{names[0]}``, ``.{names[1]}`` ↔ ``{flax_prefix}/linear_1``, ``/linear_2``."""
    return [
        r for t, f in zip(names, ("linear_1", "linear_2")) for r in dense(f"{torch_prefix}.{t}", f"{flax_prefix}/{f}")
    ]


# ---- the engine ------------------------------------------------------------------------------------------------


def expand(rules: Iterable[Rule], n: int = 0, *, star: int | None = None) -> list[Rule]:
    """Expand ``{i}`` over ``range(n)``; ``{*}`` is kept for ``star`` copies (``import_``/``export`` resolve it)."""
    out = []
    for r in rules:
        keys = r.torch_keys
        if "{i}" in r.flax or any("{i}" in k for k in keys):
            for i in range(n):
                out.append(
                    dataclasses.replace(
                        r, torch=tuple(k.replace("{i}", str(i)) for k in keys), flax=r.flax.replace("{i}", str(i))
                    )
                )
        else:
            out.append(dataclasses.replace(r, torch=keys))
    return out


def _set(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def _get(tree: Mapping, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten``: ``{"a/b": x}`` → ``{"a": {"b": x}}``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        _set(tree, path, value)
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def import_(
    rules: Sequence[Rule],
    state_dict: Mapping[str, Array],
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    star: int = 1,
    ignore: Callable[[str], bool] = lambda key: False,
    source: str = "checkpoint",
    prepare: Callable[[Any], Array] = np.asarray,
    finish: Callable[[str, Array], Any] | None = None,
) -> dict[str, Any]:
    """Apply ``rules`` to a torch state dict (numpy arrays) → nested Flax params.

    ``expected`` maps flax paths to shapes (from the model's abstract params): every missing, unexpected (unless
    ``ignore(key)``) and mis-shaped key is collected and raised as one ``ConversionError`` naming the key, the
    expected torch shape and the found one. ``star`` is the number of per-block copies behind ``{*}`` keys.
    ``prepare`` reads one torch array as the rules take it (e.g. a memory-mapped bf16 tensor → float32), ``finish``
    turns each produced leaf into what the tree keeps (``finish(flax_path, array)``, e.g. quantised): one rule's
    arrays at a time, so a lazily read checkpoint is never held whole in memory.
    """
    params: dict[str, Any] = {}
    used: set[str] = set()
    missing, misshaped = [], []
    for r in rules:
        keys = []
        for k in r.torch_keys:
            if "{*}" in k:
                used.update(k.replace("{*}", str(j)) for j in range(star))
                k = k.replace("{*}", "0")
            keys.append(k)
        used.update(keys)
        absent = [k for k in keys if k not in state_dict]
        if absent:
            missing.extend(absent)
            continue
        if expected is not None and r.flax in expected:
            want = tuple(expected[r.flax])
            want_torch = r.to_torch(np.zeros(want, np.float32))
            want_torch = want_torch if isinstance(want_torch, tuple) else (want_torch,)
            found = [tuple(np.shape(state_dict[k])) for k in keys]
            bad = [(k, w.shape, a) for k, w, a in zip(keys, want_torch, found) if tuple(w.shape) != a]
            if bad:
                misshaped.extend(bad)
                continue
        value = r.to_flax(*(prepare(state_dict[k]) for k in keys))
        _set(params, r.flax, value if finish is None else finish(r.flax, value))
    for r in rules:  # every {*} copy must exist
        for k in r.torch_keys:
            if "{*}" in k:
                missing.extend(c for j in range(1, star) if (c := k.replace("{*}", str(j))) not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
    if expected is not None:
        produced = set(flatten(params))
        uncovered = sorted(set(expected) - produced - {r.flax for r in rules})
        if uncovered:
            raise ConversionError(f"{source}: the conversion table does not produce {uncovered}")
    problems = []
    if missing:
        problems.append("missing keys:\n  " + "\n  ".join(sorted(set(missing))))
    if unexpected:
        problems.append(
            "unexpected keys:\n  " + "\n  ".join(f"{k} {tuple(np.shape(state_dict[k]))}" for k in unexpected)
        )
    if misshaped:
        problems.append(
            "mis-shaped keys:\n  " + "\n  ".join(f"{k}: expected {tuple(w)}, found {tuple(a)}" for k, w, a in misshaped)
        )
    if problems:
        raise ConversionError(f"{source} does not match the model:\n" + "\n".join(problems))
    return params


def export(rules: Sequence[Rule], params: Mapping[str, Any], *, star: int = 1) -> dict[str, Array]:
    """Apply ``rules`` backwards: nested Flax params → torch state dict (numpy arrays)."""
    out: dict[str, Array] = {}
    for r in rules:
        value = r.to_torch(np.asarray(_get(params, r.flax)))
        values = value if isinstance(value, tuple) else (value,)
        for k, v in zip(r.torch_keys, values):
            v = np.ascontiguousarray(v)
            if "{*}" in k:
                for j in range(star):
                    out[k.replace("{*}", str(j))] = v
            else:
                out[k] = v
    return out
