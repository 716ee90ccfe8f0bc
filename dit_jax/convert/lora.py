"""LoRA adapter files: diffusers/peft (``lora_A``/``lora_B``) and kohya (``lora_down``/``lora_up``/``alpha``)
safetensors, in and out, for every family with a rule table (DiT, PixArt, SD3, Flux).

Module names come from the family's own conversion table (``convert/<family>.py``): each rule that writes a torch
Linear ``NAME.weight`` into a Flax kernel names a LoRA module ``NAME``, and the rule's transform itself says which
kernel rows and columns that Linear's rows and columns are (it is run once on an index array: its transposes,
reshapes, splits and swaps are what a LoRA factor goes through). So the key mapping is written once, and a fused
kernel (our q|k|v) takes separate ``to_q``/``to_k``/``to_v`` adapters, BFL's fused ``qkv`` adapter, or both.

Names per format:

- ``peft`` (diffusers ``load_lora_weights``): ``transformer.NAME.lora_A.weight`` (r, in) and ``.lora_B.weight``
  (out, r) with the model's diffusers names by default; alpha in the safetensors metadata
  ``lora_adapter_metadata`` (``transformer.r``, ``transformer.lora_alpha``, ``…rank_pattern``, ``…alpha_pattern``),
  as diffusers writes it. Reading also takes the ``base_model.model.`` prefix of ``PeftModel`` files, an
  ``adapter_config.json`` beside the file, and ``NAME.alpha`` keys; without any alpha, alpha = rank (scale 1).
- ``kohya``: ``lora_unet_NAME_WITH_UNDERSCORES.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and
  ``.alpha`` (a scalar), with the original names by default (BFL's for Flux, SAI's for SD3, as sd-scripts trains).

A part of a fused Linear whose groups have different ``A`` (a dit_jax adapter on q|k|v written as BFL's one ``qkv``)
is written at rank ``m·r`` with a block-diagonal ``up``/``B`` and alpha ``m·alpha`` (the same scale), and read back
into its ``m`` groups; a part whose adapters are all zero is not written. Import → export is bit-exact.
"""

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax import lora
from dit_jax.convert import io
from dit_jax.convert.api import conversion_modules, expected_shapes
from dit_jax.convert.rules import ConversionError, Rule
from dit_jax.files import atomic_path, read_json
from dit_jax.models.family import family_of

FORMATS = ("peft", "kohya")
DEFAULT_NAMING = {"peft": "diffusers", "kohya": "original"}
PEFT_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
_PEFT_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|alpha)$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_[a-z]+_.+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|te\d?\.)")
_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


# ---- the module table: torch Linear name → (kernel, part of its rule) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Module:
    name: str  # torch Linear name in the chosen naming (first copy of a per-block copied one)
    copies: tuple[str, ...]  # every name the format stores this Linear under (DiT diffusers' per-block embedders)
    flax: str  # kernel path, looped layout
    rule: Rule
    part: int  # index among the rule's torch keys


@dataclasses.dataclass(frozen=True)
class _PartMap:
    """Where a torch Linear's columns and rows lie in its kernel: input index and (group, position) per row."""

    in_index: np.ndarray  # (in_t,) flat kernel input index of each torch column
    out_group: np.ndarray  # (out_t,) kernel output group of each torch row
    out_pos: np.ndarray  # (out_t,) position within its group

    def groups(self) -> list[int]:
        """The groups this Linear's rows cover, in row order."""
        _, first = np.unique(self.out_group, return_index=True)
        return [int(self.out_group[i]) for i in sorted(first)]

    def rows(self, group: int) -> np.ndarray:
        return np.nonzero(self.out_group == group)[0]


def _conversion(model_config: Any):
    family = family_of(model_config)
    module = conversion_modules().get(family.name)
    if module is None or not hasattr(module, "rules"):
        raise ConversionError(f"no LoRA conversion for {family.display_name or family.name}: it has no rule table")
    return module


def _modules(model_config: Any, naming: str) -> dict[str, _Module]:
    """Every torch Linear of ``naming`` that the family's rule table writes into a Flax kernel, by name."""
    loop = model_config.replace(scan_blocks=False)
    table, star = _conversion(model_config).rules(loop, naming, for_export=True)
    out = {}
    for r in table:
        if not r.flax.endswith("/kernel"):
            continue
        for j, key in enumerate(r.torch_keys):
            if not key.endswith(".weight"):
                continue
            name = key[: -len(".weight")]
            copies = tuple(name.replace("{*}", str(i)) for i in range(star)) if "{*}" in name else (name,)
            out[copies[0]] = _Module(copies[0], copies, r.flax, r, j)
    return out


class _Probes:
    """``_PartMap``s of rule parts, computed by running a rule's ``to_torch`` on an index array (cached per
    transform and kernel shape: the blocks of a table share their transforms)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.cache: dict[tuple, list[_PartMap | None]] = {}

    def layout(self, flax: str) -> lora.KernelLayout:
        bias = flax[: -len("kernel")] + "bias"
        return lora.kernel_layout(flax, self.shapes[flax], self.shapes.get(bias))

    def part(self, m: _Module) -> _PartMap:
        layout = self.layout(m.flax)
        shape = tuple(self.shapes[m.flax])
        key = (id(m.rule.to_torch), shape, layout.groups)
        if key not in self.cache:
            size = int(np.prod(shape, dtype=np.int64))
            idx = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(shape)
            parts = m.rule.to_torch(idx)
            self.cache[key] = [self._map(t, layout) for t in (parts if isinstance(parts, tuple) else (parts,))]
        found = self.cache[key][m.part]
        if found is None:
            raise ConversionError(f"{m.name} ({m.flax}) is not a Linear layer: LoRA adapts Linear weights only")
        return found

    @staticmethod
    def _map(t: np.ndarray, layout: lora.KernelLayout) -> _PartMap | None:
        t = np.asarray(t)
        if t.ndim != 2:
            return None
        ins, outs = t // layout.out_size, t % layout.out_size
        in_index, out_index = ins[0], outs[:, 0]
        separable = (ins == in_index[None]).all() and (outs == out_index[:, None]).all()
        if not separable or not np.array_equal(np.sort(in_index), np.arange(layout.in_size)):
            return None
        out_g = layout.out_size // layout.groups
        return _PartMap(in_index, out_index // out_g, out_index % out_g)


def _host(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _host(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


# ---- export ------------------------------------------------------------------------------------------------------


def _check_format(format: str, naming: str | None) -> str:
    if format not in FORMATS:
        raise ValueError(f"LoRA format={format!r} is invalid: expected one of {FORMATS}")
    naming = naming or DEFAULT_NAMING[format]
    if naming not in ("original", "diffusers"):
        raise ValueError(f"LoRA naming={naming!r} is invalid: expected 'original' or 'diffusers'")
    return naming


def _kohya_name(name: str) -> str:
    return KOHYA_PREFIX + name.replace(".", "_")


def to_state_dict(
    model_config: Any,
    adapters: Mapping[str, Any],
    config: lora.LoraConfig,
    *,
    format: str = "peft",
    naming: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Adapters → ``(tensors, safetensors metadata)`` of a ``peft`` or ``kohya`` LoRA file.

    ``naming``: the model's torch names the file uses, ``"diffusers"`` or ``"original"`` (default: diffusers for
    peft, original for kohya). ``adapters`` may be in the looped or the scanned layout of ``model_config``.
    """
    naming = _check_format(format, naming)
    adapters = lora.set_scan(model_config, _host(adapters), False)
    modules = _modules(model_config, naming)
    by_flax: dict[str, list[_Module]] = {}
    for m in modules.values():
        by_flax.setdefault(m.flax, []).append(m)
    probes = _Probes(expected_shapes(model_config))
    alpha = float(config.rank if config.alpha is None else config.alpha)
    r = config.rank
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for path in lora.adapter_paths(adapters):
        if path not in by_flax:
            raise ConversionError(
                f"the adapter of {path} has no Linear layer in the {naming} format of this "
                f"{family_of(model_config).display_name}"
            )
        node = lora._get(adapters, lora.module_path(path))
        a, b = node["lora_a"], node["lora_b"]
        shape_a, shape_b = probes.layout(path).adapter_shapes(r)
        if a.shape != shape_a or b.shape != shape_b:
            raise ConversionError(
                f"the adapter of {path} has lora_a {a.shape}, lora_b {b.shape}; rank {r} needs {shape_a}, {shape_b}"
            )
        for m in by_flax[path]:
            pm = probes.part(m)
            groups = pm.groups()
            if not any(a[g].any() or b[g].any() for g in groups):
                continue  # nothing to write for this Linear
            shared = all(np.array_equal(a[g], a[groups[0]]) for g in groups)
            n = 1 if shared else len(groups)
            down = a[groups[0]][pm.in_index].T if shared else np.concatenate([a[g][pm.in_index].T for g in groups])
            up = np.zeros((len(pm.out_group), n * r), np.float32)
            for j, g in enumerate(groups):
                rows = pm.rows(g)
                cols = slice(0, r) if shared else slice(j * r, (j + 1) * r)
                up[rows, cols] = b[g][:, pm.out_pos[rows]].T
            for name in m.copies:
                ranks[name] = n * r
                if format == "peft":
                    tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(down)
                    tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = up
                else:
                    k = _kohya_name(name)
                    tensors[f"{k}.lora_down.weight"] = np.ascontiguousarray(down)
                    tensors[f"{k}.lora_up.weight"] = up
                    tensors[f"{k}.alpha"] = np.asarray(alpha * n, np.float32)
    if format == "peft":
        extra = {k: v for k, v in ranks.items() if v != r}
        meta = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(ranks),
            "rank_pattern": extra,
            "alpha_pattern": {k: alpha * v / r for k, v in extra.items()},
        }
        metadata = {METADATA_KEY: json.dumps({PEFT_PREFIX + k: v for k, v in meta.items()}, indent=2, sort_keys=True)}
    else:
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(alpha)}
    return tensors, metadata


def save_lora(
    path: str | os.PathLike,
    model_config: Any,
    adapters: Mapping[str, Any],
    config: lora.LoraConfig,
    *,
    format: str = "peft",
    naming: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters as a ``.safetensors`` LoRA file (``to_state_dict``), atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file is written as .safetensors")
    tensors, metadata = to_state_dict(model_config, adapters, config, format=format, naming=naming)
    if not tensors:
        raise ValueError("the adapters are all zero: nothing to write")
    with atomic_path(path, is_dir=False, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    return path


# ---- import ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Factors:
    down: np.ndarray | None = None  # (R, in)
    up: np.ndarray | None = None  # (out, R)
    alpha: float | None = None


def _parse(state_dict: Mapping[str, np.ndarray], source: str) -> tuple[str, dict[str, _Factors]]:
    """``(format, {file module name: factors})``; text-encoder keys are skipped with a warning."""
    peft, kohya, other, skipped = {}, {}, [], []
    for key, value in state_dict.items():
        if _TEXT_ENCODER.match(key):
            skipped.append(key)
        elif m := _KOHYA_KEY.match(key):
            kohya[key] = (m["module"], m["kind"], value)
        elif m := _PEFT_KEY.match(key):
            peft[key] = (m["module"], m["kind"], value)
        else:
            other.append(key)
    if skipped:
        warnings.warn(
            f"{source}: {len(skipped)} text-encoder LoRA keys are not loaded (e.g. {skipped[0]})", stacklevel=3
        )
    if other or (peft and kohya) or not (peft or kohya):
        why = f"keys of neither kind: {sorted(other)[:8]}" if other else "no LoRA keys" if not peft else "both kinds"
        raise ConversionError(
            f"{source}: not a LoRA file in the peft (NAME.lora_A.weight/lora_B.weight) or kohya "
            f"(lora_unet_NAME.lora_down.weight/lora_up.weight/alpha) format: {why}"
        )
    fmt, found = ("kohya", kohya) if kohya else ("peft", peft)
    out: dict[str, _Factors] = {}
    for module, kind, value in found.values():
        f = out.setdefault(module, _Factors())
        if kind == "alpha":
            f.alpha = float(np.asarray(value).reshape(-1)[0])
        elif kind in ("lora_A.weight", "lora_down.weight"):
            f.down = np.asarray(value, np.float32)
        else:
            f.up = np.asarray(value, np.float32)
    return fmt, out


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _match_names(
    model_config: Any, fmt: str, names: list[str], naming: str | None, source: str
) -> tuple[str, dict[str, _Module]]:
    """The naming whose module table holds every name of the file → ``(naming, {file name: module})``."""
    best: tuple[int, str, dict[str, _Module], list[str]] | None = None
    for candidate in (naming,) if naming else ("diffusers", "original"):
        try:
            table = _modules(model_config, candidate)
        except (ConversionError, ValueError):  # a naming this model cannot be written in
            continue
        lookup: dict[str, _Module] = {}
        for m in table.values():
            for c in m.copies:
                lookup[c if fmt == "peft" else c.replace(".", "_")] = m
        found = {n: lookup.get(_strip(n, _PEFT_PREFIXES if fmt == "peft" else _KOHYA_PREFIXES)) for n in names}
        missing = [n for n, m in found.items() if m is None]
        if not missing:
            return candidate, found
        if best is None or len(found) > best[0]:
            best = (len(found), candidate, found, missing)
    display = family_of(model_config).display_name
    if best is None:
        raise ConversionError(f"{source}: this {display} has no torch naming to match LoRA modules against")
    raise ConversionError(
        f"{source}: {len(best[3])} LoRA module(s) match no Linear layer of this {display} (closest: its {best[1]} "
        f"names): {sorted(best[3])[:10]}"
    )


def _peft_alphas(metadata: Mapping[str, Any] | None) -> tuple[int | None, float | None, dict, dict]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)`` of a peft/diffusers adapter config (prefixes removed)."""
    if not metadata:
        return None, None, {}, {}
    meta = {_strip(k, ("transformer.",)): v for k, v in metadata.items()}
    r, alpha = meta.get("r"), meta.get("lora_alpha")
    return (
        None if r is None else int(r),
        None if alpha is None else float(alpha),
        dict(meta.get("rank_pattern") or {}),
        dict(meta.get("alpha_pattern") or {}),
    )


def _pattern_value(pattern: Mapping[str, Any], name: str) -> Any:
    """peft's rank/alpha patterns: a key is the module name or a suffix of it (by dots)."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return None


def from_state_dict(
    state_dict: Mapping[str, Any],
    model_config: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    naming: str | None = None,
    source: str = "LoRA state dict",
) -> tuple[lora.LoraConfig, dict[str, Any]]:
    """A peft or kohya LoRA state dict → ``(LoraConfig, adapters)`` for ``model_config`` (its layout).

    ``metadata``: a peft/diffusers adapter config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``; keys
    may carry diffusers' ``transformer.`` prefix). ``alpha`` overrides every stored alpha. ``naming``: the model's
    torch names the file uses (default: whichever matches every module).
    """
    state_dict = {k: io.to_float32(v) for k, v in state_dict.items()}
    fmt, factors = _parse(state_dict, source)
    naming, matched = _match_names(model_config, fmt, sorted(factors), naming, source)
    r_meta, alpha_meta, _, alpha_pattern = _peft_alphas(metadata if fmt == "peft" else None)

    # one entry per torch Linear (copies of a per-block copied Linear must agree)
    by_module: dict[str, tuple[_Module, _Factors, str]] = {}
    for name, f in sorted(factors.items()):
        if f.down is None or f.up is None:
            raise ConversionError(f"{source}: LoRA module {name} lacks its {'down/A' if f.down is None else 'up/B'}")
        if f.down.ndim != 2 or f.up.ndim != 2 or f.up.shape[1] != f.down.shape[0]:
            raise ConversionError(f"{source}: {name}: down {f.down.shape} and up {f.up.shape} are not LoRA factors")
        m = matched[name]
        if m.name in by_module:
            other = by_module[m.name][1]
            if not (np.array_equal(other.down, f.down) and np.array_equal(other.up, f.up)):
                raise ConversionError(f"{source}: the per-block copies of {m.name} differ ({name}); they are one layer")
            continue
        by_module[m.name] = (m, f, name)

    def module_alpha(m: _Module, f: _Factors) -> float:
        if alpha is not None:
            return float(alpha)
        if f.alpha is not None:
            return f.alpha
        found = _pattern_value(alpha_pattern, m.name)
        if found is not None:
            return float(found)
        return alpha_meta if alpha_meta is not None else float(f.down.shape[0])

    ranks = [f.down.shape[0] for _, f, _ in by_module.values()]
    r = r_meta if r_meta is not None and r_meta in ranks else min(ranks)
    scales = {n: module_alpha(m, f) / f.down.shape[0] for n, (m, f, _) in by_module.items()}
    ref = next((n for n, (m, f, _) in by_module.items() if f.down.shape[0] == r), None)
    scale = scales[ref] if ref is not None else next(iter(scales.values()))
    uneven = {n: s for n, s in scales.items() if not np.isclose(s, scale, rtol=1e-6, atol=0)}
    if uneven:
        raise ConversionError(
            f"{source}: LoRA modules have different scales alpha/rank (e.g. {dict(list(uneven.items())[:3])} vs "
            f"{scale}); a dit_jax adapter has one scale"
        )
    alpha_out = module_alpha(*by_module[ref][:2]) if ref is not None else scale * r

    probes = _Probes(expected_shapes(model_config))
    adapters: dict[str, Any] = {}
    filled: dict[str, np.ndarray] = {}  # kernel path → covered (group, position) mask
    for m, f, file_name in (by_module[k] for k in sorted(by_module)):
        layout = probes.layout(m.flax)
        pm = probes.part(m)
        groups = pm.groups()
        big_r = f.down.shape[0]
        n = 1 if big_r == r else big_r // r if big_r % r == 0 and big_r // r == len(groups) else 0
        if not n:
            raise ConversionError(
                f"{source}: {file_name} has rank {big_r}; this adapter's rank is {r} (or {len(groups)}·{r} for a "
                f"Linear of {len(groups)} stacked projections)"
            )
        if f.down.shape[1] != len(pm.in_index) or f.up.shape[0] != len(pm.out_group):
            raise ConversionError(
                f"{source}: {file_name}: down {f.down.shape}, up {f.up.shape} do not fit the Linear "
                f"({len(pm.out_group)}, {len(pm.in_index)}) of {m.flax}"
            )
        node = lora._get(adapters, lora.module_path(m.flax)) if _has(adapters, m.flax) else None
        if node is None:
            shape_a, shape_b = layout.adapter_shapes(r)
            node = {"lora_a": np.zeros(shape_a, np.float32), "lora_b": np.zeros(shape_b, np.float32)}
            lora._set(adapters, lora.module_path(m.flax), node)
            filled[m.flax] = np.zeros((layout.groups, layout.out_size // layout.groups), bool)
        for j, g in enumerate(groups):
            rows = pm.rows(g)
            cols = slice(0, r) if n == 1 else slice(j * r, (j + 1) * r)
            if n > 1 and np.delete(f.up[rows], np.arange(cols.start, cols.stop), axis=1).any():
                raise ConversionError(
                    f"{source}: {file_name} has rank {big_r} = {n}·{r} but its up/B is not block-diagonal over the "
                    f"{n} stacked projections"
                )
            node["lora_a"][g][pm.in_index] = f.down[cols].T
            node["lora_b"][g][:, pm.out_pos[rows]] = f.up[rows, cols].T
            filled[m.flax][g, pm.out_pos[rows]] = True
    for path, mask in filled.items():
        partial = [g for g in range(mask.shape[0]) if mask[g].any() and not mask[g].all()]
        if partial:
            raise ConversionError(
                f"{source}: the LoRA modules of {path} cover only part of its output slices {partial}"
            )
    if model_config.scan_blocks:
        adapters = lora.set_scan(model_config, adapters, True)
    targets = sorted({_target(p) for p in filled})
    return lora.LoraConfig(rank=int(r), alpha=alpha_out, targets=tuple(targets)), adapters


def _has(tree: Mapping, path: str) -> bool:
    try:
        return set(lora._get(tree, lora.module_path(path))) == set(lora.ADAPTER_KEYS)
    except KeyError:
        return False


def _target(path: str) -> str:
    """A target pattern for a looped kernel path that also matches its scanned stage."""
    m = re.match(r"^blocks_\d+/(.*)$", path)
    return r"^(blocks|stage)_\d+/" + re.escape(m[1]) + "$" if m else "^" + re.escape(path) + "$"


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """``(tensors, adapter config or None, source)`` of a LoRA ``.safetensors`` file or a folder holding one
    (diffusers ``pytorch_lora_weights.safetensors``, peft ``adapter_model.safetensors`` + ``adapter_config.json``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    config_file = None
    if path.is_dir():
        found = [path / n for n in _FILE_NAMES if (path / n).exists()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ConversionError(f"{path}: expected one LoRA .safetensors file in the folder, found {found}")
        config_file = path / "adapter_config.json"
        path = found[0]
    elif (path.parent / "adapter_config.json").exists():
        config_file = path.parent / "adapter_config.json"
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: LoRA files are read from .safetensors")
    tensors = io.read_safetensors(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
    adapter_config = None
    if METADATA_KEY in meta:
        try:
            adapter_config = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: metadata {METADATA_KEY} is not JSON: {e}") from e
    elif config_file is not None and config_file.exists():
        adapter_config = read_json(config_file, error=ConversionError)
    return tensors, adapter_config, str(path)


def load_lora(
    path: str | os.PathLike, model_config: Any, *, alpha: float | None = None, naming: str | None = None
) -> tuple[lora.LoraConfig, dict[str, Any]]:
    """Read a peft or kohya LoRA file for ``model_config`` → ``(LoraConfig, adapters)``; see ``from_state_dict``."""
    tensors, adapter_config, source = read_lora_file(path)
    return from_state_dict(tensors, model_config, metadata=adapter_config, alpha=alpha, naming=naming, source=source)


# ---- training runs -----------------------------------------------------------------------------------------------


def read_run(workdir: str, step: int | None = None, *, ema: bool = True) -> tuple[Any, lora.LoraConfig, Any, dict]:
    """``(model_config, LoraConfig, adapters, base)`` of a LoRA training run's checkpoint (default: the latest);
    ``base`` is the reference to its frozen weights the checkpoint recorded (``model_dir``; ``workdir`` + ``step``
    + ``use_ema``; or the ``seed`` of a fresh init)."""
    import jax
    import orbax.checkpoint as ocp

    from dit_jax.models import abstract_params
    from dit_jax.runs import _manager, unbox_abstract, with_shardings

    step, model_config, settings, base = _run_lora_metadata(workdir, step)
    lora_config = lora.resolve(lora.LoraConfig.from_dict(settings), model_config)
    abstract = jax.eval_shape(
        lambda p: lora.init_lora(p, lora_config, jax.random.key(0)), unbox_abstract(abstract_params(model_config))
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    item = "ema_params" if ema else "params"
    manager = _manager(workdir, read_only=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    manager.close()
    return model_config, lora_config, _host(restored[item]), base


def _run_lora_metadata(workdir: str, step: int | None) -> tuple[int, Any, dict[str, Any], dict[str, Any]]:
    """``(step, model_config, LoRA settings, base reference)`` of a LoRA run's checkpoint, read from its JSON."""
    from dit_jax.runs import checkpoint_dir, run_config

    step, model_config, config = run_config(workdir, step)
    item_file = Path(checkpoint_dir(workdir)) / str(step) / "lora" / "metadata"
    saved = read_json(item_file) if item_file.exists() else {}
    settings = saved.get("config") or dict(config.get("lora") or {})
    if not settings.get("rank"):
        raise ValueError(f"{workdir}: checkpoint {step} is not a LoRA run (config.lora.rank is 0)")
    return step, model_config, settings, saved.get("base") or {"seed": config.get("seed", 0)}


def describe_merge(workdir: str, step: int | None = None) -> str:
    """In words, the frozen weights a LoRA run's checkpoint merges its adapters into (for logs and messages)."""
    _, _, settings, base = _run_lora_metadata(workdir, step)
    if "model_dir" in base:
        where = f"model directory {base['model_dir']}"
    elif "workdir" in base:
        kind = "EMA" if base.get("use_ema", True) else "raw"
        where = f"run {base['workdir']} (checkpoint {base.get('step', 'latest')}, {kind})"
    else:
        where = f"a fresh init (seed {base['seed']})"
    return f"rank {settings['rank']} LoRA adapters merged into {where}"


def merged_run(workdir: str, step: int | None = None, *, ema: bool = True) -> tuple[Any, dict[str, Any]]:
    """``(model_config, params)`` a LoRA run samples with: its (EMA) adapters merged into the base it recorded, in
    the looped layout without remat (as ``python -m dit_jax.train.export`` writes a run)."""
    import jax

    from dit_jax.checkpoint import load_model
    from dit_jax.models import init_params, set_scan
    from dit_jax.runs import host_params, load_ema_params

    model_config, config, adapters, base = read_run(workdir, step, ema=ema)
    if "model_dir" in base:
        src_config, params = load_model(base["model_dir"])
    elif "workdir" in base:
        item = "ema_params" if base.get("use_ema", True) else "params"
        src_config, params = load_ema_params(base["workdir"], base.get("step"), item=item)
    else:  # a fresh init, as the trainer makes it from the seed
        src_config = model_config
        params = init_params(model_config, jax.random.split(jax.random.key(int(base["seed"])))[0])
    if type(src_config) is not type(model_config):
        raise ValueError(f"{workdir}: its base {base} holds a {type(src_config).__name__}, not a LoRA run's model")
    src_config, params = set_scan(src_config, host_params(params), False)
    loop = model_config.replace(scan_blocks=False, remat="none")
    _, params = family_of(model_config).adapt_params(src_config, params, loop)
    merged = lora.apply_lora(params, lora.set_scan(model_config, adapters, False), config)
    return loop, _host(merged)


def export_run(
    workdir: str,
    out: str | os.PathLike,
    *,
    format: str = "peft",
    naming: str | None = None,
    step: int | None = None,
    ema: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a LoRA run's (EMA) adapters as a peft or kohya ``.safetensors`` file."""
    model_config, config, adapters, _ = read_run(workdir, step, ema=ema)
    return save_lora(out, model_config, adapters, config, format=format, naming=naming, overwrite=overwrite)
