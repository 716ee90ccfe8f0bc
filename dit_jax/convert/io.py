"""Checkpoint files: read torch/safetensors/diffusers weights as float32 numpy, write them back atomically.

Readers return ``(state_dict, diffusers_config, source)``: a flat ``{key: np.ndarray}``, the ``config.json`` of a
diffusers model folder (or ``None``) and a name for error messages. ``.safetensors`` files are read without torch
(bf16/fp8 through ``ml_dtypes``); ``.pt/.pth/.bin`` need torch and are loaded with ``weights_only=True``.
"""

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from dit_jax.convert.rules import ConversionError
from dit_jax.files import atomic_path, read_json

Array = np.ndarray
StateDict = dict[str, Array]

WEIGHTS = ("ema", "model")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_DIFFUSERS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# safetensors dtype names → numpy dtypes (numpy has no bf16/fp8: ml_dtypes provides them).
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_LOW_FLOATS = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def to_float32(x: Any) -> Array:
    """Floating arrays or torch tensors of any precision (incl. bf16/fp8) → float32 numpy; others keep their dtype."""
    if hasattr(x, "detach"):  # a torch tensor (numpy has no bfloat16 view of one: convert on the torch side)
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype in _LOW_FLOATS:
        return x.astype(np.float32)
    return x


# ---- reading -----------------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[int, Any]:
    """``(header length, parsed JSON header)`` of a ``.safetensors`` file; ValueError when it cannot be one."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= os.path.getsize(path) - 8:
            raise ValueError(f"header length {size} does not fit the file")
        return size, json.loads(f.read(size))


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a ``.safetensors`` file, from its header alone ([] if it is not one)."""
    try:
        _, header = _safetensors_header(Path(path))
    except (OSError, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def read_safetensors(path: str | os.PathLike, *, convert: bool = True) -> StateDict:
    """A ``.safetensors`` file → float32 numpy arrays, without torch. The file is memory-mapped and read tensor by
    tensor (a 24 GB bf16 checkpoint costs its float32 copy, not another 24 GB of bytes first). ``convert=False``:
    read-only memory-mapped arrays in the stored dtype (no copy; ``to_float32`` converts one when it is used).
    Truncated/corrupt files raise naming the file."""
    path = Path(path)

    def corrupt(why: str) -> ConversionError:
        return ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {why}")

    try:
        size, header = _safetensors_header(path)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if os.path.getsize(path) > 8 + size else None
    except FileNotFoundError:
        raise
    except Exception as e:  # bad JSON, unreadable file, …
        raise corrupt(str(e)) from e
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    out: StateDict = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _ST_DTYPES.get(spec["dtype"]), tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"bad entry for tensor {name!r}: {spec!r}") from e
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes or end > (0 if data is None else data.size):
            raise corrupt(f"tensor {name!r} ({spec['dtype']} {list(shape)}) lies outside the data")
        raw = data[begin:end] if nbytes else np.zeros(0, np.uint8)
        tensor = raw.view(dtype).reshape(shape)
        out[name] = to_float32(tensor) if convert else tensor
    return out


def _torch_load(path: Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install 'dit-jax[torch]'); .safetensors does not") from e
    try:
        # DiT training checkpoints store their argparse Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # RuntimeError (zip), UnpicklingError, EOFError, …
        raise ConversionError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt? or holding Python objects that "
            f"torch.load(weights_only=True) refuses): {e}"
        ) from e


def _is_tensor_dict(d: Mapping) -> bool:
    return bool(d) and all(hasattr(v, "shape") for v in d.values())


def unwrap(obj: Any, weights: str = "ema", *, source: str = "checkpoint") -> Mapping[str, Any]:
    """Pick the weights out of a training checkpoint.

    Wrappers: DiT ``{"model", "ema", "opt", "args"}`` (``weights`` picks ``"ema"`` or ``"model"``), DeepSpeed model
    states ``{"module", "ema", ...}`` (``"model"`` picks ``"module"``), PixArt
    ``{"state_dict", "state_dict_ema", ...}`` (``"state_dict_ema"`` is the EMA; a file with only ``"state_dict"``
    holds one set of weights and is used for either choice). A bare state dict is returned as is.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is invalid: expected one of {WEIGHTS}")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    if _is_tensor_dict(obj):
        return obj
    nested = {k for k, v in obj.items() if isinstance(v, Mapping)}
    if "module" in nested and "model" not in nested:  # DeepSpeed model states: "module" is the model, "ema" the EMA
        key = "ema" if weights == "ema" else "module"
        if key not in nested:
            raise ConversionError(
                f"{source}: weights={weights!r} requested but the checkpoint has no {key!r} entry; "
                f"available keys: {sorted(obj)}"
            )
        return unwrap(obj[key], weights, source=f"{source}[{key!r}]")
    if {"ema", "model"} & nested:
        if weights not in nested:
            raise ConversionError(
                f"{source}: weights={weights!r} requested but the checkpoint has no {weights!r} entry; "
                f"available keys: {sorted(obj)}"
            )
        return unwrap(obj[weights], weights, source=f"{source}[{weights!r}]")
    if "state_dict" in nested or "state_dict_ema" in nested:
        key = "state_dict_ema" if weights == "ema" and "state_dict_ema" in nested else "state_dict"
        if key not in nested:
            raise ConversionError(
                f"{source}: weights={weights!r} requested but the checkpoint has no 'state_dict'; "
                f"available keys: {sorted(obj)}"
            )
        return unwrap(obj[key], weights, source=f"{source}[{key!r}]")
    raise ConversionError(
        f"{source}: no state dict found: expected tensors or one of the wrappers 'ema'/'model'/'state_dict'; "
        f"top-level keys: {sorted(obj)[:20]}"
    )


def read_torch(path: str | os.PathLike, weights: str = "ema") -> StateDict:
    """A ``.pt/.pth/.bin`` file (``torch.load(weights_only=True)``) → float32 numpy arrays, unwrapping EMA/model."""
    path = Path(path)
    sd = unwrap(_torch_load(path), weights, source=str(path))
    out: StateDict = {}
    for k, v in sd.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        out[k] = v.numpy()
    return out


def read_sharded(index: str | os.PathLike, weights: str = "ema", *, convert: bool = True) -> StateDict:
    """Sharded weights from a ``*.index.json`` (``{"weight_map": {key: shard_file}}``) beside its shards."""
    index = Path(index)
    weight_map = read_json(index, error=ConversionError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: not a valid shard index (expected a JSON 'weight_map')")
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.exists():
            raise ConversionError(f"{index}: shard {shard} listed in the index does not exist")
        out.update(read_file(shard_path, weights, convert=convert))
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise ConversionError(f"{index}: keys listed in the index are missing from their shards: {absent[:20]}")
    return out


def read_file(path: str | os.PathLike, weights: str = "ema", *, convert: bool = True) -> StateDict:
    """One weights file by suffix: ``.safetensors``, ``.pt/.pth/.bin/.ckpt``, or a shard ``*.index.json``.
    ``convert=False``: safetensors tensors stay memory-mapped in their stored dtype (``read_safetensors``); torch
    files are read whole as float32 either way."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    name = path.name
    if name.endswith(".index.json"):
        return read_sharded(path, weights, convert=convert)
    if path.suffix == ".safetensors":
        return read_safetensors(path, convert=convert)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path, weights)
    raise ConversionError(
        f"{path}: unknown checkpoint file type; expected .safetensors, {'/'.join(TORCH_SUFFIXES)}, "
        "a *.index.json shard index, or a diffusers model folder"
    )


def _is_diffusers_config(d: Mapping) -> bool:
    return "_class_name" in d or "_diffusers_version" in d


def transformers_model_type(path: str | os.PathLike, subfolders: tuple[str, ...] = ("text_encoder",)) -> str | None:
    """The ``model_type`` of a transformers folder's ``config.json`` (or of the first of ``subfolders`` that has
    one, e.g. a pipeline folder's ``text_encoder/``); None for anything else."""
    path = Path(path)
    if not path.is_dir():
        return None
    for folder in (path, *(path / s for s in subfolders)):
        config = folder / "config.json"
        if config.is_file():
            d = read_json(config, error=ConversionError)
            return None if _is_diffusers_config(d) else d.get("model_type")
    return None


_TRANSFORMERS_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                      "pytorch_model.bin")  # fmt: skip


def _transformers_weights(folder: Path) -> Path:
    for name in _TRANSFORMERS_NAMES:
        if (folder / name).exists():
            return folder / name
    found = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    found = found or sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(found) == 1:
        return found[0]
    what = f"several candidates {[p.name for p in found]}" if found else "none"
    raise ConversionError(
        f"{folder}: expected one transformers weights file (model.safetensors, pytorch_model.bin or a sharded "
        f"*.index.json); found {what}"
    )


def read_transformers(
    path: str | os.PathLike, *, what: str, config_keys: tuple[str, ...], hint: str = "", convert: bool = True
) -> tuple[StateDict, dict | None, str]:
    """``(state_dict, transformers config or None, source name)`` of a transformers model folder, a pipeline folder
    with ``text_encoder/``, or one weights file / shard index (its sibling ``config.json`` is used when present and
    it has one of ``config_keys``; a diffusers config beside a bare file is not the model's). ``what`` names the
    model in errors ("T5", "CLIP"); ``hint`` is added to the not-a-folder error; ``convert``: see ``read_file``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    if path.is_dir():
        folder = path
        if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
            folder = path / "text_encoder"
        if not (folder / "config.json").exists():
            raise ConversionError(
                f"{path}: not a transformers {what} folder (config.json + model.safetensors) nor a pipeline folder "
                f"with text_encoder/{hint}; found {sorted(p.name for p in path.iterdir())[:20]}"
            )
        weights = _transformers_weights(folder)
        config_file: Path | None = folder / "config.json"
    else:
        weights = path
        config_file = path.parent / "config.json" if (path.parent / "config.json").exists() else None
    config = None
    if config_file is not None:
        config = read_json(config_file, error=ConversionError)
        if not any(k in config for k in config_keys):
            config = None
    return read_file(weights, "model", convert=convert), config, str(weights)


def write_transformers_folder(
    path: str | os.PathLike, config: Mapping[str, Any], state_dict: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write a transformers model folder: ``config.json`` + ``model.safetensors`` (float32), atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path, is_dir=True, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file(_contiguous_f32(state_dict), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def _diffusers_weights(folder: Path) -> Path:
    for name in _DIFFUSERS_NAMES:
        for candidate in (folder / f"{name}.index.json", folder / name):
            if candidate.exists():
                return candidate
    found = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if not found:
        found = sorted(folder.glob("*.safetensors")) or sorted(p for s in TORCH_SUFFIXES for p in folder.glob(f"*{s}"))
    if len(found) == 1:
        return found[0]
    what = f"several candidates {[p.name for p in found]}" if found else "none"
    raise ConversionError(
        f"{folder}: expected one diffusers weights file (diffusion_pytorch_model.safetensors, .bin or a sharded "
        f"index); found {what}"
    )


def read_checkpoint(
    path: str | os.PathLike, weights: str = "ema", *, convert: bool = True
) -> tuple[StateDict, dict | None, str]:
    """Any supported source → ``(state_dict, diffusers_config or None, source name)``.

    ``path`` is a weights file, a shard index, a diffusers model folder (``config.json`` + weights), or a diffusers
    pipeline folder whose ``transformer/`` subfolder is the model. ``convert``: see ``read_file``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is invalid: expected one of {WEIGHTS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        folder = path
        if not (folder / "config.json").exists() and (folder / "transformer" / "config.json").exists():
            folder = folder / "transformer"
        config_file = folder / "config.json"
        if not config_file.exists():
            raise ConversionError(
                f"{path}: a folder must be a diffusers model folder (config.json + diffusion_pytorch_model.*) or a "
                f"pipeline folder with transformer/; found {sorted(p.name for p in path.iterdir())[:20]}"
            )
        config = read_json(config_file, error=ConversionError)
        if not _is_diffusers_config(config):
            raise ConversionError(
                f"{config_file}: not a diffusers config (no _class_name); a dit_jax model directory is loaded with "
                "dit_jax.checkpoint.load_model"
            )
        weights_file = _diffusers_weights(folder)
        return read_file(weights_file, weights, convert=convert), config, str(weights_file)
    sd = read_file(path, weights, convert=convert)
    config = None
    sibling = path.parent / "config.json"
    if sibling.exists() and path.name.startswith("diffusion_pytorch_model"):
        candidate = read_json(sibling, error=ConversionError)
        config = candidate if _is_diffusers_config(candidate) else None
    return sd, config, str(path)


# ---- writing -----------------------------------------------------------------------------------------------------


def _contiguous_f32(state_dict: Mapping[str, Any]) -> StateDict:
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_dict.items()}


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write a float32 ``.safetensors`` file (metadata ``format=pt``, as diffusers/transformers expect)."""
    from safetensors.numpy import save_file

    with atomic_path(path, is_dir=False, overwrite=overwrite) as tmp:
        save_file(_contiguous_f32(state_dict), str(tmp), metadata={"format": "pt"})
    return Path(path)


def write_torch(
    path: str | os.PathLike, state_dict: Mapping[str, Any], *, wrap: str | None = None, overwrite: bool = False
) -> Path:
    """Write a ``.pt`` file with ``torch.save``; ``wrap="state_dict"`` stores ``{"state_dict": sd}`` (PixArt)."""
    import torch

    tensors = {k: torch.from_numpy(v.copy()) for k, v in _contiguous_f32(state_dict).items()}
    obj = {wrap: tensors} if wrap else tensors
    with atomic_path(path, is_dir=False, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_diffusers_folder(
    folder: str | os.PathLike, config: Mapping[str, Any], state_dict: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write a diffusers model folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
    from safetensors.numpy import save_file

    with atomic_path(folder, is_dir=True, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file(_contiguous_f32(state_dict), str(tmp / _DIFFUSERS_NAMES[0]), metadata={"format": "pt"})
    return Path(folder)
