"""Moving digits: the tiny text-to-video quickstart dataset, made in code from scikit-learn's handwritten digits.

A clip shows one digit (a glyph of half the frame size: the native 8×8 digit in 16×16 frames, upsampled bicubically
in larger ones, e.g. 12×12 in 24×24) sliding across a black frame in one of four directions, one glyph-travel from
edge to edge over ``num_frames`` frames, at a random position across the motion (centred with
``random_offset=False``). Pixels are in [−1, 1] (ink +1), one channel. Its "prompt" ("digit 3 moving left") is
given to the model without a text encoder: two one-hot tokens (B, 2, text_dim), or one token with both channels hot
(``prompt_tokens=1``, the video quickstart's), the digit in channels 0–9 and the direction in channels 10–13,
scaled to the magnitude of real text features (``PROMPT_SCALE``); the null prompt is all zeros. So the clips train
a text-to-video model (e.g. Wan's ``context``) on the 2-core CPU in minutes, and ``dit_jax.evaluate_video`` can
check what it generates.
"""

from __future__ import annotations

import functools

import numpy as np

from dit_jax.data.sources import SkipCounter, load_digits_arrays

DIRECTIONS = ("right", "left", "down", "up")
# (dx, dy) per direction, in image coordinates (x to the right, y down)
DIRECTION_VECTORS = np.asarray([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)], np.float32)
NUM_DIGITS = 10
PROMPT_TOKENS = 2
MIN_TEXT_DIM = NUM_DIGITS + len(DIRECTIONS)
# The value of the hot channel: real text-encoder features have norms of tens, and text projections are initialised
# for them (Wan's: std 0.02), so unit one-hot tokens would reach the blocks ~1,000× weaker than the video tokens and
# a model learns to ignore them; at 32 the projected prompt starts at a usable scale.
PROMPT_SCALE = 32.0


def prompt_text(digit: int, direction: int) -> str:
    """The prompt a clip stands for, e.g. ``"digit 3 moving left"``."""
    return f"digit {int(digit)} moving {DIRECTIONS[int(direction)]}"


def prompt_context(digits, directions, text_dim: int = 16, tokens: int = PROMPT_TOKENS) -> np.ndarray:
    """The "text features" of prompts (digit, direction): (N, tokens, text_dim) float32, hot channels at
    ``PROMPT_SCALE``: with 2 tokens, token 0 one-hot at the digit and token 1 at 10 + direction; with 1, both
    channels hot in the one token."""
    digits = np.atleast_1d(np.asarray(digits, np.int64))
    directions = np.atleast_1d(np.asarray(directions, np.int64))
    if text_dim < MIN_TEXT_DIM:
        raise ValueError(f"text_dim={text_dim} is too small: the prompts need {MIN_TEXT_DIM} channels")
    if digits.shape != directions.shape or digits.ndim != 1:
        raise ValueError(f"digits {digits.shape} and directions {directions.shape} must be equal-length vectors")
    if ((digits < 0) | (digits >= NUM_DIGITS)).any() or ((directions < 0) | (directions >= len(DIRECTIONS))).any():
        raise ValueError(f"digits must be in 0–9 and directions in 0–{len(DIRECTIONS) - 1}")
    if tokens not in (1, 2):
        raise ValueError(f"tokens={tokens}: the prompt is one token (digit and direction) or two (one each)")
    out = np.zeros((len(digits), tokens, text_dim), np.float32)
    rows = np.arange(len(digits))
    out[rows, 0, digits] = PROMPT_SCALE
    out[rows, tokens - 1, NUM_DIGITS + directions] = PROMPT_SCALE
    return out


def prompt_table(text_dim: int = 16, tokens: int = PROMPT_TOKENS) -> dict[str, np.ndarray]:
    """``{prompt text: its text features (tokens, text_dim)}`` for all 40 prompts ("digit 3 moving left", …): what a
    model trained on these clips reads as its text condition (``dit_jax.pipelines`` samples a moving-digits run by
    prompt through it)."""
    pairs = [(d, k) for d in range(NUM_DIGITS) for k in range(len(DIRECTIONS))]
    feats = prompt_context([d for d, _ in pairs], [k for _, k in pairs], text_dim, tokens)
    return {prompt_text(d, k): f for (d, k), f in zip(pairs, feats)}


@functools.lru_cache(maxsize=4)
def glyphs(glyph_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ink (N, g, g) float32 in [0, 1], labels (N,) int32)``: the digits at ``glyph_size`` (8: native)."""
    x, y = load_digits_arrays(None if glyph_size == 8 else glyph_size)
    ink = np.clip((x[..., 0] + 1.0) / 2.0, 0.0, 1.0)
    ink.flags.writeable = False
    y.flags.writeable = False
    return ink, y


def trajectory(direction: int, num_frames: int, frame_size: int, glyph_size: int, offset: int) -> np.ndarray:
    """Top-left (x, y) of the glyph in each frame (F, 2) int: from one edge to the other along the direction,
    ``offset`` pixels from the top (horizontal motion) or the left (vertical motion)."""
    travel = frame_size - glyph_size
    along = np.rint(np.linspace(0.0, travel, num_frames)).astype(np.int64)
    dx, dy = DIRECTION_VECTORS[direction]
    if dx < 0 or dy < 0:
        along = travel - along
    across = np.full(num_frames, offset, np.int64)
    return np.stack([along, across] if dx else [across, along], axis=-1)


MAX_TRAIL = 0.45  # a trail stays below the evaluator's ink threshold (0.5): it never counts as the glyph


def render(
    glyph: np.ndarray, direction: int, num_frames: int, frame_size: int, offset: int, trail: float = 0.0
) -> np.ndarray:
    """One clip (F, S, S, 1) float32 in [−1, 1] of ``glyph`` (g, g) ink in [0, 1] moving in ``direction``; with
    ``trail`` > 0 every frame after the first also shows the glyph where it was in the frame before, dimmed to
    ``trail`` (a motion trail: each frame then shows which way the digit goes)."""
    g = glyph.shape[0]
    video = np.zeros((num_frames, frame_size, frame_size), np.float32)
    path = trajectory(direction, num_frames, frame_size, g, offset)
    for k, (x, y) in enumerate(path):
        if trail and k:
            px, py = path[k - 1]
            video[k, py : py + g, px : px + g] = trail * glyph
        window = video[k, y : y + g, x : x + g]
        np.maximum(window, glyph, out=window)
    return (video * 2.0 - 1.0)[..., None]


class MovingDigitsSource:
    """The 'moving_digits' source: every digit (1,797) in every direction (4). Record ``i`` is digit ``i // 4``
    moving in direction ``i % 4``; the position across the motion is drawn per example from the pipeline's rng."""

    num_classes = None  # prompts, not classes

    def __init__(
        self,
        image_size: int = 16,
        num_frames: int = 8,
        text_dim: int = 16,
        skipped: SkipCounter | None = None,
        random_offset: bool = True,
        prompt_tokens: int = PROMPT_TOKENS,
        trail: float = 0.0,
    ):
        if image_size < 16 or image_size % 8:
            raise ValueError(f"data.image_size: {image_size} must be a multiple of 8, at least 16")
        if num_frames < 2:
            raise ValueError(f"data.num_frames: {num_frames} must be at least 2 (a clip that moves)")
        if text_dim < MIN_TEXT_DIM:
            raise ValueError(f"data.text_dim: {text_dim} must be at least {MIN_TEXT_DIM} (10 digits + 4 directions)")
        self.image_size, self.num_frames, self.text_dim = image_size, num_frames, text_dim
        if not 0.0 <= trail <= MAX_TRAIL:
            raise ValueError(f"data.trail: {trail} must be in [0, {MAX_TRAIL}] (dimmer than the glyph's ink)")
        self.random_offset, self.prompt_tokens, self.trail = random_offset, prompt_tokens, float(trail)
        self.glyph_size = image_size // 2
        self.ink, self.labels = glyphs(self.glyph_size)
        self.num_records = len(self.labels) * len(DIRECTIONS)
        self.skipped = skipped or SkipCounter("moving_digits")

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.image_size, self.image_size, 1)

    def example(self, index: int, offset: int) -> dict[str, np.ndarray]:
        """``x`` (F, S, S, 1) in [−1, 1] and ``context`` (2, text_dim) of record ``index`` at ``offset``."""
        digit_index, direction = divmod(int(index), len(DIRECTIONS))
        x = render(self.ink[digit_index], direction, self.num_frames, self.image_size, offset, self.trail)
        context = prompt_context([self.labels[digit_index]], [direction], self.text_dim, self.prompt_tokens)[0]
        return {"x": x, "context": context}

    def load(self, index: int, rng: np.random.Generator, shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """One example at a random position across the motion (centred without ``random_offset``)."""
        room = self.image_size - self.glyph_size
        return self.example(index, int(rng.integers(0, room + 1)) if self.random_offset else room // 2)
