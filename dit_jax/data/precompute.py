"""Precompute VAE latents (and optionally caption embeddings) into ArrayRecord shards for the 'latents' source.

    python -m dit_jax.data.precompute --source /data/images | tfds:imagenet2012 --out /data/latents256 \\
        --vae /models/sd-vae-ft-ema --image-size 256 [--batch-size 64] [--flip both] [--buckets] \\
        [--text-encoder /models/pixart_sigma_sdxlvae_T5_diffusers --max-length 300]

Images get the same ADM centre crop as training (or, with `--buckets`, the closest aspect-ratio bucket of base
`--image-size`), are encoded with the Flax VAE with each batch sharded over all local devices, and the posterior
(mean, logvar) is stored unscaled (format: `dit_jax.data.records`); the 'latents' source samples and scales it.
`--flip both` also stores the latents of the mirrored image, so that training flips happen before encoding as in
ADM/DiT. Work is split into shards of `--shard-size` source examples; each shard is written to a temporary name,
renamed when complete and then marked by `<shard>.json`, so a rerun with the same arguments skips finished shards
and redoes only missing or partial ones. With several processes (jax.distributed), process i does shards
i, i + n, ...; `manifest.json` is written last. Unreadable images are counted and skipped.
With `--text-encoder` (a T5 folder with its tokenizer, or a diffusers pipeline folder with text_encoder/ and
tokenizer/; a 'folder' source of image + .txt pairs), each caption's T5 features and mask, padded to `--max-length`
tokens, are stored beside the latents (`dit_jax.encoders.t5.TextEncoder`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dit_jax.data import buckets as buckets_lib
from dit_jax.data import records as records_lib
from dit_jax.data.pipeline import build_source, validate_data_config
from dit_jax.data.sources import SkipCounter
from dit_jax.data.transforms import resize_center_crop, to_model_range

log = logging.getLogger(__name__)

TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
# settings that change the content of the records: a rerun into the same directory must match them
_CONTENT_KEYS = (
    "source", "split", "image_size", "flip", "dtype", "store_logvar", "buckets", "shard_size", "limit", "vae",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "text_encoder",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
    """An image encoder for precompute: `apply(params, images (B, H, W, 3) in [−1, 1]) -> (mean, logvar)`."""

    apply: Callable[[Any, Any], tuple[Any, Any]]
    params: Any = None
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    name: str = ""


def vae_encoder(config: Any, params: Any, name: str = "") -> LatentEncoder:
    """A `LatentEncoder` from a Flax AutoencoderKL (`dit_jax.encoders.vae`) config and params."""
    from dit_jax.encoders.vae import AutoencoderKL

    model = AutoencoderKL(config)
    return LatentEncoder(
        apply=lambda p, x: model.apply({"params": p}, x, method="encode"),
        params=params,
        scaling_factor=float(config.scaling_factor),
        shift_factor=float(config.shift_factor),
        latents_mean=None if config.latents_mean is None else tuple(config.latents_mean),
        latents_std=None if config.latents_std is None else tuple(config.latents_std),
        name=name,
    )


def load_vae_encoder(path: str) -> LatentEncoder:
    """The VAE at `path`: a diffusers AutoencoderKL folder (or pipeline folder with vae/), a weights file, or a
    dit_jax model directory (`dit_jax.checkpoint`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae: {path!r} does not exist")
    diffusers_folder = os.path.exists(os.path.join(path, "config.json")) and any(
        glob.glob(os.path.join(path, "diffusion_pytorch_model*"))
    )
    if os.path.isdir(path) and not diffusers_folder and not os.path.isdir(os.path.join(path, "vae")):
        try:
            from dit_jax import checkpoint
        except ImportError as e:
            raise ValueError(f"--vae: {path!r} is not a diffusers VAE folder (config.json + weights)") from e
        config, params = checkpoint.load_model(path)
        if getattr(config, "family", None) != "vae":
            raise ValueError(f"--vae: {path!r} holds a {getattr(config, 'family', type(config).__name__)!r} model")
        return vae_encoder(config, params, name=os.path.abspath(path))
    from dit_jax.convert.vae import vae_from_torch

    config, params = vae_from_torch(path)
    return vae_encoder(config, params, name=os.path.abspath(path))


@dataclasses.dataclass
class PrecomputeSummary:
    """What a precompute call did: the manifest (None until every shard is done) and the shards it wrote."""

    manifest: dict[str, Any] | None
    written: list[int]
    skipped: int


def _canon(value: Any) -> str:
    """A JSON text that compares equal for equal settings (key order and tuple/list aside)."""
    return json.dumps(value, sort_keys=True)


def _shard_stem(k: int) -> str:
    return f"latents-{k:05d}"


def _shard_done(out_dir: str, k: int) -> dict[str, Any] | None:
    """The marker of shard k if it is complete (marker readable and every file it names present)."""
    try:
        with open(os.path.join(out_dir, _shard_stem(k) + ".json")) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if all(os.path.exists(os.path.join(out_dir, name)) for name in marker.get("files", {})):
        return marker
    return None


class _ShardedEncoder:
    """Jitted encode with the batch sharded over the local devices; pads every call to one fixed batch size."""

    def __init__(self, encoder: LatentEncoder, batch_size: int):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.local_devices()
        mesh = Mesh(np.array(devices), ("data",))
        self.data = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch = math.ceil(batch_size / len(devices)) * len(devices)
        self.params = jax.device_put(encoder.params, replicated)
        self.fn = jax.jit(encoder.apply, in_shardings=(replicated, self.data), out_shardings=(self.data, self.data))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import jax

        means, logvars = [], []
        for start in range(0, len(images), self.batch):
            chunk = images[start : start + self.batch]
            pad = self.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            mean, logvar = self.fn(self.params, jax.device_put(chunk, self.data))
            means.append(np.asarray(mean)[: self.batch - pad])
            logvars.append(np.asarray(logvar)[: self.batch - pad])
        return np.concatenate(means), np.concatenate(logvars)


def precompute_latents(
    source_config: dict[str, Any],
    out_dir: str,
    encoder: LatentEncoder,
    *,
    image_size: int,
    split: str = "train",
    batch_size: int = 32,
    flip: str = "none",
    shard_size: int = 1024,
    dtype: str = "float32",
    store_logvar: bool = True,
    buckets: bool = False,
    limit: int | None = None,
    text_encoder: TextEncoder | None = None,
    text_encoder_name: str = "",
    num_threads: int = 8,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> PrecomputeSummary:
    """Encodes a 'folder' or 'tfds' source (a data config, see `dit_jax.data.pipeline`) into `out_dir`; resumable."""
    import concurrent.futures

    import jax
    from tqdm import tqdm

    if flip not in ("none", "both"):
        raise ValueError(f"flip: {flip!r} is not 'none' or 'both'")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype: {dtype!r} is not 'float32' or 'float16'")
    for key, value in (("batch_size", batch_size), ("shard_size", shard_size), ("num_threads", num_threads)):
        if value < 1:
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    if source_config.get("name") not in ("folder", "tfds"):
        raise ValueError(f"source: precompute reads a 'folder' or 'tfds' source, got {source_config.get('name')!r}")
    cfg = validate_data_config({**source_config, "image_size": image_size, "random_flip": False, "shuffle": False})
    skipped = SkipCounter(f"precompute {cfg['name']}")
    source = build_source(cfg, split, skipped)
    multihost = process_index is None and jax.process_count() > 1
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    table = buckets_lib.buckets_for(image_size) if buckets else None
    has_captions = getattr(source, "layout", None) == "captions"
    if text_encoder is not None and not has_captions:
        raise ValueError("text_encoder: the source has no captions (a 'folder' of image + .txt pairs has)")

    settings = {
        "source": {k: v for k, v in source_config.items() if k not in ("num_threads", "prefetch_buffer_size")},
        "split": split,
        "image_size": image_size,
        "flip": flip,
        "dtype": dtype,
        "store_logvar": store_logvar,
        "buckets": buckets,
        "shard_size": shard_size,
        "limit": limit,
        "vae": encoder.name,
        "scaling_factor": encoder.scaling_factor,
        "shift_factor": encoder.shift_factor,
        "latents_mean": None if encoder.latents_mean is None else list(encoder.latents_mean),
        "latents_std": None if encoder.latents_std is None else list(encoder.latents_std),
        "text_encoder": text_encoder_name if text_encoder is not None else None,
        "has_labels": source.num_classes is not None,
        "num_classes": source.num_classes,
        "has_captions": has_captions,
        "has_embeddings": text_encoder is not None,
    }
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, records_lib.MANIFEST)
    num_examples = source.num_records if limit is None else min(limit, source.num_records)
    num_shards = math.ceil(num_examples / shard_size)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            previous = json.load(f)
        before = previous.get("config", {})
        changed = [k for k in _CONTENT_KEYS if _canon(before.get(k)) != _canon(settings[k])]
        if changed:
            k = changed[0]
            raise ValueError(
                f"{out_dir!r} holds latents made with {k}={before.get(k)!r}, now {k}={settings[k]!r}; "
                "use another --out directory or the same settings"
            )
        if previous.get("num_examples") != num_examples:
            raise ValueError(
                f"{out_dir!r} holds latents of {previous.get('num_examples')} source examples, but the source now "
                f"has {num_examples}; use another --out directory"
            )
    header = {"format": records_lib.FORMAT, "version": records_lib.VERSION, "complete": False, "config": settings,
              "num_examples": num_examples, "num_shards": num_shards}  # fmt: skip
    if process_index == 0 and not all(_shard_done(out_dir, k) for k in range(num_shards)):
        records_lib.write_json_atomic(manifest_path, header)  # readers see "incomplete" until the end

    mine = [k for k in range(process_index, num_shards, process_count) if _shard_done(out_dir, k) is None]
    pending = sum(min(num_examples, (k + 1) * shard_size) - k * shard_size for k in mine)
    encode = _ShardedEncoder(encoder, batch_size * (2 if flip == "both" else 1)) if mine else None
    store = np.float16 if dtype == "float16" else np.float32

    def read(index: int) -> dict[str, Any] | None:
        got = source.read(index)
        if got is None:
            return None
        pil, extras = got
        h, w = (image_size, image_size)
        if table is not None:
            h, w = table[buckets_lib.closest_bucket(pil.size[1], pil.size[0], table)]
        try:
            arr = resize_center_crop(pil, h, w)
        except Exception as e:
            skipped.skip(source.describe(index), e)
            return None
        return {"image": arr, "index": index, **extras}

    def write_shard(k: int, pool: concurrent.futures.Executor, bar: tqdm) -> None:
        stem = _shard_stem(k)
        for pattern in (stem + ".*", stem + "-*"):  # files of a partial earlier attempt
            for stale in glob.glob(os.path.join(out_dir, pattern)):
                os.remove(stale)
        from array_record.python.array_record_module import ArrayRecordWriter

        writers: dict[tuple[int, int], tuple[str, str, Any]] = {}
        counts: dict[tuple[int, int], int] = {}
        shapes: dict[tuple[int, int], list[int]] = {}
        pending_items: dict[tuple[int, int], list[dict[str, Any]]] = {}
        skipped_before = skipped.count

        def flush(key: tuple[int, int]) -> None:
            items = pending_items.pop(key, [])
            if not items:
                return
            images = np.stack([to_model_range(it["image"]) for it in items])
            if flip == "both":
                images = np.concatenate([images, images[:, :, ::-1]])
            mean, logvar = encode(images)
            emb = mask = None
            if text_encoder is not None:
                emb, mask = text_encoder([str(it["caption_text"]) for it in items])
                emb, mask = np.asarray(emb), np.asarray(mask)
            if key not in writers:
                name = f"{stem}.array_record" if table is None else f"{stem}-{key[0]}x{key[1]}.array_record"
                tmp = os.path.join(out_dir, f"{name}.tmp-{os.getpid()}")
                writers[key] = (name, tmp, ArrayRecordWriter(tmp, "group_size:1"))
                counts[key] = 0
                shapes[key] = list(mean.shape[1:])
            writer = writers[key][2]
            n = len(items)
            for i, it in enumerate(items):
                record = {
                    "latent_mean": mean[i].astype(store),
                    "latent_logvar": logvar[i].astype(store) if store_logvar else None,
                    "flipped_mean": mean[n + i].astype(store) if flip == "both" else None,
                    "flipped_logvar": logvar[n + i].astype(store) if flip == "both" and store_logvar else None,
                    "label": int(it["y"]) if "y" in it else None,
                    "caption": str(it["caption_text"]) if "caption_text" in it else None,
                    "caption_embedding": None if emb is None else emb[i].astype(store),
                    "caption_mask": None if mask is None else mask[i].astype(np.int32),
                    "source_index": it["index"],
                }
                writer.write(records_lib.encode_latent_record(record))
            counts[key] += n
            bar.update(n)

        indices = range(k * shard_size, min(num_examples, (k + 1) * shard_size))
        chunk = max(batch_size, 64)
        for start in range(0, len(indices), chunk):
            got = list(pool.map(read, indices[start : start + chunk]))
            bar.update(sum(item is None for item in got))
            for item in got:
                if item is None:
                    continue
                key = item["image"].shape[:2]
                pending_items.setdefault(key, []).append(item)
                if len(pending_items[key]) == batch_size:
                    flush(key)
        for key in list(pending_items):
            flush(key)
        files = {}
        for key, (name, tmp, writer) in writers.items():
            writer.close()
            os.replace(tmp, os.path.join(out_dir, name))
            files[name] = {"records": counts[key], "shape": shapes[key]}
        marker = {"files": files, "examples": len(indices), "skipped": skipped.count - skipped_before}
        records_lib.write_json_atomic(os.path.join(out_dir, stem + ".json"), marker)

    if mine:
        log.info("precompute: %d of %d shards to write in %s", len(mine), num_shards, out_dir)
    with (
        concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
        tqdm(total=pending, unit="img", desc="precompute", disable=not progress or process_index != 0) as bar,
    ):
        for k in mine:
            write_shard(k, pool, bar)

    if multihost:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dit_jax.data.precompute")
    markers = [_shard_done(out_dir, k) for k in range(num_shards)]
    manifest = None
    if all(m is not None for m in markers) and (process_index == 0 or not multihost):
        files = {name: info for m in markers for name, info in m["files"].items()}
        manifest = {
            **header,
            "complete": True,
            "files": files,
            "num_records": sum(info["records"] for info in files.values()),
            "num_skipped": sum(m["skipped"] for m in markers),
        }
        records_lib.write_json_atomic(manifest_path, manifest)
        log.info("precompute: %d records in %s (%d unreadable skipped)", manifest["num_records"], out_dir,
                 manifest["num_skipped"])  # fmt: skip
    elif not all(m is not None for m in markers):
        log.info("precompute: shards %s are still to do (other processes or a rerun)",
                 [k for k, m in enumerate(markers) if m is None])  # fmt: skip
    return PrecomputeSummary(manifest=manifest, written=mine, skipped=skipped.count)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dit_jax.data.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="an image folder, or tfds:NAME (e.g. tfds:imagenet2012)")
    p.add_argument("--out", required=True, help="output directory (created; rerun with the same arguments to resume)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, weights file, or dit_jax model dir")
    p.add_argument("--image-size", type=int, required=True, help="crop size (base size with --buckets), multiple of 8")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode call (all local devices)")
    p.add_argument("--flip", choices=("none", "both"), default="none", help="'both' also stores mirrored latents")
    p.add_argument("--split", default="train", help="TFDS split")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--layout", choices=("auto", "classes", "captions"), default="auto", help="image folder layout")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of base --image-size")
    p.add_argument("--shard-size", type=int, default=1024, help="source examples per shard")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    p.add_argument("--no-logvar", action="store_true", help="store only the posterior mean (half the disk)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N examples")
    p.add_argument("--num-threads", type=int, default=8, help="image reading threads")
    p.add_argument("--text-encoder", default=None, help="T5 folder (+ tokenizer) or pipeline folder: caption features")
    p.add_argument("--max-length", type=int, default=300, help="caption tokens (PixArt-α 120, PixArt-Σ 300)")
    p.add_argument("--text-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="T5 compute dtype")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> PrecomputeSummary:
    """Command-line entry point (arguments as `python -m dit_jax.data.precompute --help` lists)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source.startswith("tfds:"):
        source = {"name": "tfds", "tfds_name": args.source[5:], "data_dir": args.data_dir}
    else:
        source = {"name": "folder", "path": os.path.abspath(args.source), "layout": args.layout}
    text_encoder = None
    if args.text_encoder is not None:
        from dit_jax.encoders.t5 import TextEncoder

        if source["name"] != "folder" or args.layout == "classes":
            raise ValueError("--text-encoder: the source has no captions (a folder of image + .txt pairs has)")

        text_encoder = TextEncoder.from_pretrained(args.text_encoder, max_length=args.max_length,
                                                   dtype=args.text_dtype, batch_size=args.batch_size)  # fmt: skip
    return precompute_latents(
        source,
        args.out,
        load_vae_encoder(args.vae),
        image_size=args.image_size,
        split=args.split,
        batch_size=args.batch_size,
        flip=args.flip,
        shard_size=args.shard_size,
        dtype=args.dtype,
        store_logvar=not args.no_logvar,
        buckets=args.buckets,
        limit=args.limit,
        text_encoder=text_encoder,
        text_encoder_name=text_encoder.name if text_encoder is not None else "",
        num_threads=args.num_threads,
    )


if __name__ == "__main__":
    main()
