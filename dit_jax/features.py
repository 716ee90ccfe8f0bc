"""DiT features for dense correspondence (DiTF: Gan et al., "Unleashing Diffusion Transformers for Visual
Correspondence by Modulating Massive Activations", 2025).

A DiT's hidden states carry *massive activations*: a few fixed channels whose magnitude is orders above the rest on
every token. They hold little local information and dominate any distance between tokens. DiTF reads block ``k``'s
input ``h`` (the image tokens after ``k`` blocks) on a lightly noised image, zeroes the massive channels of ``h``
(channel discard, so the LayerNorm statistics are not set by them), and applies the AdaLN the model itself applies to
``h``: ``LN(h)·(1 + scale) + shift`` with block ``k``'s attention-branch modulation for the chosen timestep and
condition. That is exactly the tensor block ``k``'s self-attention reads (``block = depth``: the final layer's
modulated LayerNorm). Correspondences are nearest neighbours by cosine similarity, scored by PCK.

The block input and its modulation are read from the model's own forward pass through ``flax.linen``'s method
interception; no model file exposes anything. Supported families: DiT, PixArt-α/Σ, SD3 (the image stream).

Command (a correspondence demo on scikit-learn digits warped by known affine maps, see README "DiT features"):
    python -m dit_jax.features --workdir runs/quickstart
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import DDPMSchedule, FlowSchedule, from_diffusers_scheduler_config, q_sample
from dit_jax.models import family_of, set_scan
from dit_jax.nn.layers import layer_norm, modulate

#: massive if a channel's median magnitude over tokens exceeds this many times the median over channels
MASSIVE_RATIO = 100.0


class BlockInput(NamedTuple):
    """Block ``k``'s image-token input and the AdaLN its attention branch applies to it.

    ``hidden`` (B, N, D) float32; ``shift``, ``scale`` (B, D) float32; ``eps`` the block's LayerNorm eps; ``grid`` the
    (h, w) token grid of the N tokens (row-major).
    """

    hidden: jax.Array
    shift: jax.Array
    scale: jax.Array
    eps: float
    grid: tuple[int, int]


# ---- where block k's input and modulation live, per family -------------------------------------------------------
# Each tap gets the recorded calls {module path: (args, output)} of one forward pass and returns
# (hidden, shift, scale, eps). ``paths(config, k)`` names the modules to record: the block (its input) and, where
# the modulation is a submodule's output, that submodule.


def _block_path(config: Any, k: int) -> tuple[str, ...]:
    return ("final_layer",) if k == config.depth else (f"blocks_{k}",)


def _dit_paths(config: Any, k: int) -> list[tuple[str, ...]]:
    return [_block_path(config, k), _block_path(config, k) + ("adaLN_modulation",)]


def _dit_tap(config, params, calls, k):
    (x, *_), _ = calls[_block_path(config, k)]
    _, mods = calls[_block_path(config, k) + ("adaLN_modulation",)]
    return x, mods[0], mods[1], 1e-6  # DiTBlock's attention LayerNorm and FinalLayer: eps 1e-6


def _sd3_paths(config: Any, k: int) -> list[tuple[str, ...]]:
    if k == config.depth:
        return _dit_paths(config, k)
    return [_block_path(config, k), _block_path(config, k) + ("x_block", "adaLN_modulation")]


def _sd3_tap(config, params, calls, k):
    if k == config.depth:
        return _dit_tap(config, params, calls, k)
    ((x, _ctx), *_), _ = calls[_block_path(config, k)]
    _, mods = calls[_block_path(config, k) + ("x_block", "adaLN_modulation")]
    return x, mods[0], mods[1], 1e-6  # MMDiT: every LayerNorm eps 1e-6


def _pixart_paths(config: Any, k: int) -> list[tuple[str, ...]]:
    return [_block_path(config, k)]


def _pixart_tap(config, params, calls, k):
    """adaLN-single: (shift, scale) = the block's ``scale_shift_table`` rows 0, 1 plus the matching chunks of ``t0``
    (final layer: its (2, D) table plus the timestep embedding)."""
    path = _block_path(config, k)
    table = jnp.asarray(params[path[0]]["scale_shift_table"], jnp.float32)
    args, _ = calls[path]
    x = args[0]
    if k == config.depth:
        temb = args[1].astype(jnp.float32)  # T2IFinalLayer(x, t)
        return x, table[0] + temb, table[1] + temb, 1e-6
    t0 = args[3].astype(jnp.float32)  # PixArtBlock(x, context, mask, t0): t0 (B, 6·D)
    d = x.shape[-1]
    return x, table[0] + t0[:, :d], table[1] + t0[:, d : 2 * d], config.norm_eps


_TAPS: dict[str, tuple[Callable, Callable]] = {
    "dit": (_dit_paths, _dit_tap),
    "pixart": (_pixart_paths, _pixart_tap),
    "sd3": (_sd3_paths, _sd3_tap),
}


def _check_block(config: Any, block: int) -> None:
    if config.family not in _TAPS:
        raise ValueError(f"DiT features are not available for {config.family!r} models; supported: {sorted(_TAPS)}")
    if not 0 <= block <= config.depth:
        raise ValueError(
            f"block={block!r} is invalid: expected 0 … {config.depth} (block k's input; {config.depth} = the "
            f"final layer's input)"
        )


@functools.lru_cache(maxsize=16)
def _forward(config: Any, block: int) -> Callable:
    """Jitted ``(params, x, t, condition) -> (hidden, shift, scale)`` running the model up to ``block``."""
    family = family_of(config)
    module = family.module_class(config)
    paths_of, tap = _TAPS[config.family]
    wanted = set(paths_of(config, block))

    def run(params, x, t, condition):
        calls: dict[tuple[str, ...], tuple] = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            name = path[0] if len(path) == 1 else ""
            if name.startswith("blocks_") and int(name.split("_")[1]) > block:
                return args[0]  # blocks past the tap are skipped: each returns its first argument's structure
            out = next_fun(*args, **kwargs)
            if path in wanted:
                calls[path] = (args, out)
            return out

        with nn.intercept_methods(interceptor):
            family.apply(module, params, x, t, condition)
        if missing := wanted - calls.keys():
            raise ValueError(f"block {block} did not run (modules {sorted(missing)} were not called)")
        hidden, shift, scale, eps = tap(config, params, calls, block)
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return f32(hidden), f32(shift), f32(scale), jnp.float32(eps)

    return jax.jit(run)


def default_schedule(config: Any) -> DDPMSchedule | FlowSchedule:
    """The noise schedule of the family's reference pipeline (DiT: DDPM, linear betas, 1000 steps)."""
    scheduler = family_of(config).scheduler_config_for(config)
    if scheduler is None:
        raise ValueError(f"{config.family!r} models have no default scheduler: pass schedule=")
    return from_diffusers_scheduler_config(dict(scheduler))[0]


def noised(schedule: DDPMSchedule | FlowSchedule, x0: jax.Array, t: jax.Array | float, noise: jax.Array) -> jax.Array:
    """x₀ diffused to model timestep ``t`` ∈ [0, T): DDPM √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (t rounded to a step); rectified
    flow (1 − σ)·x₀ + σ·ε with σ = t / T (the model sees σ·T in both objectives)."""
    b = x0.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    if isinstance(schedule, FlowSchedule):
        s = (t / schedule.num_train_timesteps).reshape((b,) + (1,) * (x0.ndim - 1))
        return (1.0 - s) * x0 + s * noise
    return q_sample(schedule, x0, jnp.round(t).astype(jnp.int32), noise)


def _null_condition(config: Any, batch: int) -> dict[str, Any]:
    family = family_of(config)
    if family.task != "class-to-image":
        raise ValueError(f"{family.display_name} models need condition= (e.g. an encoded empty prompt)")
    cond = family.label_condition(config, jnp.zeros((batch,), jnp.int32))
    return family.guidance_conditions(config, cond)[1]


def block_input(
    config: Any,
    params: Any,
    x: jax.Array,
    *,
    block: int,
    t: float | jax.Array,
    condition: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    noise: jax.Array | None = None,
    schedule: DDPMSchedule | FlowSchedule | None = None,
) -> BlockInput:
    """Block ``block``'s input tokens and attention modulation on ``x`` (B, H, W, in_channels) noised to model
    timestep ``t`` with ``noise`` (or a draw from ``key``).

    ``condition`` defaults to the null class for class-conditional families. ``block = depth`` reads the final
    layer. Scanned or rematerialised models run in the looped layout (``dit_jax.models.set_scan``).
    """
    _check_block(config, block)
    if x.ndim != 4 or x.shape[-1] != config.in_channels:
        raise ValueError(
            f"expected model inputs (B, H, W, {config.in_channels}), got {x.shape}; encode images to latents first"
        )
    config, params = set_scan(config, params, False)
    config = dataclasses.replace(config, remat="none")
    if noise is None:
        if key is None:
            raise ValueError("pass key= (or noise=) to noise the inputs")
        noise = jax.random.normal(key, x.shape, jnp.float32)
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {noise.shape} != input shape {x.shape}")
    schedule = default_schedule(config) if schedule is None else schedule
    x = jnp.asarray(x, jnp.float32)
    x_t = noised(schedule, x, t, jnp.asarray(noise, jnp.float32))
    condition = _null_condition(config, x.shape[0]) if condition is None else dict(condition)
    t_model = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
    if isinstance(schedule, DDPMSchedule):
        t_model = jnp.round(t_model)
    hidden, shift, scale, eps = _forward(config, block)(params, x_t, t_model, condition)
    p = config.patch_size
    return BlockInput(hidden, shift, scale, float(eps), (x.shape[1] // p, x.shape[2] // p))


# ---- DiTF --------------------------------------------------------------------------------------------------------


def massive_mask(hidden: jax.Array, ratio: float = MASSIVE_RATIO) -> jax.Array:
    """(C,) bool: channels whose median |activation| over all tokens exceeds ``ratio`` × the median of those
    per-channel medians. The median over tokens asks a channel to be large on most tokens, not on a few."""
    per_channel = jnp.median(jnp.abs(hidden.reshape(-1, hidden.shape[-1])).astype(jnp.float32), axis=0)  # C
    return per_channel > ratio * jnp.median(per_channel)


def massive_channels(features: jax.Array, ratio: float = MASSIVE_RATIO) -> np.ndarray:
    """Indices (ascending) of the massive-activation channels of ``features`` (..., C): see ``massive_mask``."""
    return np.flatnonzero(np.asarray(massive_mask(jnp.asarray(features), ratio)))


def ditf(
    inputs: BlockInput, *, modulate_features: bool = True, discard: jax.Array | Sequence[int] | None = None
) -> jax.Array:
    """Features (B, h, w, D) from a block's input: ``discard`` channels (indices or a (D,) bool mask) are zeroed
    before the LayerNorm and in the result; with ``modulate_features`` the block's AdaLN ``LN(h)·(1 + scale) +
    shift`` is applied, else the (discarded) raw hidden state is returned."""
    h = inputs.hidden  # B N D
    d = h.shape[-1]
    keep = jnp.ones((d,), bool)
    if discard is not None:
        discard = jnp.asarray(discard)
        if discard.dtype == bool:
            keep = ~discard
        else:
            if not np.all((np.asarray(discard) >= 0) & (np.asarray(discard) < d)):
                raise ValueError(f"discard channels {np.asarray(discard).tolist()} are not all in [0, {d})")
            keep = keep.at[discard].set(False)
    h = jnp.where(keep, h, 0.0)
    if modulate_features:
        h = jnp.where(keep, modulate(layer_norm(h, inputs.eps), inputs.shift, inputs.scale), 0.0)
    return h.reshape(h.shape[0], *inputs.grid, d)


def extract_features(
    config: Any,
    params: Any,
    images_or_latents: jax.Array,
    *,
    block: int,
    t: float | jax.Array,
    condition: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    modulate: bool = True,
    discard_massive: bool | Sequence[int] = True,
    ratio: float = MASSIVE_RATIO,
    ensemble: int = 1,
    noise: jax.Array | None = None,
    schedule: DDPMSchedule | FlowSchedule | None = None,
) -> jax.Array:
    """DiTF features (B, h, w, D) of block ``block`` at model timestep ``t`` (DiTF uses t ≈ 260 of 1000).

    ``images_or_latents`` (B, H, W, in_channels) are the model's inputs (pixels for a pixel-space model, VAE latents
    otherwise). ``modulate``: apply block ``block``'s own AdaLN to its LayerNormed input. ``discard_massive``: True
    zeroes the channels ``massive_channels`` finds over the whole batch (give both images of a pair in one call, so
    both lose the same channels); channel indices or a (D,) bool mask discard those. ``ensemble`` > 1 averages the
    features over that many noise draws (``noise``: (ensemble, B, H, W, C) or (B, H, W, C) for one).
    ``modulate=False, discard_massive=False`` gives the raw hidden state.
    """
    x = jnp.asarray(images_or_latents, jnp.float32)
    if ensemble < 1:
        raise ValueError(f"ensemble={ensemble!r} is invalid: expected ≥ 1")
    if noise is None:
        if key is None:
            raise ValueError("pass key= (or noise=) to noise the inputs")
        noise = jax.random.normal(key, (ensemble,) + x.shape, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32).reshape((ensemble,) + x.shape)
    b = x.shape[0]
    if condition is not None:
        condition = jax.tree.map(lambda a: jnp.concatenate([jnp.asarray(a)] * ensemble), dict(condition))
    inputs = block_input(
        config,
        params,
        jnp.tile(x, (ensemble, 1, 1, 1)),
        block=block,
        t=jnp.tile(jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,)), ensemble),
        condition=condition,
        noise=noise.reshape((ensemble * b,) + x.shape[1:]),
        schedule=schedule,
    )
    if discard_massive is True:
        discard = massive_mask(inputs.hidden, ratio)
    elif discard_massive is False or discard_massive is None:
        discard = None
    else:
        discard = np.asarray(discard_massive)
        discard = discard if discard.dtype == bool else discard.astype(np.int32)
    feats = ditf(inputs, modulate_features=modulate, discard=discard)
    return feats.reshape((ensemble, b) + feats.shape[1:]).mean(0)


# ---- matching ----------------------------------------------------------------------------------------------------


def match(features_a: jax.Array, features_b: jax.Array) -> jax.Array:
    """Nearest neighbour by cosine similarity: for every position of ``features_a`` (..., h_a, w_a, C) the (row,
    column) of the most similar position of ``features_b`` (..., h_b, w_b, C), as int32 (..., h_a, w_a, 2)."""
    a, b = jnp.asarray(features_a, jnp.float32), jnp.asarray(features_b, jnp.float32)
    if a.shape[-1] != b.shape[-1] or a.shape[:-3] != b.shape[:-3]:
        raise ValueError(f"feature shapes {a.shape} and {b.shape} do not match (batch and channel axes)")
    w_b = b.shape[-2]
    unit = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    fa = unit(a).reshape(a.shape[:-3] + (-1, a.shape[-1]))  # ... Na C
    fb = unit(b).reshape(b.shape[:-3] + (-1, b.shape[-1]))  # ... Nb C
    best = jnp.argmax(jnp.einsum("...ic,...jc->...ij", fa, fb, precision="highest"), axis=-1)  # ... Na
    rc = jnp.stack([best // w_b, best % w_b], axis=-1).astype(jnp.int32)
    return rc.reshape(a.shape[:-1] + (2,))


def pck(pred: Any, true: Any, alpha: float, *, size: Any = 1.0, valid: Any = None) -> float:
    """Percentage of correct keypoints: the fraction of ``valid`` points whose predicted position lies within
    ``alpha · size`` of the true one (Euclidean, in the coordinates' units). ``size``: the reference length, e.g. the
    image's longer side or an object's bounding-box side (SPair's PCK@0.1), scalar or broadcastable to the points;
    ``pred`` and ``true`` broadcast against each other."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape[-1:] != (2,) or true.shape[-1:] != (2,):
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be (..., 2) (row, column) points")
    pred, true = np.broadcast_arrays(pred, true)
    ok = np.linalg.norm(pred - true, axis=-1) <= alpha * np.asarray(size, np.float64)
    valid = np.ones(ok.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), ok.shape)
    if not valid.any():
        raise ValueError("pck of no valid points")
    return float(ok[valid].mean())


# ---- known warps (the README demo and the tests) ----------------------------------------------------------------


def affine_about_center(
    size: tuple[int, int], *, angle: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` of the map v = A·u + b on (row, column) pixel coordinates: rotate by ``angle`` degrees
    (counter-clockwise on screen) and scale about the image centre, then translate by ``shift`` (rows, columns)."""
    c = (np.asarray(size, np.float64) - 1.0) / 2.0
    th = math.radians(angle)
    a = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])  # on (row ↓, column →)
    return a, c - a @ c + np.asarray(shift, np.float64)


def warp(images: jax.Array, a: np.ndarray, b: np.ndarray, *, cval: float = 0.0) -> jax.Array:
    """``images`` (B, H, W, C) moved by v = A·u + b: out(v) = images(A⁻¹·(v − b)), bilinear, ``cval`` outside."""
    images = jnp.asarray(images, jnp.float32)
    _, height, width, channels = images.shape
    inv = np.linalg.inv(a)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    v = np.stack([rows.ravel(), cols.ravel()], 0).astype(np.float64)  # 2 HW
    u = inv @ (v - np.asarray(b, np.float64)[:, None])

    def one(img):  # H W
        return jax.scipy.ndimage.map_coordinates(img, [u[0], u[1]], order=1, mode="constant", cval=cval)

    out = jax.vmap(jax.vmap(one, in_axes=-1, out_axes=-1))(images)  # B HW C
    return out.reshape(images.shape[0], height, width, channels)


def token_centers(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(h, w, 2) pixel (row, column) centres of an h × w token grid over an image of ``size``."""
    sy, sx = size[0] / grid[0], size[1] / grid[1]
    rows, cols = np.meshgrid(
        (np.arange(grid[0]) + 0.5) * sy - 0.5, (np.arange(grid[1]) + 0.5) * sx - 0.5, indexing="ij"
    )
    return np.stack([rows, cols], -1)


def warped_pck(
    features_a: jax.Array,
    features_b: jax.Array,
    a: np.ndarray,
    b: np.ndarray,
    size: tuple[int, int],
    *,
    alpha: float = 0.1,
    valid: Any = None,
) -> float:
    """PCK@``alpha`` (of the image's longer side) of ``match``ing the token grid of image A against image B = A warped
    by v = A·u + b: every token centre of A whose true position falls inside B counts (and lies in ``valid``
    (..., h, w), e.g. tokens on the digit), the prediction being B's matched token centre."""
    grid = features_a.shape[-3:-1]
    centers_a = token_centers(grid, size)
    true = centers_a @ np.asarray(a).T + np.asarray(b)  # h w 2
    inside = (true >= -0.5).all(-1) & (true <= np.asarray(size) - 0.5).all(-1)
    pred_rc = np.asarray(match(features_a, features_b))
    centers_b = token_centers(features_b.shape[-3:-1], size)
    pred = centers_b[pred_rc[..., 0], pred_rc[..., 1]]
    mask = np.broadcast_to(inside, pred.shape[:-1])
    if valid is not None:
        mask = mask & np.broadcast_to(np.asarray(valid, bool), mask.shape)
    return pck(pred, true, alpha, size=max(size), valid=mask)


# ---- command line: the README correspondence demo ----------------------------------------------------------------


def warped_digits(
    count: int, image_size: int, *, seed: int = 0, max_angle: float = 20.0, max_scale: float = 0.15, max_shift=1.5
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``count`` scikit-learn digits (N, S, S, 1) in [−1, 1], each warped by its own random known affine map
    (rotation ≤ ``max_angle``°, scale 1 ± ``max_scale``, shift ≤ ``max_shift`` px): ``(images, warped, maps)``."""
    from dit_jax.data.sources import load_digits_arrays

    digits, _ = load_digits_arrays(image_size)
    rng = np.random.default_rng(seed)
    images = digits[rng.choice(len(digits), count, replace=False)]
    maps, warped = [], []
    for img in images:
        a, b = affine_about_center(
            (image_size, image_size),
            angle=rng.uniform(-max_angle, max_angle),
            scale=1.0 + rng.uniform(-max_scale, max_scale),
            shift=tuple(rng.uniform(-max_shift, max_shift, 2)),
        )
        maps.append((a, b))
        warped.append(np.asarray(warp(img[None], a, b, cval=-1.0))[0])
    return images, np.stack(warped), maps


def ink_tokens(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, h, w) bool: grid cells of ``images`` (N, S, S, 1) holding ink (> 0), the points worth matching."""
    n, s = images.shape[0], images.shape[1]
    return images[..., 0].reshape(n, grid[0], s // grid[0], grid[1], s // grid[1]).max((2, 4)) > 0


def correspondence_scores(
    config: Any,
    params: Any,
    images: np.ndarray,
    warped: np.ndarray,
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    block: int,
    t: float,
    alpha: float = 0.1,
    key: jax.Array,
    ensemble: int = 1,
    schedule: DDPMSchedule | FlowSchedule | None = None,
    upsample: bool = False,
) -> dict[str, float]:
    """Mean PCK@``alpha`` over the pairs (image, warped image) of raw, discarded, modulated and DiTF features and of
    the identity guess (every token matched to the same position), on tokens with ink whose true match is inside.
    ``upsample`` matches features resized (bilinear) to the image grid instead of the token grid."""
    n, size = len(images), images.shape[1:3]
    both = jnp.concatenate([jnp.asarray(images), jnp.asarray(warped)])
    variants = {"raw": (False, False), "raw+discard": (False, True), "modulated": (True, False), "ditf": (True, True)}
    scores = {}
    for name, (mod, discard) in variants.items():
        f = extract_features(
            config,
            params,
            both,
            block=block,
            t=t,
            key=key,
            modulate=mod,
            discard_massive=discard,
            ensemble=ensemble,
            schedule=schedule,
        )
        if upsample:
            f = jax.image.resize(f, (f.shape[0], *size, f.shape[-1]), "bilinear")
        ink = ink_tokens(images, f.shape[1:3])
        scores[name] = float(
            np.mean([warped_pck(f[i], f[n + i], *maps[i], size, alpha=alpha, valid=ink[i]) for i in range(n)])
        )
    grid = f.shape[1:3]
    one_hot = jnp.eye(grid[0] * grid[1]).reshape(*grid, -1)  # every position only like itself
    ink = ink_tokens(images, grid)
    scores["identity"] = float(
        np.mean([warped_pck(one_hot, one_hot, *maps[i], size, alpha=alpha, valid=ink[i]) for i in range(n)])
    )
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """Match scikit-learn digits against copies warped by known affine maps with a training run's DiT features."""
    parser = argparse.ArgumentParser(prog="python -m dit_jax.features", description=main.__doc__)
    parser.add_argument("--workdir", required=True, help="a training run of a class-conditional pixel-space DiT")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--block", type=int, default=None, help="block whose input is read (default: depth // 2)")
    parser.add_argument("--t", type=float, default=100.0, help="model timestep in [0, 1000) the images are noised to")
    parser.add_argument("--pairs", type=int, default=128, help="number of (digit, warped digit) pairs")
    parser.add_argument("--alpha", type=float, default=0.1, help="PCK threshold, a fraction of the image side")
    parser.add_argument("--ensemble", type=int, default=1, help="noise draws averaged per image")
    parser.add_argument(
        "--resolution",
        choices=("pixels", "tokens"),
        default="pixels",
        help="match features resized (bilinear) to the image grid, as DiTF does, or on the token grid",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from dit_jax.diffusion import make_schedule
    from dit_jax.runs import load_ema_params, run_config

    config, params = load_ema_params(args.workdir, args.step)
    _, _, train_config = run_config(args.workdir, args.step)
    if config.family not in _TAPS or family_of(config).task != "class-to-image" or config.in_channels != 1:
        raise SystemExit(f"{args.workdir}: the demo needs a class-conditional one-channel DiT (the quickstart run)")
    schedule = make_schedule(
        train_config["objective"], train_config.get("diffusion", {}), learned_sigma=config.learn_sigma
    )
    block = config.depth // 2 if args.block is None else args.block
    images, warped, maps = warped_digits(args.pairs, config.input_size, seed=args.seed)
    inputs = block_input(
        config, params, jnp.asarray(images), block=block, t=args.t, key=jax.random.key(args.seed), schedule=schedule
    )
    magnitude = np.median(np.abs(np.asarray(inputs.hidden)).reshape(-1, inputs.hidden.shape[-1]), axis=0)
    scores = correspondence_scores(
        config,
        params,
        images,
        warped,
        maps,
        block=block,
        t=args.t,
        alpha=args.alpha,
        key=jax.random.key(args.seed),
        ensemble=args.ensemble,
        schedule=schedule,
        upsample=args.resolution == "pixels",
    )
    report = {
        "block": block,
        "t": args.t,
        "pairs": args.pairs,
        "alpha": args.alpha,
        "massive_channels": massive_channels(inputs.hidden).tolist(),
        "largest_channel_over_median": round(float(magnitude.max() / np.median(magnitude)), 2),
        "pck": {k: round(v, 4) for k, v in scores.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
