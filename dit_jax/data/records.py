"""The on-disk format of precomputed latents: msgpack records in ArrayRecord shards plus a JSON manifest.

Each record is `flax.serialization.msgpack_serialize` of a dict:
  latent_mean     (h, w, c) float16/float32  VAE posterior mean, *unscaled* (the loader applies (z − shift) · scale)
  latent_logvar   (h, w, c)                  posterior log-variance (absent with `--no-logvar`); the loader samples
                                             z = mean + exp(logvar / 2) · ε afresh every time, as DiT's train.py does
  flipped_mean, flipped_logvar               the same for the horizontally flipped image (`--flip both`), so that
                                             random flips happen in pixel space before encoding, as in ADM/DiT
  label           int                        class index (−1 when the source has no labels)
  caption         str                        caption text (caption sources only)
  caption_embedding (L, C), caption_mask (L,)  one T5's output and its mask, when precompute was given a T5 encoder
  condition       {name: array}              a text-to-image model's text condition, when precompute was given the
                                             model (``--model``): e.g. SD3/Flux {context (L, C), pooled (P,)}
  source_index    int                        index of the example in its source
`manifest.json` (written last, atomically) records the settings, every shard file with its record count and
latent shape, and the totals; a shard's own `<shard>.json` marks it complete, which makes precompute resumable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization

from dit_jax.files import read_json, write_json

MANIFEST = "manifest.json"
FORMAT = "dit_jax.latents"
VERSION = 1
_ARRAY_KEYS = (
    "latent_mean",
    "latent_logvar",
    "flipped_mean",
    "flipped_logvar",
    "caption_embedding",
    "caption_mask",
)


def encode_latent_record(record: Mapping[str, Any]) -> bytes:
    """Serialises one latent record (keys as in the module docstring; None values are dropped)."""
    if "latent_mean" not in record:
        raise ValueError("encode_latent_record: a record needs 'latent_mean'")
    out = {}
    for key, value in record.items():
        if value is None:
            continue
        if key in _ARRAY_KEYS:
            value = np.ascontiguousarray(value)
        elif key in ("label", "source_index"):
            value = int(value)
        elif key == "caption":
            value = str(value)
        elif key == "condition":
            if not isinstance(value, Mapping) or not value:
                raise ValueError("encode_latent_record: 'condition' must be a non-empty dict of arrays")
            value = {str(k): np.ascontiguousarray(v) for k, v in value.items()}
        else:
            raise ValueError(
                f"encode_latent_record: unknown key {key!r}; expected one of {_ARRAY_KEYS} or label, "
                "caption, condition, source_index"
            )
        out[key] = value
    return serialization.msgpack_serialize(out)


def decode_latent_record(data: bytes) -> dict[str, Any]:
    """Parses one record; raises ValueError when the bytes are not a valid latent record."""
    try:
        record = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"not a msgpack latent record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("latent_mean"), np.ndarray):
        raise ValueError("not a latent record: no 'latent_mean' array")
    shape = record["latent_mean"].shape
    for key in ("latent_logvar", "flipped_mean", "flipped_logvar"):
        if key in record and getattr(record[key], "shape", None) != shape:
            raise ValueError(
                f"latent record: {key!r} has shape {getattr(record[key], 'shape', None)}, expected {shape}"
            )
    return record


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to `path` via a temporary name and a rename, so readers never see half a file."""
    write_json(path, obj, indent=1, sort_keys=True)


def read_manifest(directory: str) -> dict[str, Any]:
    """Reads and checks `DIRECTORY/manifest.json` of a finished precompute run."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"latents directory {directory!r} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory!r} is not a latents directory written by `python -m dit_jax.data.precompute`"
        )
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    if not manifest.get("complete"):
        raise ValueError(f"{path}: precompute did not finish; run it again with the same arguments to complete it")
    for name in manifest["files"]:
        if not os.path.exists(os.path.join(directory, name)):
            raise FileNotFoundError(f"{path} lists {name!r}, which is missing from {directory!r}")
    return manifest
