"""LoRA as a pure-functional params transform: low-rank adapters on chosen Dense kernels of any model family.

``init_lora(params, config, key)`` makes an adapter pytree for the kernels whose parameter path (``/``-separated,
e.g. ``blocks_3/attn/qkv/kernel``, or ``stage_0/attn/qkv/kernel`` for scanned stacks) matches one of
``config.targets`` (``re.search``); ``apply_lora(params, adapters, config)`` returns the params the forward pass uses,
``W' = W + (alpha / rank) · A @ B`` on every adapted kernel. No model file changes: every family works as is, and
``Family.lora_targets(config)`` names the kernels a family adapts by default (``resolve`` fills them in).

Adapter layout. A Flax Dense kernel is ``(*in, *out)``, the layout ``y = x · W`` contracts, with a leading layer axis in
scanned stacks; its input axes are ``kernel.ndim − bias.ndim`` (the bias has the output shape; a Dense without bias
contracts one axis, the ``Dense`` default). Its adapter is ``{"lora_a": (*stack, G, I, r), "lora_b": (*stack, G, r,
O / G)}`` where ``I`` and ``O`` are the flattened input and output sizes: so ``A`` is peft's ``lora_A.weight`` (r, I)
transposed and ``B`` its ``lora_B.weight`` (O, r) transposed. ``G`` > 1 for stacked projections — a kernel with three
or more output axes ``(n, heads, head_dim)`` (fused q|k|v, k|v, Flux's q|k|v|mlp) gets one rank-r adapter per slice of
its first output axis, as peft gives one to each of diffusers' ``to_q``/``to_k``/``to_v``.

Initialisation as peft: ``A`` kaiming-uniform (``U(±1/√I)``, peft's default) or Gaussian (std 1/r), ``B`` zeros, so
the adapted model starts equal to the base (``apply_lora`` then returns the kernels bit for bit).

Exactness. ``merge``/``unmerge`` add and subtract the same fp32 delta Δ, so ``unmerge(merge(W)) == W`` up to the fp32
rounding of the two additions: |error| ≤ ulp(max(|W|, |W + Δ|)) per element, and none when Δ = 0. Dropout on the
adapter input has no merged-weights form, so only ``dropout=0`` is accepted.
"""

import dataclasses
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_KEYS = ("lora_a", "lora_b")
INITS = ("kaiming", "gaussian")
_STAGE = re.compile(r"stage_\d+")  # scanned stacks (dit_jax.nn.stack): one leading layer axis


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and the kernels to adapt (regexes over parameter paths; empty: the family's defaults).

    ``alpha`` None means ``alpha = rank`` (scale 1, diffusers' convention when a file stores no alpha).
    """

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    dropout: float = 0.0
    init: str = "kaiming"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r} is invalid: expected a positive integer")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} is invalid: expected a positive number (or None: = rank)")
        if self.dropout != 0:
            raise ValueError(
                f"LoRA dropout={self.dropout!r} is not supported: dropout acts on the adapter branch's input, which "
                "a merged-weights forward (W + scale·A@B) does not have; use 0"
            )
        if self.init not in INITS:
            raise ValueError(f"LoRA init={self.init!r} is invalid: expected one of {INITS}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        for pattern in targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoRA target {pattern!r} is not a regular expression: {e}") from e
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of ``A @ B`` in the merged kernel."""
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def default_targets(model_config: Any) -> tuple[str, ...]:
    """The family's default LoRA targets for ``model_config`` (``Family.lora_targets``)."""
    from dit_jax.models.family import family_of

    return tuple(family_of(model_config).lora_targets(model_config))


def resolve(config: LoraConfig, model_config: Any) -> LoraConfig:
    """``config`` with the family's default targets when it names none."""
    return config if config.targets else dataclasses.replace(config, targets=default_targets(model_config))


# ---- layout ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a Dense kernel of shape ``(*stack, *in_shape, *out_shape)`` is adapted, in ``groups`` output slices."""

    stack: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int

    @property
    def in_size(self) -> int:
        return int(np.prod(self.in_shape, dtype=np.int64))

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape, dtype=np.int64))

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_a`` and ``lora_b``."""
        g = self.groups
        return (*self.stack, g, self.in_size, rank), (*self.stack, g, rank, self.out_size // g)


def kernel_layout(path: str, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> KernelLayout:
    """The layout of the kernel at ``path`` (its Dense's bias shape, or None without one); see the module doc."""
    kernel_shape = tuple(int(s) for s in kernel_shape)
    n_stack = 1 if any(_STAGE.fullmatch(p) for p in path.split("/")) else 0
    if bias_shape is not None:
        n_out = len(bias_shape) - n_stack
        if n_out < 1 or tuple(kernel_shape[len(kernel_shape) - n_out :]) != tuple(bias_shape[n_stack:]):
            raise ValueError(f"{path}: kernel {kernel_shape} and bias {tuple(bias_shape)} are not a Dense layer's")
    else:
        n_out = len(kernel_shape) - n_stack - 1
    n_in = len(kernel_shape) - n_stack - n_out
    if n_in < 1 or n_out < 1:
        raise ValueError(f"{path}: a kernel of shape {kernel_shape} is not a Dense kernel LoRA can adapt")
    out_shape = kernel_shape[n_stack + n_in :]
    return KernelLayout(
        stack=kernel_shape[:n_stack],
        in_shape=kernel_shape[n_stack : n_stack + n_in],
        out_shape=out_shape,
        groups=out_shape[0] if len(out_shape) >= 3 else 1,
    )


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_leaves(v, path))
        else:
            out[path] = v
    return out


def _get(tree: Mapping, path: str) -> Any:
    for p in path.split("/") if path else ():
        tree = tree[p]
    return tree


def _set(tree: dict, path: str, value: Any) -> None:
    if not path:  # the root itself (a lone Dense layer's params)
        tree.update(value)
        return
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def module_path(kernel_path: str) -> str:
    """``"blocks_0/attn/qkv/kernel"`` → ``"blocks_0/attn/qkv"`` (the Dense layer, where its adapter sits)."""
    return kernel_path[: -len("kernel")].rstrip("/")


def target_paths(params: Mapping, config: LoraConfig) -> list[str]:
    """Paths of the kernels of ``params`` that ``config.targets`` select (sorted)."""
    patterns = [re.compile(p) for p in config.targets]
    return sorted(
        path
        for path in _leaves(params)
        if path.rsplit("/", 1)[-1] == "kernel" and any(p.search(path) for p in patterns)
    )


def layouts(params: Mapping, paths: list[str]) -> dict[str, KernelLayout]:
    """``kernel_layout`` of each kernel path of ``params`` (shapes only: abstract params work)."""
    out = {}
    for path in paths:
        module = _get(params, module_path(path))
        bias = module.get("bias")
        out[path] = kernel_layout(path, np.shape(module["kernel"]), None if bias is None else np.shape(bias))
    return out


def adapter_paths(adapters: Mapping) -> list[str]:
    """The kernel paths an adapter tree adapts (``.../kernel`` for each ``{"lora_a", "lora_b"}`` node)."""
    out = []

    def walk(node: Mapping, prefix: str) -> None:
        if set(node) == set(ADAPTER_KEYS):
            out.append(f"{prefix}/kernel" if prefix else "kernel")
            return
        for k, v in node.items():
            if not isinstance(v, Mapping):
                raise ValueError(f"not a LoRA adapter tree: {prefix}/{k} is a leaf outside a lora_a/lora_b pair")
            walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(adapters, "")
    return sorted(out)


# ---- init, merge, unmerge ----------------------------------------------------------------------------------------


def init_lora(params: Mapping, config: LoraConfig, key: jax.Array) -> dict[str, Any]:
    """Adapters for the kernels of ``params`` that ``config.targets`` select: ``lora_a`` random, ``lora_b`` zeros.

    ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves, e.g. under ``jax.eval_shape``). Each kernel's ``A``
    comes from ``fold_in(key, crc32(path))``, so it does not depend on which other kernels are adapted.
    """
    if not config.targets:
        raise ValueError(
            "LoraConfig.targets is empty: pass regexes over parameter paths, or dit_jax.lora.resolve(config, "
            "model_config) for the family's defaults"
        )
    paths = target_paths(params, config)
    if not paths:
        kernels = [p for p in _leaves(params) if p.endswith("/kernel")]
        raise ValueError(
            f"LoRA targets {list(config.targets)} match no kernel of the params; kernels are e.g. {kernels[:6]}"
        )
    adapters: dict[str, Any] = {}
    for path, layout in layouts(params, paths).items():
        shape_a, shape_b = layout.adapter_shapes(config.rank)
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        if config.init == "kaiming":  # peft: kaiming_uniform_(a=√5) on lora_A (r, I): bound 1/√I
            bound = 1.0 / np.sqrt(layout.in_size)
            a = jax.random.uniform(k, shape_a, jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, shape_a, jnp.float32) / config.rank
        _set(adapters, module_path(path), {"lora_a": a, "lora_b": jnp.zeros(shape_b, jnp.float32)})
    return adapters


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """``A @ B`` of one adapter, in the kernel's layout (fp32, full precision on every backend)."""
    d = jnp.einsum(
        "...gir,...gro->...igo", a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # (*stack, I, G, O/G)
    return d.reshape(kernel_shape)


def _add(params: Mapping, adapters: Mapping, scale: float, where: str) -> dict[str, Any]:
    if set(adapters) == set(ADAPTER_KEYS):
        if "kernel" not in params:
            raise ValueError(f"LoRA adapter {where or '(root)'} has no kernel to adapt in the params")
        kernel = params["kernel"]
        delta = lora_delta(adapters["lora_a"], adapters["lora_b"], tuple(kernel.shape))
        return {**params, "kernel": (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)}
    out = dict(params)
    for name, sub in adapters.items():
        if name not in params or not isinstance(params[name], Mapping):
            raise ValueError(f"LoRA adapter path {where + '/' if where else ''}{name} is not in the params")
        out[name] = _add(params[name], sub, scale, f"{where}/{name}" if where else str(name))
    return out


def apply_lora(params: Mapping, adapters: Mapping, config: LoraConfig) -> dict[str, Any]:
    """The params with ``(alpha / rank) · A @ B`` added to every adapted kernel (what the forward pass uses).

    Leaves without an adapter are passed through as they are (no copy); jit-able, differentiable in ``adapters``.
    """
    return _add(params, adapters, config.scale, "")


merge = apply_lora


def unmerge(params: Mapping, adapters: Mapping, config: LoraConfig) -> dict[str, Any]:
    """The inverse of ``merge``: subtract the same delta (exact up to one fp32 rounding, see the module doc)."""
    return _add(params, adapters, -config.scale, "")


def count(adapters: Mapping) -> int:
    """Number of adapter parameters."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(adapters)))


# ---- scanned and looped layouts ----------------------------------------------------------------------------------


def set_scan(model_config: Any, adapters: Mapping, scan: bool) -> dict[str, Any]:
    """Adapters for the looped (``blocks_{i}``) or scanned (``stage_{j}``) parameter layout of ``model_config``
    (``dit_jax.models.set_scan`` for adapters). Blocks of a stage that lack an adapter another block of the stage has
    get zeros (Δ = 0), so a stage stacks whole; stages without adapters stay absent."""
    from dit_jax.nn.stack import stage_bounds

    bounds = stage_bounds(model_config.layer_kinds())
    prefix = "blocks_" if scan else "stage_"
    out = {k: v for k, v in adapters.items() if not k.startswith(prefix)}
    for j, (start, end) in enumerate(bounds):
        if not scan:
            if f"stage_{j}" in adapters:
                for i in range(start, end):
                    out[f"blocks_{i}"] = jax.tree.map(lambda x, k=i - start: np.asarray(x)[k], adapters[f"stage_{j}"])
            continue
        present = {i: _leaves(adapters[f"blocks_{i}"]) for i in range(start, end) if f"blocks_{i}" in adapters}
        if not present:
            continue
        shapes = {p: np.shape(x) for leaves in present.values() for p, x in leaves.items()}
        stage: dict[str, Any] = {}
        for p, shape in sorted(shapes.items()):
            rows = [present.get(i, {}).get(p) for i in range(start, end)]
            _set(stage, p, np.stack([np.zeros(shape, np.float32) if x is None else np.asarray(x) for x in rows]))
        out[f"stage_{j}"] = stage
    return out
