"""PixArt's aspect-ratio tables: (height, width) sizes in pixels, sorted by ratio height/width.

They are also diffusers' resolution-binning tables (``ASPECT_RATIO_*_BIN``), so one copy serves both the training
buckets (`dit_jax.data.buckets`) and the pipelines' resolution binning; stdlib only, so that importing them does
not import the data stack.
"""

from __future__ import annotations

from collections.abc import Iterable


def _by_ratio(sizes: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The sizes sorted by ratio height/width, then height."""
    return tuple(sorted(sizes, key=lambda hw: (hw[0] / hw[1], hw[0])))


#: PixArt's ASPECT_RATIO_1024 (PixArt-alpha/sigma ``diffusion/data/datasets/utils.py``; diffusers'
#: ``ASPECT_RATIO_1024_BIN``), (height, width) in pixels; the 256/512 tables are its quarters/halves.
ASPECT_RATIO_1024 = _by_ratio((
    (512, 2048), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600), (640, 1536), (704, 1472),
    (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
    (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1728, 576),
    (2048, 512),
))  # fmt: skip
ASPECT_RATIO_512 = tuple((h // 2, w // 2) for h, w in ASPECT_RATIO_1024)
ASPECT_RATIO_256 = tuple((h // 4, w // 4) for h, w in ASPECT_RATIO_1024)
#: PixArt-Σ's 2K table: the 1024 table doubled, plus 7 extreme-ratio sizes.
ASPECT_RATIO_2048 = _by_ratio(
    [(2 * h, 2 * w) for h, w in ASPECT_RATIO_1024]
    + [(1024, 3968), (1024, 3840), (3328, 1152), (3584, 1152), (3712, 1024), (3840, 1024), (3968, 1024)]
)
