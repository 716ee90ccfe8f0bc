"""Data: grain pipelines over digits / TFDS / image folders / precomputed latents, buckets, and precompute.

`create_dataset(config.data, batch_size=..., seed=...)` is what the trainer calls; its config keys are documented
in `dit_jax.data.pipeline`. `python -m dit_jax.data.precompute` writes the latents the 'latents' source reads.
"""

from dit_jax.data.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    ASPECT_RATIO_2048,
    BucketBatchPlan,
    bucket_table,
    buckets_for,
    closest_bucket,
)
from dit_jax.data.pipeline import DataPipeline, build_source, create_dataset, prompt_table, validate_data_config
from dit_jax.data.sources import SkipCounter, load_digits_arrays, scan_image_folder
from dit_jax.data.transforms import center_crop_arr, resize_center_crop

__all__ = [
    "ASPECT_RATIO_256",
    "ASPECT_RATIO_512",
    "ASPECT_RATIO_1024",
    "ASPECT_RATIO_2048",
    "BucketBatchPlan",
    "DataPipeline",
    "SkipCounter",
    "bucket_table",
    "buckets_for",
    "build_source",
    "center_crop_arr",
    "closest_bucket",
    "create_dataset",
    "load_digits_arrays",
    "prompt_table",
    "resize_center_crop",
    "scan_image_folder",
    "validate_data_config",
]
