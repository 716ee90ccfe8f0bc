"""Video files: frames (F, H, W, 3) in [0, 1] → an MP4 (H.264 through ``imageio-ffmpeg``) or an animated GIF/WebP
preview (Pillow), written to a temporary name beside the target and renamed when complete."""

import os
from pathlib import Path

import numpy as np

from dit_jax.files import write_atomic
from dit_jax.pipelines.images import to_uint8

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
_MP4_HINT = "pip install 'dit-jax[video]' (or imageio-ffmpeg), or write a .gif/.webp preview instead"


def _frames_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, C) with C 1 or 3, floats in [0, 1] or uint8 → (F, H, W, 3) uint8."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] not in (1, 3):
        raise ValueError(
            f"a video is (F, H, W, 3) or (F, H, W, 1) frames (one video of a pipeline's (B, F, H, W, 3) output), "
            f"got shape {frames.shape}"
        )
    pixels = frames if frames.dtype == np.uint8 else to_uint8(frames)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _write_mp4(path: Path, frames: np.ndarray, fps: float, quality: float) -> None:
    """H.264 (yuv420p, so odd sizes get their last row/column repeated to an even size) at ``quality`` 0–10."""
    import imageio_ffmpeg

    f, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (frames.shape[2], frames.shape[1]),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=quality,
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the encoder
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_animated(path: Path, frames: np.ndarray, fps: float, fmt: str) -> None:
    """An animated GIF (256-colour palette per frame) or WebP that loops forever."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    duration = max(1, round(1000.0 / fps))  # ms per frame (GIF keeps 10 ms steps)
    extra = {"quality": 90} if fmt == "WEBP" else {"optimize": False}
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=duration, loop=0, **extra)


def save_video(frames: np.ndarray, path: str | os.PathLike, fps: float = 16, *, quality: float = 8.0) -> Path:
    """Write one video's frames (F, H, W, 3) — floats in [0, 1] or uint8 — by the file's suffix: ``.mp4`` (H.264 via
    ``imageio-ffmpeg``, ``quality`` 0–10), ``.gif`` or ``.webp`` (animated previews with Pillow, looping). ``fps``:
    frames per second (Wan 2.1 videos: 16). The file is written under a temporary name and renamed when complete;
    an MP4 without ``imageio-ffmpeg`` installed is one ``ImportError`` saying what to install."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: expected a video file name ending in {', '.join(VIDEO_SUFFIXES)}")
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and not isinstance(fps, bool) and fps > 0):
        raise ValueError(f"fps={fps!r} must be a positive number")
    pixels = _frames_uint8(frames)
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ImportError(f"writing {path.name} (MP4) needs imageio-ffmpeg: {_MP4_HINT}") from None
        return write_atomic(path, lambda tmp: _write_mp4(tmp, pixels, float(fps), float(quality)))
    fmt = "GIF" if suffix == ".gif" else "WEBP"
    return write_atomic(path, lambda tmp: _write_animated(tmp, pixels, float(fps), fmt))
