"""`create_dataset(config.data, batch_size=..., seed=...)`: per-process grain batches for the trainer.

The result is a grain `IterDataset` (a `DataPipeline`) of dicts of numpy arrays, `batch_size` examples each (the
*per-process* batch), drop remainder:
  x             float32 (b, H, W, C)  model input: pixels in [−1, 1], or latents already scaled; videos
                        (b, F, H, W, C)
  y             int32   (b,)          class label (class-conditional sources)
  caption       float32 (b, L, C)     precomputed caption embedding (latents made with a text encoder)
  caption_mask  int32   (b, L)        its mask
  <condition>   float32/int32 (b, …) a text-to-image model's text condition, by name (latents made with `--model`,
                                    e.g. SD3/Flux `context` (b, L, C) and `pooled` (b, P))
  caption_text  str     (b,)          caption text (image/video + .txt folders; embed it with precompute to train)
  context       float32 (b, T, D)     'moving_digits': the one-hot prompt tokens (a text-to-video model's text input)
Order: a global shuffle from `seed` (a different permutation every epoch), repeated forever, then process i of
n takes elements i, i + n, ... (`jax.process_index()/process_count()`, or `shard_index/shard_count`), so the
union of the per-process batches is one global batch. Random flips and latent sampling draw from a generator
seeded by `seed` and the element's position, so a run is reproducible. `iter(ds)` is checkpointable with
`grain.checkpoint.CheckpointSave/CheckpointRestore` inside an orbax `Composite`; the restored iterator yields the
batch after the saved one. Unreadable records are skipped and counted: `ds.skipped.count` (per process, since
start; not part of the checkpoint). With aspect-ratio buckets, every batch holds one bucket, all processes get
the same shape at the same step, and `ds.x_shapes` lists the possible shapes of x (one step compiles per shape).

Keys of `data_config` (an `ml_collections.ConfigDict` or dict); unknown keys are an error, None means the default.
All sources:
  name                  'digits' | 'tfds' | 'folder' | 'latents' | 'moving_digits' | 'video_folder'   (required)
  shuffle               global shuffle, reshuffled every epoch                                       (True)
  num_epochs            None repeats forever; N stops after N epochs                                 (None)
  num_threads           reader threads (grain ReadOptions.num_threads)                               (8)
  prefetch_buffer_size  examples read ahead (grain ReadOptions.prefetch_buffer_size)                 (256)
  num_classes           if set, must equal the source's class count (a guard against a wrong config) (None)
'digits' — the quickstart dataset: scikit-learn's 1,797 8×8 handwritten digits (shipped inside the package),
upsampled with bicubic interpolation, one channel, labels 0–9:
  image_size            side in pixels, a multiple of 8 (16 or 32 are the usual)                    (16)
  random_flip           horizontal flips; digits are not flip-invariant                              (False)
'tfds' — `tfds.data_source(tfds_name, split=split, data_dir=data_dir)`, decoded without TensorFlow, ADM
centre crop (BOX halving, BICUBIC resize, centre crop) to image_size, RGB:
  tfds_name             e.g. 'imagenet2012' (prepared beforehand; nothing is downloaded)            (required)
  data_dir              TFDS data directory (None: TFDS's default)                                   (None)
  image_size            side in pixels, a multiple of 8                                              (required)
  random_flip           random horizontal flips                                                      (True)
  image_key, label_key  feature names; label_key None for unlabelled data (no y)          ('image', 'label')
'folder' — an image folder: one sub-folder per class (label = index in the sorted folder names), or image +
same-named .txt caption pairs; same preprocessing as 'tfds':
  path                  the folder                                                                   (required)
  layout                'auto' (captions if any .txt pair exists) | 'classes' | 'captions'          ('auto')
  image_size            side in pixels (the base resolution with buckets), a multiple of 8           (required)
  random_flip           random horizontal flips                                                      (True)
  buckets               aspect-ratio buckets from `buckets.buckets_for(image_size)`                  (False)
'latents' — ArrayRecord shards written by `python -m dit_jax.data.precompute` (see `records`): the stored
posterior (mean, logvar) is sampled afresh for every example, as in DiT's train.py, then scaled:
  path                  the precompute output directory                                              (required)
  image_size            if set, must equal the image size the latents were made at                   (None)
  random_flip           use the stored flipped latent (`--flip both`) with probability ½; without
                        one, flip the latent itself                                                  (True)
  latent_sample         sample z = mean + exp(logvar/2)·ε (False: use the mean)                      (True)
  latent_scale          x = (z − latent_shift)·latent_scale; None takes the VAE's factor from the
                        manifest (0.18215 for the SD VAE)                                            (None)
  latent_shift          None: from the manifest (0 for the SD VAE)                                   (None)
  buckets               None: bucketed iff the latents come in several shapes (image sizes, or video
                        frames × sizes); False forbids that                                          (None)
  Video latents (precompute with --num-frames) are read the same way: x (f, h, w, c).
'moving_digits' — the video quickstart (`dit_jax.data.moving_digits`): a digit sliding across black frames in
one of 4 directions, one channel in [−1, 1], with its prompt as one-hot tokens `context` (no labels):
  image_size            frame side, a multiple of 16 (the glyph is half of it)                      (16)
  num_frames            frames per clip, ≥ 2                                                         (8)
  text_dim              width of the prompt tokens (the model's text_dim), ≥ 14                      (16)
  random_offset         a random position across the motion; False centres the glyph                 (True)
  prompt_tokens         2: digit and direction tokens; 1: one token with both channels hot          (2)
  trail                 brightness (0–0.45) of the glyph's previous position in each frame         (0.0)
'video_folder' — captioned videos (`dit_jax.data.videos`: video files or frame folders + .txt), RGB clips of
num_frames frames every frame_stride frames, each frame resized and centre-cropped like 'folder' images; it yields
caption_text (precompute it with a text encoder to train a text-to-video model):
  path                  the folder                                                                   (required)
  image_size            frame side in pixels, a multiple of 8                                        (required)
  num_frames            frames per clip                                                              (required)
  frame_stride          take every frame_stride-th frame                                             (1)
  random_flip           random horizontal flips                                                      (False)
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from dit_jax.data import buckets as buckets_lib
from dit_jax.data import sources

_REQUIRED = object()
_COMMON: dict[str, Any] = {
    "name": _REQUIRED,
    "shuffle": True,
    "num_epochs": None,
    "num_threads": 8,
    "prefetch_buffer_size": 256,
    "num_classes": None,
}
_SOURCES: dict[str, dict[str, Any]] = {
    "digits": {"image_size": 16, "random_flip": False},
    "tfds": {
        "tfds_name": _REQUIRED,
        "data_dir": None,
        "image_size": _REQUIRED,
        "random_flip": True,
        "image_key": "image",
        "label_key": "label",
    },
    "folder": {"path": _REQUIRED, "layout": "auto", "image_size": _REQUIRED, "random_flip": True, "buckets": False},
    "latents": {
        "path": _REQUIRED,
        "image_size": None,
        "random_flip": True,
        "latent_sample": True,
        "latent_scale": None,
        "latent_shift": None,
        "buckets": None,
    },
    "moving_digits": {
        "image_size": 16,
        "num_frames": 8,
        "text_dim": 16,
        "random_offset": True,
        "prompt_tokens": 2,
        "trail": 0.0,
    },
    "video_folder": {
        "path": _REQUIRED,
        "image_size": _REQUIRED,
        "num_frames": _REQUIRED,
        "frame_stride": 1,
        "random_flip": False,
    },
}
_BOOL_KEYS = ("shuffle", "random_flip", "latent_sample", "random_offset")
_POSITIVE_INT_KEYS = ("num_threads", "prefetch_buffer_size", "num_epochs", "num_classes", "image_size", "num_frames",
                      "frame_stride", "text_dim", "prompt_tokens")  # fmt: skip
_STR_KEYS = ("tfds_name", "path", "data_dir", "image_key", "label_key", "layout")


def validate_data_config(data_config: Any) -> dict[str, Any]:
    """Checks `config.data` and returns a plain dict with every default filled in (one clear error otherwise)."""
    if hasattr(data_config, "to_dict"):
        data_config = data_config.to_dict()
    elif hasattr(data_config, "as_configdict"):
        data_config = data_config.as_configdict().to_dict()
    if not isinstance(data_config, Mapping):
        raise TypeError(f"data config must be a ConfigDict or a dict, got {type(data_config).__name__}")
    name = data_config.get("name")
    if name not in _SOURCES:
        raise ValueError(f"data.name: unknown source {name!r}; expected one of {sorted(_SOURCES)}")
    spec = {**_COMMON, **_SOURCES[name]}
    unknown = sorted(set(data_config) - set(spec))
    if unknown:
        raise ValueError(f"data.{unknown[0]}: unknown key for source {name!r}; known keys: {sorted(spec)}")
    # None means "the default" (ConfigDicts often hold None placeholders), except label_key: None = unlabelled.
    cfg = {
        key: default if data_config.get(key) is None and key != "label_key" else data_config.get(key, default)
        for key, default in spec.items()
    }
    for key, value in cfg.items():
        if value is _REQUIRED:
            raise ValueError(f"data.{key}: required for source {name!r}")
        if value is None:
            continue
        if key in _BOOL_KEYS and not isinstance(value, bool | np.bool_):
            raise ValueError(f"data.{key}: expected True or False, got {value!r}")
        if key in _POSITIVE_INT_KEYS and (
            isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
        ):
            raise ValueError(f"data.{key}: expected a positive integer, got {value!r}")
        if key in _STR_KEYS and not isinstance(value, str):
            raise ValueError(f"data.{key}: expected a string, got {value!r}")
    if cfg.get("image_size") is not None and cfg["image_size"] % 8:
        raise ValueError(f"data.image_size: {cfg['image_size']} is not a multiple of 8 (the VAE downsamples by 8)")
    if cfg.get("buckets") is not None and not isinstance(cfg["buckets"], bool):
        raise ValueError(f"data.buckets: expected True or False, got {cfg['buckets']!r}")
    if name == "folder" and cfg["layout"] not in ("auto", "classes", "captions"):
        raise ValueError(f"data.layout: {cfg['layout']!r} is not one of 'auto', 'classes', 'captions'")
    for key in ("latent_scale", "latent_shift"):
        if cfg.get(key) is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int | float)):
            raise ValueError(f"data.{key}: expected a number or None, got {cfg[key]!r}")
    return cfg


def prompt_table(cfg: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """``{prompt: text features (tokens, dim)}`` of a source whose examples carry the text features of a fixed set of
    prompts instead of captions for a text encoder ('moving_digits'); None for every other source. The trainer
    records it in the run (``dit_jax.runs.PROMPTS_FILE``), so a run samples by prompt without a text encoder."""
    if not cfg or cfg.get("name") != "moving_digits":
        return None
    from dit_jax.data.moving_digits import PROMPT_TOKENS
    from dit_jax.data.moving_digits import prompt_table as table

    return table(int(cfg.get("text_dim") or 16), int(cfg.get("prompt_tokens") or PROMPT_TOKENS))


def build_source(cfg: Mapping[str, Any], split: str = "train", skipped: sources.SkipCounter | None = None) -> Any:
    """The random-access source a validated config describes (see `sources`)."""
    name = cfg["name"]
    skipped = skipped or sources.SkipCounter(name)
    if name != "tfds" and split != "train":
        raise ValueError(
            f"split {split!r}: source {name!r} has only 'train'"
            + ("; point data.path at that split's folder" if name in ("folder", "latents", "video_folder") else "")
        )
    if name == "digits":
        return sources.DigitsSource(cfg["image_size"], cfg["random_flip"], skipped)
    if name == "tfds":
        return sources.TfdsSource(
            cfg["tfds_name"], split, cfg["data_dir"], cfg["image_key"], cfg["label_key"], cfg["image_size"],
            cfg["random_flip"], skipped,
        )  # fmt: skip
    if name == "folder":
        return sources.FolderSource(cfg["path"], cfg["layout"], cfg["image_size"], cfg["random_flip"], skipped)
    if name == "moving_digits":
        from dit_jax.data.moving_digits import MovingDigitsSource

        return MovingDigitsSource(
            cfg["image_size"],
            cfg["num_frames"],
            cfg["text_dim"],
            skipped,
            cfg["random_offset"],
            cfg["prompt_tokens"],
            float(cfg["trail"]),
        )
    if name == "video_folder":
        return sources.VideoFolderSource(
            cfg["path"], cfg["image_size"], cfg["num_frames"], cfg["frame_stride"], cfg["random_flip"], skipped
        )
    source = sources.LatentSource(
        cfg["path"],
        random_flip=cfg["random_flip"],
        sample=cfg["latent_sample"],
        scale=cfg["latent_scale"],
        shift=cfg["latent_shift"],
        skipped=skipped,
    )
    if cfg["image_size"] is not None and source.image_size != cfg["image_size"]:
        raise ValueError(
            f"data.image_size: {cfg['image_size']}, but the latents in {cfg['path']!r} were made at "
            f"image size {source.image_size}"
        )
    return source


class DataPipeline(grain.IterDataset):
    """What `create_dataset` returns: a grain IterDataset of per-process batches, plus facts for the trainer.

    Attributes: `batch_size` (per process), `num_records` (in the source), `num_classes` (None if unlabelled),
    `x_shapes` (the possible (H, W, C) — videos (F, H, W, C) — of x; several with buckets), `skipped` (a
    `SkipCounter`), `config`.
    """

    def __init__(self, parent: grain.IterDataset, *, config: dict[str, Any], batch_size: int, num_records: int,
                 num_classes: int | None, x_shapes: list[tuple[int, ...]], skipped: sources.SkipCounter):  # fmt: skip
        super().__init__(parent)
        self.config = config
        self.batch_size = batch_size
        self.num_records = num_records
        self.num_classes = num_classes
        self.x_shapes = x_shapes
        self.skipped = skipped

    def __iter__(self) -> grain.DatasetIterator:
        return self._parent.__iter__()

    def __str__(self) -> str:
        return f"DataPipeline({self.config['name']}, batch_size={self.batch_size}, x_shapes={self.x_shapes})"


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def create_dataset(
    data_config: Any,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> DataPipeline:
    """Per-process batches of `batch_size` from `data_config` (keys in the module docstring), sharded by process.

    `shard_index/shard_count` default to `jax.process_index()/jax.process_count()`; pass them to simulate or
    override process sharding.
    """
    cfg = validate_data_config(data_config)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer (the per-process batch), got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if shard_index is None or shard_count is None:
        if (shard_index is None) != (shard_count is None):
            raise ValueError("shard_index and shard_count go together: pass both or neither")
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")

    skipped = sources.SkipCounter(cfg["name"])
    source = build_source(cfg, split, skipped)
    if cfg["num_classes"] is not None and source.num_classes is not None and source.num_classes != cfg["num_classes"]:
        raise ValueError(
            f"data.num_classes: {cfg['num_classes']}, but the {cfg['name']} source has {source.num_classes}"
        )
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(int(seed)).generate_state(2))
    meta = dict(config=cfg, batch_size=int(batch_size), num_records=source.num_records,
                num_classes=source.num_classes, skipped=skipped)  # fmt: skip

    table, bucket_of = _bucket_assignment(cfg, source)
    if table is None:
        if source.num_records < batch_size * shard_count:
            raise ValueError(
                f"the {cfg['name']} source has {source.num_records} records, fewer than one global batch "
                f"({batch_size} × {shard_count} processes)"
            )
        ds = grain.MapDataset.range(source.num_records)
        if cfg["shuffle"]:
            ds = ds.shuffle(shuffle_seed)
        ds = ds.repeat(cfg["num_epochs"])[shard_index::shard_count]
        ds = ds.random_map(lambda i, rng: source.load(int(i), rng), seed=map_seed)
        read = grain.ReadOptions(num_threads=cfg["num_threads"], prefetch_buffer_size=cfg["prefetch_buffer_size"])
        out = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
        return DataPipeline(out, x_shapes=[_x_shape(source, None)], **meta)

    plan = buckets_lib.BucketBatchPlan(
        bucket_of, len(table), global_batch=batch_size * shard_count, seed=shuffle_seed, shuffle=cfg["shuffle"]
    )

    def load_batch(step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        bucket, indices = plan.shard(int(step), shard_index, shard_count)
        shape = table[bucket][:2] if cfg["name"] != "latents" else None  # latents are stored at their bucket shape
        examples = [source.load(int(i), rng, shape) for i in indices]
        good = [e for e in examples if e is not None]
        if not good:
            raise RuntimeError(f"{cfg['name']}: every record of a batch is unreadable (indices {indices.tolist()})")
        # Unreadable records are replaced by readable ones of the same batch so that every process keeps the
        # same batch shape at the same step.
        return _stack([e if e is not None else good[k % len(good)] for k, e in enumerate(examples)])

    steps = sys.maxsize if cfg["num_epochs"] is None else plan.batches_per_epoch * cfg["num_epochs"]
    ds = grain.MapDataset.range(steps).random_map(load_batch, seed=map_seed)
    read = grain.ReadOptions(
        num_threads=cfg["num_threads"], prefetch_buffer_size=max(2, cfg["prefetch_buffer_size"] // batch_size)
    )
    members = np.bincount(bucket_of[bucket_of >= 0], minlength=len(table))
    x_shapes = [_x_shape(source, table[k]) for k in range(len(table)) if members[k] >= plan.global_batch]
    return DataPipeline(ds.to_iter_dataset(read), x_shapes=x_shapes, **meta)


def _x_shape(source: Any, bucket: tuple[int, ...] | None) -> tuple[int, ...]:
    """(H, W, C) — videos (F, H, W, C) — of x for a bucket (None: the source's single shape)."""
    if isinstance(source, sources.LatentSource):
        return tuple(bucket or source.shapes[0])
    if hasattr(source, "x_shape"):  # moving digits
        return tuple(source.x_shape)
    if isinstance(source, sources.VideoFolderSource):
        return (source.num_frames, *(bucket or (source.image_size, source.image_size)), 3)
    channels = 1 if isinstance(source, sources.DigitsSource) else 3
    size = source.images.shape[1] if isinstance(source, sources.DigitsSource) else source.image_size
    return (*(bucket or (size, size)), channels)


def _bucket_assignment(cfg: Mapping[str, Any], source: Any) -> tuple[list[tuple[int, ...]] | None, np.ndarray | None]:
    """(bucket table, bucket index per record, −1 if unreadable) or (None, None) when not bucketing."""
    if cfg["name"] == "latents":
        if len(source.shapes) == 1:
            return None, None
        if cfg["buckets"] is False:
            raise ValueError(
                f"data.buckets: False, but the latents in {cfg['path']!r} come in {len(source.shapes)} shapes "
                f"{source.shapes}; set data.buckets=True (or None)"
            )
        return list(source.shapes), source.bucket_of
    if not cfg.get("buckets"):
        return None, None
    table = buckets_lib.buckets_for(cfg["image_size"])
    with concurrent.futures.ThreadPoolExecutor(cfg["num_threads"]) as pool:
        sizes = list(pool.map(source.image_hw, range(source.num_records)))
    bucket_of = np.asarray([-1 if hw is None else buckets_lib.closest_bucket(*hw, table) for hw in sizes], np.int32)
    return list(table), bucket_of
