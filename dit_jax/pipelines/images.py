"""Pipeline outputs: float images in [0, 1] → uint8, PIL images, grids, and PNG files written atomically."""

import os
from pathlib import Path

import numpy as np

from dit_jax.files import write_atomic


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(…, H, W, C) floats in [0, 1] → uint8, rounded as diffusers' ``numpy_to_pil`` (``(x·255).round()``)."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list:
    """(B, H, W, C) floats in [0, 1] → a list of PIL images (mode ``L`` for one channel, ``RGB`` for three)."""
    from PIL import Image

    out = []
    for im in to_uint8(images):
        out.append(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im))
    return out


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 → one image with ``nrow`` images per row and ``padding`` black pixels around each
    (torchvision ``make_grid`` layout, which DiT's ``sample.py`` uses through ``save_image``)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"make_grid takes a non-empty (B, H, W, C) batch, got shape {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow={nrow} must be a positive integer")
    b, h, w, c = images.shape
    cols = min(nrow, b)
    rows = -(-b // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), images.dtype)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = im
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write one (H, W, C) uint8 image as PNG: to a temporary name beside ``path``, then renamed."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: expected a .png file name")
    return write_atomic(path, lambda tmp: Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp))
