"""Image preprocessing shared by every pixel source and by precompute: decode, ADM centre crop, range, flips."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def open_rgb(image: str | os.PathLike | bytes | np.ndarray | Image.Image) -> Image.Image:
    """Decodes a path, encoded bytes, a uint8 array or a PIL image into a fully loaded RGB PIL image."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        pil = Image.fromarray(np.ascontiguousarray(arr))
    elif isinstance(image, bytes | bytearray | memoryview):
        pil = Image.open(io.BytesIO(bytes(image)))
    else:
        pil = Image.open(image)
    pil.load()  # decode now, so that corrupt data fails here and not later
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def resize_center_crop(pil: Image.Image, height: int, width: int) -> np.ndarray:
    """Resizes to cover (height, width) and centre-crops: ADM's `center_crop_arr` generalised to rectangles.

    Halves the image with a BOX filter while both sides stay at least twice the target, then resizes with BICUBIC
    so that it just covers the target, then crops the centre. For a square target this is exactly ADM's
    `center_crop_arr` (guided-diffusion, used by DiT): the min side becomes `size`.
    """
    while pil.size[0] >= 2 * width and pil.size[1] >= 2 * height:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
    scale = max(height / pil.size[1], width / pil.size[0])
    pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - height) // 2
    left = (arr.shape[1] - width) // 2
    return arr[top : top + height, left : left + width]


def center_crop_arr(pil: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre-crop preprocessing to a square `image_size` (uint8 HWC)."""
    return resize_center_crop(pil, image_size, image_size)


def to_model_range(arr: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [−1, 1] (the model-input range of pixel-space DiTs)."""
    return arr.astype(np.float32) / 127.5 - 1.0


def hflip(arr: np.ndarray) -> np.ndarray:
    """Horizontal flip of an (…, H, W, C) array — an image HWC or a video FHWC — (a contiguous copy)."""
    return np.ascontiguousarray(arr[..., ::-1, :])
