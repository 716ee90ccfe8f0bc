"""Aspect-ratio buckets for multi-scale training (PixArt-style) and batches formed within one bucket.

A bucket table lists (height, width) sizes with ratio height/width in [0.25, 4] and area about base². For 256,
512, 1024 and 2048 they are PixArt's own tables (``ASPECT_RATIO_*``, defined in `dit_jax.models.aspect_ratios`;
also diffusers' resolution-binning tables, used by ``dit_jax.pipelines``); `bucket_table` generates one for any
other base (multiples of `step`, the largest area not above base²). Each image goes to the bucket with the closest
ratio (in log space, so 1:2 and 2:1 are equally far from 1:1), is resized to cover it and centre-cropped. Every
batch holds one bucket, so shapes are static per bucket and the trainer compiles one step per bucket shape.

With several processes every process must see the same shape at the same step, so the plan is global: each
epoch, every bucket's members are shuffled and cut into *global* batches (drop remainder per bucket), the list
of batches is shuffled, and each process takes its contiguous slice of every global batch. All processes compute
the same plan from the same seed.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from dit_jax.models.aspect_ratios import ASPECT_RATIO_256, ASPECT_RATIO_512, ASPECT_RATIO_1024, ASPECT_RATIO_2048


def bucket_table(
    base: int, step: int | None = None, *, min_ratio: float = 0.25, max_ratio: float = 4.0
) -> tuple[tuple[int, int], ...]:
    """(height, width) sizes, multiples of `step` (default max(16, base // 16)), area ≤ base², sorted by ratio."""
    step = max(16, base // 16) if step is None else step
    if base <= 0 or step <= 0 or base % step:
        raise ValueError(f"bucket_table: base={base} must be a positive multiple of step={step}")
    sizes: set[tuple[int, int]] = set()
    for h in range(step, 4 * base + 1, step):
        w = (base * base // h) // step * step
        if w >= step and min_ratio <= h / w <= max_ratio:
            sizes.add((h, w))
            sizes.add((w, h))
    return tuple(sorted(sizes, key=lambda hw: (hw[0] / hw[1], hw[0])))


BUCKET_TABLES = {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024, 2048: ASPECT_RATIO_2048}


def buckets_for(base: int) -> tuple[tuple[int, int], ...]:
    """The bucket table for base resolution `base` (the fixed tables for 256/512/1024, else generated)."""
    return BUCKET_TABLES.get(base) or bucket_table(base)


def closest_bucket(height: int, width: int, table: tuple[tuple[int, int], ...]) -> int:
    """Index of the bucket whose ratio is closest to height/width (log-ratio distance; ties go to the first)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"closest_bucket: image size must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(range(len(table)), key=lambda i: abs(math.log(table[i][0] / table[i][1]) - target))


class BucketBatchPlan:
    """Global batches drawn within buckets; `shard(step, i, n)` gives process i's bucket and example indices."""

    def __init__(self, bucket_of: np.ndarray, num_buckets: int, *, global_batch: int, seed: int, shuffle: bool = True):
        bucket_of = np.asarray(bucket_of)
        self.global_batch = global_batch
        self._seed = seed
        self._shuffle = shuffle
        # Records with bucket −1 (unreadable at assignment time) are left out.
        self._members = [np.flatnonzero(bucket_of == k) for k in range(num_buckets)]
        self.batches_per_epoch = sum(len(m) // global_batch for m in self._members)
        if self.batches_per_epoch == 0:
            largest = max((len(m) for m in self._members), default=0)
            raise ValueError(
                f"no bucket holds a full global batch of {global_batch} examples (the largest holds {largest}); "
                "lower batch_size or add data"
            )
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket id per batch, example indices per batch (M, G)) for one epoch, cached."""
        with self._lock:
            if epoch in self._cache:
                return self._cache[epoch]
            rng = np.random.default_rng([self._seed, epoch])
            buckets, batches = [], []
            for k, members in enumerate(self._members):
                order = rng.permutation(members) if self._shuffle else members
                n = len(order) // self.global_batch
                batches.append(order[: n * self.global_batch].reshape(n, self.global_batch))
                buckets.append(np.full(n, k))
            bucket_ids, indices = np.concatenate(buckets), np.concatenate(batches)
            if self._shuffle:
                perm = rng.permutation(len(bucket_ids))
                bucket_ids, indices = bucket_ids[perm], indices[perm]
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (bucket_ids, indices)
            return bucket_ids, indices

    def shard(self, step: int, shard_index: int, shard_count: int) -> tuple[int, np.ndarray]:
        """(bucket id, this shard's example indices) of global batch number `step` (steps run over all epochs)."""
        epoch, j = divmod(step, self.batches_per_epoch)
        bucket_ids, indices = self._epoch(epoch)
        per_shard = self.global_batch // shard_count
        return int(bucket_ids[j]), indices[j, shard_index * per_shard : (shard_index + 1) * per_shard]


# ----------------------------------------------------------------------------------------------- video buckets


def frame_counts(num_frames: int, temporal_factor: int = 4) -> tuple[int, ...]:
    """The clip lengths ``1 + t·k`` up to ``num_frames`` (itself ``1 + t·k``): what a causal video VAE with temporal
    factor t encodes to ``1 + k`` latent frames (Wan 2.1: t = 4, 81 frames → 21)."""
    if temporal_factor < 1 or num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames={num_frames} is not 1 + {temporal_factor}·k (the VAE's temporal factor)")
    return tuple(range(1, num_frames + 1, temporal_factor))


def video_bucket(
    frames: int,
    height: int,
    width: int,
    sizes: tuple[tuple[int, int], ...],
    counts: tuple[int, ...],
    frame_stride: int = 1,
) -> tuple[int, int, int] | None:
    """The (frames, height, width) bucket of a video with ``frames`` frames of ``height × width``: the longest clip
    of ``counts`` that fits at ``frame_stride`` (``(n − 1)·stride + 1 ≤ frames``) and the size of ``sizes`` with
    the closest aspect ratio; None if not even the shortest clip fits."""
    fitting = [n for n in counts if (n - 1) * frame_stride + 1 <= frames]
    if not fitting:
        return None
    return (max(fitting), *sizes[closest_bucket(height, width, sizes)])
