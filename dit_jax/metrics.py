"""FID, sFID, Inception Score and improved precision/recall of generated images, as ADM's evaluator reports them.

Features come from the FID Inception (``dit_jax.encoders.inception``, pytorch-fid's weights), extracted in batches
sharded over the local devices. From them:

- **FID**: the Fréchet distance between Gaussians fitted to the 2048-d pool features (mean and covariance in float64),
  with ``scipy.linalg.sqrtm`` and pytorch-fid's handling of a singular product (``eps`` on the diagonals) and of a
  numerically complex square root (its real part, unless the diagonal's imaginary part exceeds 1e-3);
- **sFID**: the same on the 2023 spatial features (``mixed_6/conv``, 7 channels × 17 × 17);
- **Inception Score**: ``exp E[KL(p(y|x) ‖ p(y))]`` over 10 splits, averaged, from ``softmax(pool · W)`` with the
  1008-way softmax weights ``W`` and no bias, as ADM's evaluator (and the original TF code) multiply ``pool_3`` by the
  graph's ``softmax/logits/MatMul`` weights; ADM cuts parts of 5,000, which is 10 splits at 50,000 samples;
- **precision / recall** (Kynkäänniemi et al. 2019, k = 3): a sample is inside the reference manifold when it lies
  within the distance of some reference point to that point's 3rd nearest other reference point, and vice versa;
  squared Euclidean distances ``‖u‖² − 2u·v + ‖v‖²`` clamped at 0, computed on the device in float32 blocks of rows
  (ADM uses float16 when finite, so borderline points can differ).

Images: ADM's ``.npz`` batches (``arr_0`` uint8 NHWC, read in batches without loading the whole array; optional
``arr_1`` labels) or a folder of PNG/JPEG files. Reference statistics: ADM's ``mu``, ``sigma``, ``mu_s``,
``sigma_s`` beside ``arr_0``, or a statistics-only ``.npz`` (pytorch-fid's ``--save-stats`` writes ``mu``/``sigma``).
"""

import dataclasses
import functools
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.convert.inception import load_inception
from dit_jax.encoders.inception import InceptionConfig, InceptionV3
from dit_jax.files import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IS_SPLITS = 10
NEIGHBOURS = 3


class Activations(NamedTuple):
    """Inception features of N images: ``pool`` (N, 2048), ``spatial`` (N, 2023), ``logits`` (N, 1008) = the
    network's ``fc(pool)``, and ``softmax_logits`` (N, 1008) = ``pool · W`` without the bias (what the Inception
    Score reads, as ADM's evaluator)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray
    softmax_logits: np.ndarray


# ---- statistics and distances -------------------------------------------------------------------------------------


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))`` of (N, D) features in float64: the mean and the unbiased covariance."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature rows (N, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2·(sigma1·sigma2)^½)``, as pytorch-fid computes it: a non-finite square
    root is retried with ``eps`` added to both diagonals, a complex one keeps its real part unless the imaginary part
    of its diagonal exceeds 1e-3 (a ``ValueError``)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance square root has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> float:
    """The Inception Score of (N, C) softmax logits: the mean over ``splits`` contiguous parts (fewer when N is
    smaller) of ``exp(mean_x KL(p(y|x) ‖ p_part(y)))``, in float64 with log-probabilities from the logits (a
    probability that underflows to 0 adds 0, not NaN)."""
    from scipy.special import log_softmax, logsumexp

    logp = log_softmax(np.asarray(logits, np.float64), axis=-1)
    if logp.ndim != 2 or len(logp) == 0:
        raise ValueError(f"expected (N, classes) logits with N ≥ 1, got shape {logp.shape}")
    scores = []
    for part in np.array_split(logp, min(splits, len(logp))):
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))  # log mean_x p(y|x)
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def _square_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """(R, D), (N, D) → (R, N) squared distances ``‖u‖² − 2u·v + ‖v‖²`` clamped at 0 (float32, full precision)."""
    uu = jnp.sum(u * u, axis=1)[:, None]
    vv = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(uu - 2.0 * jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST) + vv, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_distance(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
    """(R,) the (k+1)-th smallest squared distance of each row to ``points`` (the row itself is the first)."""
    return -jax.lax.top_k(-_square_distances(rows, points), k + 1)[0][:, k]


@jax.jit
def _inside(queries: jax.Array, points: jax.Array, radii: jax.Array) -> jax.Array:
    """(R,) whether each query lies within some point's radius (squared distances)."""
    return jnp.any(_square_distances(queries, points) <= radii[None, :], axis=1)


def _row_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """``x`` in blocks of ``batch_size`` rows, the last padded with zeros; yields ``(block, valid rows)``."""
    for start in range(0, len(x), batch_size):
        block = x[start : start + batch_size]
        n = len(block)
        if n < batch_size:
            block = np.concatenate([block, np.zeros((batch_size - n, *block.shape[1:]), block.dtype)])
        yield block, n


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURS, batch_size: int = 1024) -> np.ndarray:
    """(N,) squared distance of each feature row to its k-th nearest other row (ADM's ``manifold_radii``)."""
    x = np.asarray(features, np.float32)
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature rows, got {len(x)}")
    points = jnp.asarray(x)
    rows = min(batch_size, len(x))
    return np.concatenate([np.asarray(_kth_distance(jnp.asarray(b), points, k))[:n] for b, n in _row_batches(x, rows)])


def _fraction_inside(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    pts, r = jnp.asarray(points), jnp.asarray(radii, jnp.float32)
    rows = min(batch_size, len(queries))
    hits = [np.asarray(_inside(jnp.asarray(b), pts, r))[:n] for b, n in _row_batches(queries, rows)]
    return float(np.mean(np.concatenate(hits)))


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURS, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved ``(precision, recall)``: the fraction of samples inside the reference manifold, and of reference
    points inside the sample manifold (k-NN balls; ADM's ``compute_prec_recall``); ``batch_size`` rows per block."""
    ref, smp = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
    ref_radii, smp_radii = manifold_radii(ref, k, batch_size), manifold_radii(smp, k, batch_size)
    return _fraction_inside(smp, ref, ref_radii, batch_size), _fraction_inside(ref, smp, smp_radii, batch_size)


# ---- images ---------------------------------------------------------------------------------------------------


class NpzImages:
    """An array of an ``.npz`` (ADM's ``arr_0``) read in batches of rows, without loading the whole file."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        with zipfile.ZipFile(self.path) as z:
            if f"{key}.npy" not in z.namelist():
                names = sorted(n.removesuffix(".npy") for n in z.namelist())
                raise ValueError(f"{self.path}: no {key!r} array (found {names}); expected ADM's images in {key!r}")
            with z.open(f"{key}.npy") as f:
                self.shape, self.fortran_order, self.dtype = self._header(f)
        if self.dtype.hasobject or len(self.shape) < 1:
            raise ValueError(f"{self.path}: {key!r} is a {self.dtype} array of shape {self.shape}, not images")

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of ``batch_size`` rows (the last may be shorter)."""
        if self.fortran_order:  # rows are not contiguous on disk: read it whole
            with np.load(self.path) as z:
                arr = z[self.key]
            yield from (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
            return
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            self._header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{self.path}: {self.key!r} ends after {start} of {len(self)} rows (truncated?)")
                yield np.frombuffer(buf, self.dtype).reshape(n, *self.shape[1:])


class FolderImages:
    """The PNG/JPEG files of a folder in name order, read in batches as uint8 RGB (all of one size)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{self.path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        from PIL import Image

        size = None
        for start in range(0, len(self.files), batch_size):
            out = []
            for p in self.files[start : start + batch_size]:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("RGB"))
                if size is None:
                    size = a.shape
                elif a.shape != size:
                    raise ValueError(f"{p}: size {a.shape[:2]} differs from the folder's first image {size[:2]}")
                out.append(a)
            yield np.stack(out)


def open_images(path: str | os.PathLike) -> NpzImages | FolderImages:
    """Images of an ADM ``.npz`` (``arr_0``) or of a folder of PNG/JPEG files."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise FileNotFoundError(f"images {str(path)!r} not found: expected an .npz with 'arr_0' or a folder of PNGs")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive")
    return NpzImages(path)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference batch: its images (or None) and the statistics it stores (None where absent)."""

    path: Path
    images: NpzImages | None
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None


def read_reference(path: str | os.PathLike) -> Reference:
    """An ADM reference batch (``arr_0`` images and/or ``mu``, ``sigma``, ``mu_s``, ``sigma_s``) or a statistics-only
    ``.npz``; one clear error when it holds neither images nor ``mu`` and ``sigma``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {str(path)!r} not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive")
    with np.load(path) as z:
        keys = set(z.files)
        stats = {k: np.asarray(z[k], np.float64) if k in keys else None for k in ("mu", "sigma", "mu_s", "sigma_s")}
    images = NpzImages(path) if "arr_0" in keys else None
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (stats[a] is None) != (stats[b] is None):
            raise ValueError(
                f"{path}: has {a if stats[a] is not None else b!r} without {b if stats[a] is not None else a!r}"
            )
    if images is None and stats["mu"] is None:
        raise ValueError(f"{path}: neither images ('arr_0') nor statistics ('mu', 'sigma'); found {sorted(keys)}")
    return Reference(path, images, **stats)


def write_npz(
    path: str | os.PathLike,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    activations: Activations | None = None,
) -> Path:
    """Write an ADM-style ``.npz`` atomically: ``arr_0`` uint8 NHWC images, ``arr_1`` labels, and from
    ``activations`` the statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (so it can serve as a reference)."""
    arrays: dict[str, np.ndarray] = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} of shape {images.shape}")
        arrays["arr_0"] = images
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    if activations is not None:
        arrays["mu"], arrays["sigma"] = activation_statistics(activations.pool)
        arrays["mu_s"], arrays["sigma_s"] = activation_statistics(activations.spatial)
    if not arrays:
        raise ValueError("write_npz: nothing to write (no images, labels or activations)")
    if Path(path).suffix != ".npz":
        raise ValueError(f"{path}: expected a .npz path")
    return write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


# ---- features -------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _features(config: InceptionConfig, params: Any, images: jax.Array) -> tuple[jax.Array, ...]:
    out = InceptionV3(config).apply({"params": params}, images)  # images: B H W 3 float32 in [0, 1]
    softmax_logits = jnp.dot(out.pool, params["fc"]["kernel"], precision=jax.lax.Precision.HIGHEST)
    return out.pool, out.spatial, out.logits, softmax_logits


class InceptionExtractor:
    """Inception features of image batches, each batch sharded over the local devices (a 1-D ``data`` mesh, the
    params replicated); the batch is rounded up to a multiple of the device count and the last one zero-padded."""

    def __init__(self, config: InceptionConfig, params: Any, batch_size: int = 64):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self.config = config
        self.data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))

    @classmethod
    def from_file(cls, path: str | os.PathLike, batch_size: int = 64) -> "InceptionExtractor":
        """An extractor with pytorch-fid's weights read from ``path`` (see ``load_inception``)."""
        return cls(*load_inception(path), batch_size=batch_size)

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise ValueError(f"expected uint8 images or floats in [0, 1], got {images.dtype}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if images.dtype == np.uint8:  # to [0, 1] as torchvision's ToTensor: a float32 division by 255
            return images.astype(np.float32) / np.float32(255)
        return images.astype(np.float32)

    def __call__(
        self, batches: Iterator[np.ndarray] | np.ndarray, progress: Callable[[int], None] | None = None
    ) -> Activations:
        """Features of all images in ``batches`` (an iterator of NHWC arrays, or one array): uint8 in [0, 255] or
        floats in [0, 1]. ``progress(n)`` is called with the number of images done after each batch."""
        if isinstance(batches, np.ndarray):
            batches = iter([batches])
        outs: list[tuple[np.ndarray, ...]] = []
        done = 0
        for chunk in batches:
            chunk = self._prepare(chunk)
            for block, n in _row_batches(chunk, self.batch_size):
                got = _features(self.config, self.params, jax.device_put(block, self.data))
                outs.append(tuple(np.asarray(a)[:n] for a in got))
                done += n
                if progress is not None:
                    progress(done)
        if not outs:
            raise ValueError("no images to extract features from")
        return Activations(*(np.concatenate(parts) for parts in zip(*outs)))

    def images(self, source: NpzImages | FolderImages, progress: Callable[[int], None] | None = None) -> Activations:
        """Features of every image of an ``.npz`` or folder source, read a batch at a time."""
        return self(source.batches(self.batch_size), progress)


# ---- the whole evaluation -------------------------------------------------------------------------------------


def evaluate_samples(
    reference: str | os.PathLike,
    samples: str | os.PathLike,
    inception: str | os.PathLike | InceptionExtractor,
    *,
    batch_size: int = 64,
    stored_stats: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of ``samples`` (``.npz`` or image folder) against
    ``reference`` (an ADM reference batch or statistics ``.npz``), with the Inception weights file ``inception``.

    Reference statistics are computed from its images with this network when it has them (the features are needed
    for precision/recall anyway); ``stored_stats=True`` uses its stored ``mu``/``sigma`` (``mu_s``/``sigma_s``)
    instead, as ADM's evaluator does. Without reference images precision/recall are None; without its spatial
    statistics sFID is None. ``progress(what, done, total)`` reports feature extraction.
    """
    ref = read_reference(reference)
    if stored_stats and ref.mu is None:
        raise ValueError(f"{ref.path}: stored statistics were requested but it has no 'mu'/'sigma'")
    source = open_images(samples)
    extractor = (
        inception if isinstance(inception, InceptionExtractor) else InceptionExtractor.from_file(inception, batch_size)
    )

    def report(what: str, total: int):
        return None if progress is None else (lambda done: progress(what, done, total))

    sample_acts = extractor.images(source, report("samples", len(source)))
    ref_acts = extractor.images(ref.images, report("reference", len(ref.images))) if ref.images is not None else None
    use_stored = ref_acts is None or (stored_stats and ref.mu is not None)
    if use_stored:
        mu, sigma, mu_s, sigma_s = ref.mu, ref.sigma, ref.mu_s, ref.sigma_s
    else:
        mu, sigma = activation_statistics(ref_acts.pool)
        mu_s, sigma_s = activation_statistics(ref_acts.spatial)
    s_mu, s_sigma = activation_statistics(sample_acts.pool)
    s_mu_s, s_sigma_s = activation_statistics(sample_acts.spatial)
    precision = recall = None
    if ref_acts is not None:
        precision, recall = precision_recall(ref_acts.pool, sample_acts.pool)

    def distance(what: str, *stats: np.ndarray) -> float:
        try:
            return frechet_distance(*stats)
        except ValueError as e:
            n = min([len(source)] + ([] if use_stored else [len(ref.images)]))
            hint = f" ({n} images give singular {len(stats[0])}-d covariances)" if n <= len(stats[0]) else ""
            raise ValueError(f"{what} of {source.path} against {ref.path}: {e}{hint}") from e

    return {
        "fid": distance("FID", s_mu, s_sigma, mu, sigma),
        "sfid": None if mu_s is None else distance("sFID", s_mu_s, s_sigma_s, mu_s, sigma_s),
        "inception_score": inception_score(sample_acts.softmax_logits),
        "precision": precision,
        "recall": recall,
        "num_samples": len(source),
        "num_reference": None if ref.images is None else len(ref.images),
        "reference_statistics": "stored" if use_stored else "computed from arr_0",
        "reference": str(ref.path),
        "samples": str(Path(samples)),
    }
