"""Video files for the 'video_folder' source and video precompute: listing a folder, probing and decoding clips.

A video is a file (``.mp4``/``.webm``/``.mov``/``.mkv``/``.avi`` decoded by ``imageio-ffmpeg``; animated
``.gif``/``.webp`` by Pillow) or a folder of frame images (sorted by name), each with a same-named ``.txt`` caption
beside it (``clip.mp4`` + ``clip.txt``; ``clip/`` + ``clip.txt``). A clip is ``num_frames`` frames taken every
``frame_stride`` frames from the first; frames are RGB uint8 (H, W, 3).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageSequence

from dit_jax.data.transforms import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

FFMPEG_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
PILLOW_EXTENSIONS = (".gif", ".webp")
VIDEO_EXTENSIONS = FFMPEG_EXTENSIONS + PILLOW_EXTENSIONS
_FFMPEG_HINT = "pip install 'dit-jax[video]' (or imageio-ffmpeg), or convert the videos to GIFs or frame folders"


def _frame_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def scan_video_folder(path: str) -> tuple[list[str], list[str]]:
    """``(videos, captions)`` of a folder, sorted: every video file or frame folder (searched recursively) that has
    a same-named ``.txt`` beside it; the others are left out with a warning."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path: video folder {path!r} does not exist")
    videos, uncaptioned = [], 0
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        found = [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
        frame_dirs = [d for d in dirs if _frame_files(os.path.join(root, d))]
        found += [os.path.join(root, d) for d in frame_dirs]
        dirs[:] = [d for d in dirs if d not in frame_dirs]  # a frame folder is one video: no descent
        for video in found:
            if os.path.exists(_caption_path(video)):
                videos.append(video)
            else:
                uncaptioned += 1
    if uncaptioned:
        log.warning("%s: %d videos without a .txt caption are left out", path, uncaptioned)
    if not videos:
        raise ValueError(
            f"data.path: {path!r} holds no video ({', '.join(VIDEO_EXTENSIONS)} or a folder of frames) with a .txt "
            "caption beside it"
        )
    videos.sort()
    return videos, [_caption_path(v) for v in videos]


def _caption_path(video: str) -> str:
    video = video.rstrip(os.sep)
    return (video if os.path.isdir(video) else os.path.splitext(video)[0]) + ".txt"


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError(f"decoding video files needs imageio-ffmpeg: {_FFMPEG_HINT}") from None
    return imageio_ffmpeg


def video_info(video: str) -> tuple[int, int, int]:
    """``(frames, height, width)`` of a video file or frame folder (an ffmpeg file is decoded once to count)."""
    if os.path.isdir(video):
        files = _frame_files(video)
        if not files:
            raise ValueError("a frame folder without images")
        with Image.open(files[0]) as im:
            return len(files), im.size[1], im.size[0]
    if video.lower().endswith(PILLOW_EXTENSIONS):
        with Image.open(video) as im:
            return int(getattr(im, "n_frames", 1)), im.size[1], im.size[0]
    ffmpeg = _ffmpeg()
    reader = ffmpeg.read_frames(video)
    meta = next(reader)
    reader.close()
    frames, _ = ffmpeg.count_frames_and_secs(video)
    width, height = meta["size"]
    return int(frames), int(height), int(width)


def clip_indices(available: int, num_frames: int, frame_stride: int = 1) -> list[int]:
    """The frame indices of a clip: ``num_frames`` frames every ``frame_stride`` frames from the first."""
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames={num_frames} and frame_stride={frame_stride} must be positive")
    needed = (num_frames - 1) * frame_stride + 1
    if available < needed:
        raise ValueError(
            f"{available} frames are too few for a clip of {num_frames} frames every {frame_stride} ({needed} frames)"
        )
    return list(range(0, needed, frame_stride))


def read_frames(video: str, indices: Sequence[int]) -> np.ndarray:
    """The frames ``indices`` (increasing) of a video file or frame folder: (n, H, W, 3) uint8 RGB."""
    indices = list(indices)
    if os.path.isdir(video):
        files = _frame_files(video)
        frames = []
        for i in indices:
            with Image.open(files[i]) as im:
                frames.append(np.asarray(im.convert("RGB")))
        return np.stack(frames)
    if video.lower().endswith(PILLOW_EXTENSIONS):
        wanted, frames = set(indices), {}
        with Image.open(video) as im:
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                if i in wanted:
                    frames[i] = np.asarray(frame.convert("RGB"))
                if i >= indices[-1]:
                    break
        missing = [i for i in indices if i not in frames]
        if missing:
            raise ValueError(f"frames {missing} are past the end of the animation")
        return np.stack([frames[i] for i in indices])
    reader = _ffmpeg().read_frames(video)
    try:
        meta = next(reader)
        width, height = meta["size"]
        wanted, frames = set(indices), {}
        for i, data in enumerate(reader):
            if i in wanted:
                frames[i] = np.frombuffer(data, np.uint8).reshape(height, width, 3).copy()
            if i >= indices[-1]:
                break
    finally:
        reader.close()
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ValueError(f"frames {missing} are past the end of the video")
    return np.stack([frames[i] for i in indices])
