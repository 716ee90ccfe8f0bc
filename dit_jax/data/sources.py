"""Random-access sources: digits (quickstart), TFDS by name, image folders, video folders, precomputed latents.

Every source has `num_records`, `num_classes` (None without labels) and
`load(index, rng, shape=None) -> dict | None`: one preprocessed example in model-input space, or None when the
record is unreadable (counted in the source's `SkipCounter` and logged, never fatal). `shape` is the (h, w)
target of a bucket; None means the source's square `image_size`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from dit_jax.data import records as records_lib
from dit_jax.data.transforms import IMAGE_EXTENSIONS, hflip, open_rgb, resize_center_crop, to_model_range

log = logging.getLogger(__name__)

Example = dict[str, Any]


class SkipCounter:
    """Thread-safe count of unreadable records a pipeline skipped in this process (for logging; not checkpointed)."""

    def __init__(self, name: str):
        self.name = name
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Records skipped so far."""
        return self._count

    def skip(self, what: str, error: BaseException) -> None:
        """Counts one unreadable record and logs it (the first ten, then at powers of two)."""
        with self._lock:
            self._count += 1
            n = self._count
        if n <= 10 or n & (n - 1) == 0:
            log.warning(
                "%s: skipped unreadable %s (%s: %s); %d skipped so far", self.name, what, type(error).__name__, error, n
            )

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, count={self._count})"


# ----------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=8)
def _digits(image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn ships the quickstart dataset
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # N 8 8 in [0, 1]
    if image_size is not None and image_size != images.shape[1]:
        images = np.stack(
            [np.asarray(Image.fromarray(im, mode="F").resize((image_size, image_size), Image.BICUBIC)) for im in images]
        )
    x = np.clip(images * 2.0 - 1.0, -1.0, 1.0)[..., None].astype(np.float32)
    y = digits.target.astype(np.int32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_digits_arrays(image_size: int | None = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as (images (N, S, S, 1) float32 in [−1, 1], labels (N,) int32).

    Upsampled with bicubic interpolation (clipped to [−1, 1]) to `image_size`; None keeps the native 8×8. Ink is
    +1, background −1. These are exactly the images the `digits` training source yields (before optional flips).
    """
    x, y = _digits(image_size)
    return x.copy(), y.copy()


class DigitsSource:
    """The quickstart dataset: scikit-learn digits upsampled to `image_size`, one channel, labels 0–9."""

    num_classes = 10

    def __init__(self, image_size: int, random_flip: bool, skipped: SkipCounter):
        self.images, self.labels = _digits(image_size)
        self.random_flip = random_flip
        self.skipped = skipped
        self.num_records = len(self.labels)

    def load(self, index: int, rng: np.random.Generator, shape: tuple[int, int] | None = None) -> Example:
        """One example: x (S, S, 1) float32, y int32."""
        x = self.images[index]
        x = hflip(x) if self.random_flip and rng.random() < 0.5 else x.copy()
        return {"x": x, "y": self.labels[index]}


# ----------------------------------------------------------------------------------------------- pixel sources


class _ImageSource:
    """Base of pixel sources: `_read(index) -> (PIL RGB image, extra features)`; crop, flip, range here."""

    num_classes: int | None = None
    num_records: int = 0

    def __init__(self, image_size: int, random_flip: bool, skipped: SkipCounter):
        self.image_size = image_size
        self.random_flip = random_flip
        self.skipped = skipped

    def _read(self, index: int) -> tuple[Image.Image, Example]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Names record `index` in messages."""
        return f"record {index}"

    def read(self, index: int) -> tuple[Image.Image, Example] | None:
        """The decoded RGB image and its extra features (label/caption), or None if unreadable (counted)."""
        try:
            return self._read(index)
        except Exception as e:  # corrupt data raises many types (OSError, SyntaxError, ValueError, ...)
            self.skipped.skip(self.describe(index), e)
            return None

    def load(self, index: int, rng: np.random.Generator, shape: tuple[int, int] | None = None) -> Example | None:
        """One example: x (h, w, 3) float32 in [−1, 1] (ADM centre crop, optional flip) plus y or caption_text."""
        got = self.read(index)
        if got is None:
            return None
        pil, extras = got
        h, w = shape or (self.image_size, self.image_size)
        try:
            arr = resize_center_crop(pil, h, w)
        except Exception as e:
            self.skipped.skip(self.describe(index), e)
            return None
        if self.random_flip and rng.random() < 0.5:
            arr = hflip(arr)
        return {"x": to_model_range(arr), **extras}

    def image_hw(self, index: int) -> tuple[int, int] | None:
        """(height, width) of record `index` without full decoding where possible; None if unreadable."""
        got = self.read(index)
        return None if got is None else (got[0].size[1], got[0].size[0])


def scan_image_folder(path: str, layout: str = "auto") -> tuple[str, list[str], list[int] | None, list[str]]:
    """Lists an image folder: (layout, image paths, labels or None, class names or caption paths), sorted.

    `classes`: one sub-folder per class (searched recursively; class index = position in the sorted folder names).
    `captions`: every image with a same-named `.txt` beside it (images without one are left out, with a warning).
    `auto`: captions if any image has a `.txt` beside it, else classes.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path: image folder {path!r} does not exist")
    if layout not in ("auto", "classes", "captions"):
        raise ValueError(f"data.layout: {layout!r} is not one of 'auto', 'classes', 'captions'")
    images: list[str] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        images.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    images.sort()
    captioned = [p for p in images if os.path.exists(os.path.splitext(p)[0] + ".txt")]
    if layout == "auto":
        layout = "captions" if captioned else "classes"
    if layout == "captions":
        if not captioned:
            raise ValueError(f"data.path: no image in {path!r} has a .txt caption beside it (layout 'captions')")
        if len(captioned) < len(images):
            log.warning("%s: %d images without a .txt caption are left out", path, len(images) - len(captioned))
        return layout, captioned, None, [os.path.splitext(p)[0] + ".txt" for p in captioned]
    class_names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files, labels, used = [], [], []
    for name in class_names:
        prefix = os.path.join(path, name) + os.sep
        members = [p for p in images if p.startswith(prefix)]
        if members:
            files.extend(members)
            labels.extend([len(used)] * len(members))
            used.append(name)
    if not files:
        raise ValueError(
            f"data.path: {path!r} has neither class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}) "
            "nor image + .txt caption pairs"
        )
    if len(files) < len(images):
        log.warning("%s: %d images outside class sub-folders are left out", path, len(images) - len(files))
    return layout, files, labels, used


class FolderSource(_ImageSource):
    """An image folder: one sub-folder per class (label y) or image + .txt caption pairs (caption_text)."""

    def __init__(self, path: str, layout: str, image_size: int, random_flip: bool, skipped: SkipCounter):
        super().__init__(image_size, random_flip, skipped)
        self.layout, self.files, labels, names = scan_image_folder(path, layout)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.class_names = names if self.layout == "classes" else None
        self.caption_files = names if self.layout == "captions" else None
        self.num_classes = len(names) if self.layout == "classes" else None
        self.num_records = len(self.files)

    def describe(self, index: int) -> str:
        return f"image {self.files[index]!r}"

    def _read(self, index: int) -> tuple[Image.Image, Example]:
        pil = open_rgb(self.files[index])
        if self.labels is not None:
            return pil, {"y": self.labels[index]}
        with open(self.caption_files[index], encoding="utf-8") as f:
            return pil, {"caption_text": np.str_(f.read().strip())}

    def image_hw(self, index: int) -> tuple[int, int] | None:
        try:
            with Image.open(self.files[index]) as im:  # reads the header only
                return im.size[1], im.size[0]
        except Exception as e:
            self.skipped.skip(self.describe(index), e)
            return None


class TfdsSource(_ImageSource):
    """`tfds.data_source(name, split, data_dir)` decoded without TensorFlow; image and label features by key."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        image_key: str,
        label_key: str | None,
        image_size: int,
        random_flip: bool,
        skipped: SkipCounter,
        data_source: Any = None,
    ):
        super().__init__(image_size, random_flip, skipped)
        if data_source is None:
            import tensorflow_datasets as tfds

            try:
                data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            except Exception as e:
                raise ValueError(
                    f"data.tfds_name: cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}): "
                    f"{type(e).__name__}: {e}. Prepare it first (e.g. `tfds build {name} --data_dir DIR` with the "
                    "manual download in place) and set data.data_dir"
                ) from e
        self.src = data_source
        self.name = name
        self.image_key = image_key
        self.label_key = label_key
        self.num_records = len(data_source)
        features = getattr(getattr(data_source, "dataset_info", None), "features", None)
        try:
            self.num_classes = int(features[label_key].num_classes) if label_key and features is not None else None
        except (KeyError, AttributeError, TypeError):
            self.num_classes = None

    def describe(self, index: int) -> str:
        return f"{self.name} record {index}"

    def _read(self, index: int) -> tuple[Image.Image, Example]:
        example = self.src[index]
        if self.image_key not in example:
            raise KeyError(f"no feature {self.image_key!r} (features: {sorted(example)}); set data.image_key")
        extras = {}
        if self.label_key:
            if self.label_key not in example:
                raise KeyError(f"no feature {self.label_key!r} (features: {sorted(example)}); set data.label_key")
            extras["y"] = np.int32(example[self.label_key])
        return open_rgb(example[self.image_key]), extras


# ----------------------------------------------------------------------------------------------- videos


class VideoFolderSource:
    """A folder of captioned videos (``dit_jax.data.videos``): clips of ``num_frames`` frames every ``frame_stride``
    frames from the first, each frame resized to cover the target and centre-cropped (as images), plus
    ``caption_text``. Videos too short for a clip are unreadable (skipped and counted)."""

    num_classes = None
    layout = "captions"

    def __init__(self, path: str, image_size: int, num_frames: int, frame_stride: int, random_flip: bool,
                 skipped: SkipCounter):  # fmt: skip
        from dit_jax.data import videos

        self.files, self.caption_files = videos.scan_video_folder(path)
        self.image_size, self.num_frames, self.frame_stride = image_size, num_frames, frame_stride
        self.random_flip = random_flip
        self.skipped = skipped
        self.num_records = len(self.files)

    def describe(self, index: int) -> str:
        return f"video {self.files[index]!r}"

    def info(self, index: int) -> tuple[int, int, int] | None:
        """``(frames, height, width)`` of record ``index``, or None if unreadable (counted)."""
        from dit_jax.data import videos

        try:
            return videos.video_info(self.files[index])
        except Exception as e:  # corrupt files raise many types
            self.skipped.skip(self.describe(index), e)
            return None

    def read_clip(
        self, index: int, num_frames: int | None = None, shape: tuple[int, int] | None = None
    ) -> dict[str, Any] | None:
        """``{"frames": (F, h, w, 3) uint8, "caption_text"}`` of record ``index`` (``num_frames`` frames, default the
        source's, cropped to ``shape``, default the square ``image_size``), or None if unreadable (counted)."""
        from dit_jax.data import videos

        h, w = shape or (self.image_size, self.image_size)
        try:
            available = videos.video_info(self.files[index])[0]
            indices = videos.clip_indices(available, num_frames or self.num_frames, self.frame_stride)
            raw = videos.read_frames(self.files[index], indices)
            frames = np.stack([resize_center_crop(Image.fromarray(f), h, w) for f in raw])
            with open(self.caption_files[index], encoding="utf-8") as f:
                caption = np.str_(f.read().strip())
        except Exception as e:
            self.skipped.skip(self.describe(index), e)
            return None
        return {"frames": frames, "caption_text": caption}

    def load(self, index: int, rng: np.random.Generator, shape: tuple[int, int] | None = None) -> Example | None:
        """One example: x (F, h, w, 3) float32 in [−1, 1] (optional flip) and caption_text."""
        got = self.read_clip(index, shape=shape)
        if got is None:
            return None
        frames = got["frames"]
        if self.random_flip and rng.random() < 0.5:
            frames = hflip(frames)
        return {"x": to_model_range(frames), "caption_text": got["caption_text"]}


# ----------------------------------------------------------------------------------------------- latents


class LatentSource:
    """Precomputed latents (ArrayRecord + manifest): x = (z − shift) · scale, z sampled from the stored posterior.

    With per-channel statistics in the manifest (VAEs defining latents_mean/std): x = (z − μ_c − shift)·scale/σ_c.
    """

    def __init__(
        self,
        path: str,
        *,
        random_flip: bool,
        sample: bool,
        scale: float | None,
        shift: float | None,
        skipped: SkipCounter,
    ):
        import grain

        self.manifest = records_lib.read_manifest(path)
        cfg = self.manifest["config"]
        self.path = path
        self.random_flip = random_flip
        self.sample = sample
        self.scale = float(cfg["scaling_factor"] if scale is None else scale)
        self.shift = float(cfg.get("shift_factor", 0.0) if shift is None else shift)
        # optional per-channel statistics (as in `dit_jax.encoders.vae.scale_latents`)
        self.channel_mean = np.asarray(cfg.get("latents_mean") or 0.0, np.float32)
        self.channel_std = np.asarray(cfg.get("latents_std") or 1.0, np.float32)
        self.skipped = skipped
        self.num_classes = cfg.get("num_classes") if cfg.get("has_labels") else None
        self.has_labels = bool(cfg.get("has_labels"))
        self.has_embeddings = bool(cfg.get("has_embeddings"))
        self.has_condition = bool(cfg.get("has_condition"))
        self.image_size = cfg.get("image_size")
        names = sorted(self.manifest["files"])
        shapes = [tuple(self.manifest["files"][n]["shape"]) for n in names]
        counts = [int(self.manifest["files"][n]["records"]) for n in names]
        # distinct latent shapes (h, w, c), or (f, h, w, c) for videos, by aspect ratio
        self.shapes = sorted(set(shapes), key=lambda s: (s[-3] / s[-2], s))
        self.bucket_of = np.concatenate(
            [np.full(c, self.shapes.index(s), np.int32) for s, c in zip(shapes, counts)] or [np.zeros(0, np.int32)]
        )
        self.num_records = int(sum(counts))
        self.src = grain.sources.ArrayRecordDataSource([os.path.join(path, n) for n in names])
        if len(self.src) != self.num_records:
            raise ValueError(
                f"{os.path.join(path, records_lib.MANIFEST)}: lists {self.num_records} records but the files hold "
                f"{len(self.src)}; run precompute again"
            )

    def load(self, index: int, rng: np.random.Generator, shape: tuple[int, int] | None = None) -> Example | None:
        """One example: x (h, w, c) — videos (f, h, w, c) — float32 scaled latent; y, caption, caption_mask and the
        model's text condition (e.g. context, pooled) when stored."""
        try:
            record = records_lib.decode_latent_record(self.src[index])
            expected = self.shapes[self.bucket_of[index]]
            if record["latent_mean"].shape != expected:
                raise ValueError(f"latent shape {record['latent_mean'].shape}, manifest says {expected}")
            if self.has_labels and "label" not in record:
                raise ValueError("no 'label' although the manifest says the latents are labelled")
            if self.has_embeddings and "caption_embedding" not in record:
                raise ValueError("no 'caption_embedding' although the manifest says the latents have them")
            if self.has_condition and not isinstance(record.get("condition"), dict):
                raise ValueError("no 'condition' although the manifest says the latents have a text condition")
        except Exception as e:
            self.skipped.skip(f"latent record {index} in {self.path!r}", e)
            return None
        flip = self.random_flip and rng.random() < 0.5
        if flip and "flipped_mean" in record:
            mean, logvar = record["flipped_mean"], record.get("flipped_logvar")
        else:
            mean, logvar = record["latent_mean"], record.get("latent_logvar")
            if flip:  # no stored flip: flip the latent itself (an approximation of flipping the image)
                mean, logvar = hflip(mean), None if logvar is None else hflip(logvar)
        z = mean.astype(np.float32)
        if self.sample and logvar is not None:
            z = z + np.exp(0.5 * logvar.astype(np.float32)) * rng.standard_normal(z.shape, dtype=np.float32)
        x = (z - self.channel_mean - self.shift) * self.scale / self.channel_std
        out: Example = {"x": x.astype(np.float32)}
        if self.has_labels:
            out["y"] = np.int32(record["label"])
        if self.has_embeddings:
            out["caption"] = record["caption_embedding"].astype(np.float32)
            out["caption_mask"] = record["caption_mask"].astype(np.int32)
        if self.has_condition:
            for key, value in record["condition"].items():
                value = np.asarray(value)
                out[key] = value.astype(np.float32 if np.issubdtype(value.dtype, np.floating) else np.int32)
        return out
