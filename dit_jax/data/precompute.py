"""Precompute VAE latents (and optionally caption embeddings) into ArrayRecord shards for the 'latents' source.

    python -m dit_jax.data.precompute --source /data/images | tfds:imagenet2012 --out /data/latents256 \\
        --vae /models/sd-vae-ft-ema --image-size 256 [--batch-size 64] [--flip both] [--buckets] \\
        [--text-encoder /models/pixart_sigma_sdxlvae_T5_diffusers --max-length 300] \\
        [--text-encoder /models/stable-diffusion-3.5-medium --model SD3.5-medium] [--text-encoders t5=/models/t5 ...]

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
tokens, are stored beside the latents (`dit_jax.pipelines.TextEncoder`). With `--model` (a preset name such as
SD3.5-medium or FLUX.1-dev, or a dit_jax model directory), each caption's text condition of that model is stored
instead, encoded by every text encoder of its family (`dit_jax.pipelines.PromptEncoder`: SD3's CLIP-L, CLIP-G and
T5, Flux's CLIP and T5) exactly as its pipeline encodes prompts; `--text-encoder` is then the model's diffusers
pipeline folder (text_encoder*/ + tokenizer*/) and `--text-encoders SLOT=DIR` replaces single encoders.

Videos (`--num-frames`, e.g. Wan 2.1 fine-tuning data):

    python -m dit_jax.data.precompute --source /data/videos --out /data/wan_latents --num-frames 81 \
        --frame-stride 2 --image-size 480 --buckets --vae /models/Wan2.1-T2V-1.3B-Diffusers/vae \
        --text-encoder /models/Wan2.1-T2V-1.3B-Diffusers --model Wan2.1-T2V-1.3B --dtype float16

`--source` is a folder of video files (.mp4 and others through imageio-ffmpeg, animated .gif/.webp) or frame folders,
each with a same-named .txt caption (`dit_jax.data.videos`). A clip is `--num-frames` frames (1 + 4k for a causal
video VAE of temporal factor 4) every `--frame-stride` frames from the first, each frame resized to cover the crop
and centre-cropped; with `--buckets` each video gets the longest 1 + 4k clip it holds (up to `--num-frames`) and the
frame size of the closest aspect ratio around base `--image-size` (multiples of 16), so the records come in
frames × resolution buckets and training batches stay within one. `--vae` is a causal video VAE (a diffusers
`AutoencoderKLWan` folder or a dit_jax model directory), encoded chunk by chunk through its causal caches; the
records hold its posterior (f, h, w, c) and the manifest its per-channel statistics, so the 'latents' source yields
(x − μ_c)/σ_c as WanPipeline normalises latents. `--model` stores the model's text condition (Wan: UMT5 `context`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dit_jax.data import buckets as buckets_lib
from dit_jax.data import records as records_lib
from dit_jax.data.pipeline import build_source, validate_data_config
from dit_jax.data.sources import SkipCounter
from dit_jax.data.transforms import resize_center_crop, to_model_range

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

# captions → (T5 features, mask), or → a model's text condition {name: array} (a `PromptEncoder`)
TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]]
# settings that change the content of the records: a rerun into the same directory must match them
_CONTENT_KEYS = (
    "source", "split", "image_size", "flip", "dtype", "store_logvar", "buckets", "shard_size", "limit", "vae",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "text_encoder",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
    """An image encoder for precompute: `apply(params, images (B, H, W, 3) in [−1, 1]) -> (mean, logvar)`; a video
    encoder (`temporal_factor` > 0) takes videos (B, 1 + t·k, H, W, 3) instead."""

    apply: Callable[[Any, Any], tuple[Any, Any]]
    params: Any = None
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    name: str = ""
    temporal_factor: int = 0  # video frames per latent frame after the first; 0: an image encoder


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


def video_vae_encoder(config: Any, params: Any, name: str = "") -> LatentEncoder:
    """A `LatentEncoder` of videos from a causal video VAE (`dit_jax.encoders.wan_vae`): its chunked encode (first
    frame alone, then 4 frames per step through the causal caches); latents normalised with its per-channel
    statistics (x = (z − μ_c) / σ_c, as WanPipeline)."""
    from dit_jax.encoders import wan_vae

    model = wan_vae.AutoencoderKLWan(config)
    return LatentEncoder(
        apply=lambda p, x: wan_vae.encode(model, p, x),
        params=params,
        scaling_factor=1.0,
        shift_factor=0.0,
        latents_mean=tuple(float(v) for v in config.latents_mean),
        latents_std=tuple(float(v) for v in config.latents_std),
        name=name,
        temporal_factor=int(config.temporal_factor),
    )


def _encoder_of(config: Any, params: Any, path: str) -> LatentEncoder:
    family = getattr(config, "family", None)
    if family == "vae":
        return vae_encoder(config, params, name=os.path.abspath(path))
    if family == "wan_vae":
        return video_vae_encoder(config, params, name=os.path.abspath(path))
    raise ValueError(f"--vae: {path!r} holds a {family or type(config).__name__!r} model, not a VAE")


def load_vae_encoder(path: str) -> LatentEncoder:
    """The VAE at `path`: a diffusers AutoencoderKL or AutoencoderKLWan folder (or pipeline folder with vae/), a
    weights file, or a dit_jax model directory (`dit_jax.checkpoint`)."""
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
        return _encoder_of(config, params, path)
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    config_json = os.path.join(folder, "config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            class_name = json.load(f).get("_class_name")
        if class_name not in (None, "AutoencoderKL"):  # another VAE (a causal video VAE): its family converts it
            from dit_jax.convert import from_torch

            config, params = from_torch(folder)
            return _encoder_of(config, params, path)
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


def _check_arguments(
    source_config: dict[str, Any],
    *,
    flip: str,
    dtype: str,
    batch_size: int,
    shard_size: int,
    num_threads: int,
    limit: int | None,
) -> None:
    """Rejects bad arguments before the source is opened or anything is written."""
    if flip not in ("none", "both"):
        raise ValueError(f"flip: {flip!r} is not 'none' or 'both'")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype: {dtype!r} is not 'float32' or 'float16'")
    for key, value in (("batch_size", batch_size), ("shard_size", shard_size), ("num_threads", num_threads)):
        if value < 1:
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    if source_config.get("name") not in ("folder", "tfds", "video_folder"):
        raise ValueError(
            f"source: precompute reads a 'folder', 'tfds' or 'video_folder' source, got {source_config.get('name')!r}"
        )


def _has_captions(source: Any) -> bool:
    return getattr(source, "layout", None) == "captions"


@dataclasses.dataclass(frozen=True)
class _Reader:
    """Reads one source example cropped as training crops it: to its closest bucket, or the centre square."""

    source: Any
    skipped: SkipCounter
    image_size: int
    table: tuple[tuple[int, int], ...] | None

    def __call__(self, index: int) -> dict[str, Any] | None:
        """{"image": (h, w, 3) uint8, "index", and the source's extras}, or None if unreadable (counted)."""
        got = self.source.read(index)
        if got is None:
            return None
        pil, extras = got
        h, w = (self.image_size, self.image_size)
        if self.table is not None:
            h, w = self.table[buckets_lib.closest_bucket(pil.size[1], pil.size[0], self.table)]
        try:
            arr = resize_center_crop(pil, h, w)
        except Exception as e:
            self.skipped.skip(self.source.describe(index), e)
            return None
        return {"image": arr, "index": index, **extras}


@dataclasses.dataclass(frozen=True)
class _VideoReader:
    """Reads one clip of a 'video_folder' source cropped as training crops it: the square ``image_size`` and the
    source's ``num_frames``, or with buckets the longest clip of ``counts`` the video holds at its frame stride and
    the size of ``table`` with the closest aspect ratio."""

    source: Any
    skipped: SkipCounter
    image_size: int
    table: tuple[tuple[int, int], ...] | None
    counts: tuple[int, ...] = ()

    def __call__(self, index: int) -> dict[str, Any] | None:
        """{"image": (F, h, w, 3) uint8 frames, "index", "caption_text"}, or None if unreadable (counted)."""
        frames, shape = None, None
        if self.table is not None:
            info = self.source.info(index)
            if info is None:
                return None
            bucket = buckets_lib.video_bucket(*info, self.table, self.counts, self.source.frame_stride)
            if bucket is None:
                self.skipped.skip(self.source.describe(index), ValueError(f"{info[0]} frames: too short for a clip"))
                return None
            frames, shape = bucket[0], bucket[1:]
        got = self.source.read_clip(index, frames, shape)
        if got is None:
            return None
        return {"image": got.pop("frames"), "index": index, **got}


def _open_reader(
    source_config: dict[str, Any],
    split: str,
    image_size: int,
    *,
    buckets: bool,
    text_encoder: TextEncoder | None,
    temporal_factor: int = 0,
) -> _Reader | _VideoReader:
    """The source (unshuffled, unflipped) with its bucket table; a text encoder needs a source with captions. A
    'video_folder' source needs a video encoder (``temporal_factor`` > 0) and clips of ``1 + t·k`` frames."""
    cfg = validate_data_config({**source_config, "image_size": image_size, "random_flip": False, "shuffle": False})
    video = cfg["name"] == "video_folder"
    if video != (temporal_factor > 0):
        what = "a video VAE (e.g. an AutoencoderKLWan)" if video else "an image VAE (an AutoencoderKL)"
        raise ValueError(f"vae: a {cfg['name']!r} source is encoded with {what}")
    counts = buckets_lib.frame_counts(cfg["num_frames"], temporal_factor) if video else ()
    skipped = SkipCounter(f"precompute {cfg['name']}")
    source = build_source(cfg, split, skipped)
    if text_encoder is not None and not _has_captions(source):
        raise ValueError("text_encoder: the source has no captions (a 'folder' of image + .txt pairs has)")
    if video:
        table = _video_sizes(image_size) if buckets else None
        return _VideoReader(source=source, skipped=skipped, image_size=image_size, table=table, counts=counts)
    table = buckets_lib.buckets_for(image_size) if buckets else None
    return _Reader(source=source, skipped=skipped, image_size=image_size, table=table)


def _video_sizes(base: int) -> tuple[tuple[int, int], ...]:
    """Frame sizes of video buckets: the fixed tables of 256/512/1024/2048, else multiples of 16 (the video VAE's
    8 × the 2×2 patch) of area ≤ base²."""
    return buckets_lib.BUCKET_TABLES.get(base) or buckets_lib.bucket_table(base, 16)


def _content_settings(
    source_config: dict[str, Any],
    source: Any,
    encoder: LatentEncoder,
    *,
    split: str,
    image_size: int,
    flip: str,
    dtype: str,
    store_logvar: bool,
    buckets: bool,
    shard_size: int,
    limit: int | None,
    text_encoder_name: str | None,
    text_condition: bool = False,
) -> dict[str, Any]:
    """The manifest's `config`: what shapes the records (`_CONTENT_KEYS`) and what the source holds.

    `text_encoder_name` is None without a text encoder; `text_condition`: it gives a model's text condition."""
    return {
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
        "text_encoder": text_encoder_name,
        "has_labels": source.num_classes is not None,
        "num_classes": source.num_classes,
        "has_captions": _has_captions(source),
        "has_embeddings": text_encoder_name is not None and not text_condition,
        "has_condition": text_encoder_name is not None and text_condition,
    }


@dataclasses.dataclass(frozen=True)
class _Output:
    """The output directory and its plan: the manifest header and which source examples each shard holds."""

    out_dir: str
    shard_size: int
    header: dict[str, Any]

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.out_dir, records_lib.MANIFEST)

    @property
    def num_shards(self) -> int:
        return self.header["num_shards"]

    def indices(self, k: int) -> range:
        """The source indices of shard k."""
        return range(k * self.shard_size, min(self.header["num_examples"], (k + 1) * self.shard_size))

    def markers(self) -> list[dict[str, Any] | None]:
        """Every shard's marker, None for the shards not done."""
        return [_shard_done(self.out_dir, k) for k in range(self.num_shards)]


def _plan_output(
    out_dir: str, settings: dict[str, Any], num_records: int, *, shard_size: int, limit: int | None
) -> _Output:
    """Creates `out_dir` and splits the first `limit` (default all) source examples into shards of `shard_size`."""
    os.makedirs(out_dir, exist_ok=True)
    num_examples = num_records if limit is None else min(limit, num_records)
    header = {"format": records_lib.FORMAT, "version": records_lib.VERSION, "complete": False, "config": settings,
              "num_examples": num_examples, "num_shards": math.ceil(num_examples / shard_size)}  # fmt: skip
    return _Output(out_dir=out_dir, shard_size=shard_size, header=header)


def _check_resume(output: _Output) -> None:
    """Refuses an `out_dir` whose manifest was written with other content settings or from another source size."""
    if not os.path.exists(output.manifest_path):
        return
    with open(output.manifest_path) as f:
        previous = json.load(f)
    out_dir, settings, num_examples = output.out_dir, output.header["config"], output.header["num_examples"]
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


def _mark_incomplete(output: _Output) -> None:
    """Writes the header as the manifest ("complete": False, so readers wait for the end) unless all shards are done."""
    if not all(_shard_done(output.out_dir, k) for k in range(output.num_shards)):
        records_lib.write_json_atomic(output.manifest_path, output.header)


def _my_shards(output: _Output, process_index: int, process_count: int) -> list[int]:
    """The shards this process still has to write: process i does shards i, i + n, ... that have no marker."""
    shards = range(process_index, output.num_shards, process_count)
    return [k for k in shards if _shard_done(output.out_dir, k) is None]


def _bucket_batches(
    read: _Reader, indices: range, pool: concurrent.futures.Executor, *, batch_size: int, bar: tqdm
) -> Iterator[tuple[tuple[int, int], list[dict[str, Any]]]]:
    """(bucket shape, examples) batches of `indices`, read on `pool`: each full batch as soon as it fills, then the
    rest. Unreadable examples count on `bar` here; written ones count when written."""
    pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
    chunk = max(batch_size, 64)
    for start in range(0, len(indices), chunk):
        got = list(pool.map(read, indices[start : start + chunk]))
        bar.update(sum(item is None for item in got))
        for item in got:
            if item is None:
                continue
            key = item["image"].shape[:-1]  # (h, w), or (frames, h, w) for videos
            pending.setdefault(key, []).append(item)
            if len(pending[key]) == batch_size:
                yield key, pending.pop(key)
    for key in list(pending):
        yield key, pending.pop(key)


@dataclasses.dataclass(frozen=True)
class _BatchEncoder:
    """Encodes one batch of examples into latent records: the VAE posterior (also of the mirrored images with
    flip 'both') and, with a text encoder, the captions' features and masks."""

    encode: _ShardedEncoder
    flip: str
    store: type[np.floating]
    store_logvar: bool
    text_encoder: TextEncoder | None

    def __call__(self, items: list[dict[str, Any]]) -> tuple[list[bytes], list[int]]:
        """(one encoded record per example, the latent shape (h, w, channels) or (f, h, w, channels))."""
        images = np.stack([to_model_range(it["image"]) for it in items])  # B H W 3, videos B F H W 3
        if self.flip == "both":
            images = np.concatenate([images, images[..., ::-1, :]])
        mean, logvar = self.encode(images)
        emb = mask = condition = None
        if self.text_encoder is not None:
            encoded = self.text_encoder([str(it["caption_text"]) for it in items])
            if isinstance(encoded, Mapping):
                condition = {k: np.asarray(v) for k, v in encoded.items()}
            else:
                emb, mask = (np.asarray(a) for a in encoded)
        n, store, flipped = len(items), self.store, self.flip == "both"
        records = []
        for i, it in enumerate(items):
            record = {
                "latent_mean": mean[i].astype(store),
                "latent_logvar": logvar[i].astype(store) if self.store_logvar else None,
                "flipped_mean": mean[n + i].astype(store) if flipped else None,
                "flipped_logvar": logvar[n + i].astype(store) if flipped and self.store_logvar else None,
                "label": int(it["y"]) if "y" in it else None,
                "caption": str(it["caption_text"]) if "caption_text" in it else None,
                "caption_embedding": None if emb is None else emb[i].astype(store),
                "caption_mask": None if mask is None else mask[i].astype(np.int32),
                "condition": None if condition is None else {k: _stored(v[i], store) for k, v in condition.items()},
                "source_index": it["index"],
            }
            records.append(records_lib.encode_latent_record(record))
        return records, list(mean.shape[1:])


def _stored(value: np.ndarray, store: type[np.floating]) -> np.ndarray:
    """A condition array as stored: floats in the storage dtype, integers (masks) as int32."""
    return value.astype(store if np.issubdtype(value.dtype, np.floating) else np.int32)


class _ShardWriter:
    """The files of one shard, one per bucket shape: written under temporary names, renamed when the shard is
    complete and only then marked done by `<shard>.json`, so that a crash leaves nothing that counts as done."""

    def __init__(self, out_dir: str, k: int, bucketed: bool):
        self.out_dir, self.stem, self.bucketed = out_dir, _shard_stem(k), bucketed
        for pattern in (self.stem + ".*", self.stem + "-*"):  # files of a partial earlier attempt
            for stale in glob.glob(os.path.join(out_dir, pattern)):
                os.remove(stale)
        self._files: dict[tuple[int, int], tuple[str, str, Any]] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._shapes: dict[tuple[int, int], list[int]] = {}

    def write(self, key: tuple[int, ...], records: list[bytes], shape: list[int]) -> None:
        """Appends encoded records to the file of bucket shape `key` ((h, w) or (frames, h, w)), opened on first
        use."""
        if key not in self._files:
            from array_record.python.array_record_module import ArrayRecordWriter

            bucket = "x".join(str(k) for k in key)
            name = f"{self.stem}-{bucket}.array_record" if self.bucketed else f"{self.stem}.array_record"
            tmp = os.path.join(self.out_dir, f"{name}.tmp-{os.getpid()}")
            self._files[key] = (name, tmp, ArrayRecordWriter(tmp, "group_size:1"))
            self._counts[key] = 0
            self._shapes[key] = shape
        writer = self._files[key][2]
        for record in records:
            writer.write(record)
        self._counts[key] += len(records)

    def close(self, *, examples: int, skipped: int) -> None:
        """Closes and renames every file, then writes the marker (files, source examples, images skipped)."""
        files = {}
        for key, (name, tmp, writer) in self._files.items():
            writer.close()
            os.replace(tmp, os.path.join(self.out_dir, name))
            files[name] = {"records": self._counts[key], "shape": self._shapes[key]}
        marker = {"files": files, "examples": examples, "skipped": skipped}
        records_lib.write_json_atomic(os.path.join(self.out_dir, self.stem + ".json"), marker)


def _write_shard(
    output: _Output,
    k: int,
    read: _Reader,
    encode_batch: _BatchEncoder,
    pool: concurrent.futures.Executor,
    bar: tqdm,
    *,
    batch_size: int,
) -> None:
    """Reads, encodes and writes shard k (see `_ShardWriter`); its marker counts the images skipped meanwhile."""
    skipped_before = read.skipped.count
    shard = _ShardWriter(output.out_dir, k, bucketed=read.table is not None)
    for key, items in _bucket_batches(read, output.indices(k), pool, batch_size=batch_size, bar=bar):
        records, shape = encode_batch(items)
        shard.write(key, records, shape)
        bar.update(len(items))
    shard.close(examples=len(output.indices(k)), skipped=read.skipped.count - skipped_before)


def _wait_for_all_processes() -> None:
    """Barrier of the jax.distributed processes, so that every process's shards are written before the manifest."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("dit_jax.data.precompute")


def _finish(output: _Output, *, write_manifest: bool) -> dict[str, Any] | None:
    """The complete manifest (every shard's files and counts), written if every shard is done and `write_manifest`;
    else None, logging the shards still to do."""
    markers = output.markers()
    if any(m is None for m in markers):
        log.info("precompute: shards %s are still to do (other processes or a rerun)",
                 [k for k, m in enumerate(markers) if m is None])  # fmt: skip
        return None
    if not write_manifest:
        return None
    files = {name: info for m in markers for name, info in m["files"].items()}
    manifest = {
        **output.header,
        "complete": True,
        "files": files,
        "num_records": sum(info["records"] for info in files.values()),
        "num_skipped": sum(m["skipped"] for m in markers),
    }
    records_lib.write_json_atomic(output.manifest_path, manifest)
    log.info("precompute: %d records in %s (%d unreadable skipped)", manifest["num_records"], output.out_dir,
             manifest["num_skipped"])  # fmt: skip
    return manifest


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
    """Encodes a 'folder' or 'tfds' source — or a 'video_folder' source with a video encoder — (a data config, see
    `dit_jax.data.pipeline`) into `out_dir`; resumable."""
    import jax
    from tqdm import tqdm

    _check_arguments(source_config, flip=flip, dtype=dtype, batch_size=batch_size, shard_size=shard_size,
                     num_threads=num_threads, limit=limit)  # fmt: skip
    read = _open_reader(source_config, split, image_size, buckets=buckets, text_encoder=text_encoder,
                        temporal_factor=encoder.temporal_factor)  # fmt: skip
    multihost = process_index is None and jax.process_count() > 1
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()

    text_name = text_encoder_name if text_encoder is not None else None
    condition = hasattr(text_encoder, "text_condition")  # a PromptEncoder: the model's whole text condition
    settings = _content_settings(source_config, read.source, encoder, split=split, image_size=image_size, flip=flip,
                                 dtype=dtype, store_logvar=store_logvar, buckets=buckets, shard_size=shard_size,
                                 limit=limit, text_encoder_name=text_name, text_condition=condition)  # fmt: skip
    output = _plan_output(out_dir, settings, read.source.num_records, shard_size=shard_size, limit=limit)
    _check_resume(output)
    if process_index == 0:
        _mark_incomplete(output)

    mine = _my_shards(output, process_index, process_count)
    encode_batch = None
    if mine:
        encode = _ShardedEncoder(encoder, batch_size * (2 if flip == "both" else 1))
        store = np.float16 if dtype == "float16" else np.float32
        encode_batch = _BatchEncoder(encode, flip, store, store_logvar, text_encoder)
        log.info("precompute: %d of %d shards to write in %s", len(mine), output.num_shards, out_dir)
    pending = sum(len(output.indices(k)) for k in mine)
    with (
        concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
        tqdm(total=pending, unit="img", desc="precompute", disable=not progress or process_index != 0) as bar,
    ):
        for k in mine:
            _write_shard(output, k, read, encode_batch, pool, bar, batch_size=batch_size)

    if multihost:
        _wait_for_all_processes()
    manifest = _finish(output, write_manifest=process_index == 0 or not multihost)
    return PrecomputeSummary(manifest=manifest, written=mine, skipped=read.skipped.count)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dit_jax.data.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="an image or video folder, or tfds:NAME (e.g. tfds:imagenet2012)")
    p.add_argument("--out", required=True, help="output directory (created; rerun with the same arguments to resume)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, weights file, or dit_jax model dir")
    p.add_argument("--image-size", type=int, required=True, help="crop size (base size with --buckets), multiple of 8")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode call (all local devices)")
    p.add_argument("--flip", choices=("none", "both"), default="none", help="'both' also stores mirrored latents")
    p.add_argument("--split", default="train", help="TFDS split")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--layout", choices=("auto", "classes", "captions"), default="auto", help="image folder layout")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of base --image-size (videos: also "
                   "the longest 1 + 4k clip each video holds)")  # fmt: skip
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="videos: frames per clip, 1 + 4k (Wan: 81); makes --source a folder of captioned videos",
    )
    p.add_argument("--frame-stride", type=int, default=1, help="videos: take every N-th frame")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=1024, help="source examples per shard")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    p.add_argument("--no-logvar", action="store_true", help="store only the posterior mean (half the disk)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N examples")
    p.add_argument("--num-threads", type=int, default=8, help="image reading threads")
    p.add_argument("--text-encoder", default=None, help="T5 folder (+ tokenizer) or pipeline folder: caption features")
    p.add_argument(
        "--model",
        default=None,
        help="store this model's text condition (preset name, e.g. SD3.5-medium, or model directory)",
    )
    p.add_argument(
        "--text-encoders",
        nargs="+",
        default=None,
        metavar="SLOT=DIR",
        help="with --model: one text encoder folder per slot (e.g. clip_l=DIR clip_g=DIR t5=DIR)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="T5 tokens (default: PixArt-Σ's 300; with --model the model's pipeline default)",
    )
    p.add_argument("--text-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="text encoder dtype")
    return p.parse_args(argv)


def _model_config(name: str) -> Any:
    """`--model`: a preset name or a dit_jax model directory (its config only)."""
    from dit_jax.checkpoint import is_model_dir, load_model_config
    from dit_jax.models import list_presets, preset

    if os.path.isdir(name):
        if not is_model_dir(name):
            raise ValueError(f"--model: {name!r} is not a dit_jax model directory (config.json + params/)")
        return load_model_config(name)
    if name not in list_presets():
        raise ValueError(f"--model: {name!r} is neither a model directory nor a preset ({', '.join(list_presets())})")
    return preset(name)


def _slot_folders(items: Sequence[str] | None) -> dict[str, str] | None:
    """`--text-encoders SLOT=DIR ...` as a dict."""
    if not items:
        return None
    out = {}
    for item in items:
        slot, sep, folder = item.partition("=")
        if not sep or not slot or not folder:
            raise ValueError(f"--text-encoders: {item!r} is not SLOT=DIR (e.g. t5=/models/t5-v1_1-xxl)")
        out[slot] = folder
    return out


def _text_encoder(args: argparse.Namespace, source: dict[str, Any]) -> TextEncoder | None:
    """The caption encoder the arguments ask for: none, one T5 (`--text-encoder`), or a model's `PromptEncoder`."""
    if args.text_encoder is None and args.model is None and args.text_encoders is None:
        return None
    if source["name"] not in ("folder", "video_folder") or (source["name"] == "folder" and args.layout == "classes"):
        raise ValueError("--text-encoder: the source has no captions (a folder of image + .txt pairs has)")
    if args.model is None:
        if args.text_encoders is not None:
            raise ValueError("--text-encoders needs --model (the model whose text slots they fill)")
        from dit_jax.pipelines.text_encoder import TextEncoder as T5Encoder

        folder = args.text_encoder
        index = os.path.join(folder, "model_index.json")
        if os.path.isfile(index) and any(os.path.isdir(os.path.join(folder, f"text_encoder_{k}")) for k in (2, 3)):
            raise ValueError(
                f"--text-encoder: {folder!r} is a pipeline with several text encoders; pass --model (the preset or "
                "model directory you will train, e.g. SD3.5-medium or FLUX.1-dev) to store its text condition"
            )
        return T5Encoder.from_pretrained(folder, max_length=args.max_length or 300, dtype=args.text_dtype,
                                         batch_size=args.batch_size)  # fmt: skip
    from dit_jax.pipelines.prompts import PromptEncoder

    return PromptEncoder.from_pretrained(
        _model_config(args.model),
        args.text_encoder,
        text_encoders=_slot_folders(args.text_encoders),
        max_sequence_length=args.max_length,
        dtype=args.text_dtype,
        batch_size=args.batch_size,
    )


def main(argv: Sequence[str] | None = None) -> PrecomputeSummary:
    """Command-line entry point (arguments as `python -m dit_jax.data.precompute --help` lists)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.num_frames is not None:
        if args.source.startswith("tfds:"):
            raise ValueError("--num-frames: videos come from a folder, not from TFDS")
        source = {"name": "video_folder", "path": os.path.abspath(args.source), "num_frames": args.num_frames,
                  "frame_stride": args.frame_stride}  # fmt: skip
    elif args.source.startswith("tfds:"):
        source = {"name": "tfds", "tfds_name": args.source[5:], "data_dir": args.data_dir}
    else:
        source = {"name": "folder", "path": os.path.abspath(args.source), "layout": args.layout}
    text_encoder = _text_encoder(args, source)
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
