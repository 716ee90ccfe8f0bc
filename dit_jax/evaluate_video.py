"""The video quickstart's evaluator (``python -m dit_jax.evaluate --workdir runs/video_quickstart`` lands here for a
run trained on 'moving_digits'): do the generated clips show the prompted digit moving the prompted way?

For each of the 40 prompts (10 digits × 4 directions) it generates ``--samples_per_class`` (default 5) clips with the
run's EMA params (the sampler settings of the run's ``config.sample`` unless overridden), then checks every clip frame
by frame:

- the digit: the frame's ink (pixels brighter than mid-grey) gives its centre of mass; the glyph-sized window around
  it is shrunk to 8×8 and classified by an SVM fitted on the real digits drawn at random places and cut out the same
  way (as the image quickstart's evaluator fits on real digits passed through its resize). A clip shows its digit
  when most of its frames are classified as the prompted digit;
- the motion: the centre of mass must travel at least half the glyph's travel in the data (4 px of 8 for 16×16
  frames) between the first and the last frame, and that displacement must point closest to the prompted direction.

Prints frame and clip accuracies, direction accuracy and both together (per digit and per direction too), and writes
``WORKDIR/eval/step_<N>.json`` with a GIF and a PNG (one row of frames per clip) of the first clip of every prompt.
The bar: ≥ 90% of the clips right in digit and in direction.
"""

import os
import time
from typing import Any

import numpy as np

from dit_jax.data import moving_digits as md

PASS_THRESHOLD = 0.9
INK_THRESHOLD = 0.5  # pixels (in [0, 1]) above this count as ink for the centre of mass
MIN_TRAVEL = 0.5  # the fraction of the data's glyph travel a clip's centre of mass must move


def is_video_run(workdir: str) -> bool:
    """Whether ``workdir`` holds a run trained on the moving digits (False when it holds no run at all)."""
    from dit_jax.runs import run_config

    try:
        _, _, config = run_config(workdir)
    except (FileNotFoundError, ValueError, OSError):
        return False
    return config.get("data", {}).get("name") == "moving_digits"


# ---- scoring ----------------------------------------------------------------------------------------------------


def ink(videos: np.ndarray) -> np.ndarray:
    """(…, S, S, 1) in [−1, 1] → ink weights (…, S, S) in [0, 1], zero below ``INK_THRESHOLD``."""
    w = np.clip((np.asarray(videos, np.float32)[..., 0] + 1.0) / 2.0, 0.0, 1.0)
    return np.where(w > INK_THRESHOLD, w, 0.0)


def centres_of_mass(videos: np.ndarray) -> np.ndarray:
    """(N, F, S, S, 1) → (N, F, 2) ink centres (x, y) in pixels; a frame without ink gives the frame's centre."""
    w = ink(videos)
    s = w.shape[-1]
    total = w.sum(axis=(-2, -1))
    coords = np.arange(s, dtype=np.float32)
    x = (w.sum(axis=-2) * coords).sum(-1)
    y = (w.sum(axis=-1) * coords).sum(-1)
    centre = (s - 1) / 2.0
    safe = np.maximum(total, 1e-6)
    return np.stack([np.where(total > 0, x / safe, centre), np.where(total > 0, y / safe, centre)], axis=-1)


def glyph_windows(videos: np.ndarray, glyph_size: int) -> np.ndarray:
    """(N, F, S, S, 1) → (N, F, g, g) windows of the glyph size around each frame's centre of mass (inside the
    frame), values in [0, 1], pixels at or below a motion trail's brightness zeroed."""
    frames = np.clip((np.asarray(videos, np.float32)[..., 0] + 1.0) / 2.0, 0.0, 1.0)
    frames = np.where(frames > md.MAX_TRAIL, frames, 0.0)  # a motion trail is not the glyph
    n, f, s, _ = frames.shape
    com = centres_of_mass(videos)
    top_left = np.clip(np.rint(com - (glyph_size - 1) / 2.0).astype(np.int64), 0, s - glyph_size)
    out = np.empty((n, f, glyph_size, glyph_size), np.float32)
    for i in range(n):
        for k in range(f):
            x, y = top_left[i, k]
            out[i, k] = frames[i, k, y : y + glyph_size, x : x + glyph_size]
    return out


def _area_matrix(size: int, out: int = 8) -> np.ndarray:
    """(out, size): row i averages the input pixels under output pixel i (fractional overlaps weighted)."""
    edges = np.linspace(0.0, size, out + 1)
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        for j in range(size):
            m[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
    return m / m.sum(axis=1, keepdims=True)


def features(windows: np.ndarray) -> np.ndarray:
    """(…, g, g) in [0, 1] → (…, 64) on the sklearn digits scale 0–16, shrunk to 8×8 by area averaging."""
    a = _area_matrix(windows.shape[-1])
    x = np.einsum("ij,...jk,lk->...il", a, np.asarray(windows, np.float32), a)
    return (x * 16.0).reshape(*windows.shape[:-2], 64)


def fit_classifier(image_size: int, seed: int = 0, placements: int = 2, cv_folds: int = 5) -> tuple[Any, float | None]:
    """An SVM on the real digits seen as the evaluation sees generated frames: each glyph drawn ``placements`` times
    at a random place in a frame of ``image_size``, then cut out around its centre of mass and shrunk to 8×8.
    Returns it and its ``cv_folds``-fold CV accuracy (None for 0 folds)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    g = image_size // 2
    glyphs, labels = md.glyphs(g)
    rng = np.random.default_rng(seed)
    frames = np.full((placements * len(glyphs), 1, image_size, image_size, 1), -1.0, np.float32)
    for i in range(len(frames)):
        x, y = rng.integers(0, image_size - g + 1, size=2)
        frames[i, 0, y : y + g, x : x + g, 0] = glyphs[i % len(glyphs)] * 2.0 - 1.0
    feats = features(glyph_windows(frames, g))[:, 0]
    targets = np.tile(labels, placements)
    clf = SVC(gamma=0.001, C=10.0, random_state=seed)
    cv = float(np.mean(cross_val_score(clf, feats, targets, cv=cv_folds))) if cv_folds else None
    clf.fit(feats, targets)
    return clf, cv


def score_videos(
    videos: np.ndarray, digits: np.ndarray, directions: np.ndarray, *, glyph_size: int | None = None, clf: Any = None
) -> dict[str, Any]:
    """Digit and direction checks of clips (N, F, S, S, 1) in [−1, 1] prompted with ``digits`` and ``directions``
    (N,); returns the accuracies (overall, per digit, per direction) and the per-clip verdicts."""
    videos = np.asarray(videos, np.float32)
    if videos.ndim != 5 or videos.shape[-1] != 1 or videos.shape[2] != videos.shape[3]:
        raise ValueError(f"expected clips (N, F, S, S, 1), got {videos.shape}")
    digits, directions = np.asarray(digits), np.asarray(directions)
    n, f, s = videos.shape[:3]
    g = glyph_size or s // 2
    cv = None
    if clf is None:
        clf, cv = fit_classifier(s)
    pred = clf.predict(features(glyph_windows(videos, g)).reshape(n * f, 64)).reshape(n, f)
    frame_right = pred == digits[:, None]
    digit_right = frame_right.mean(axis=1) > 0.5
    com = centres_of_mass(videos)
    move = com[:, -1] - com[:, 0]  # N 2
    moved = np.linalg.norm(move, axis=-1) >= MIN_TRAVEL * (s - g)
    toward = np.argmax(move @ md.DIRECTION_VECTORS.T, axis=-1)
    direction_right = moved & (toward == directions)
    both = digit_right & direction_right

    def by(key: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
        return {
            name: {
                "digit": float(digit_right[key == k].mean()),
                "direction": float(direction_right[key == k].mean()),
                "both": float(both[key == k].mean()),
            }
            for k, name in enumerate(names)
            if (key == k).any()
        }

    report = {
        "clips": int(n),
        "frame_digit_accuracy": float(frame_right.mean()),
        "digit_accuracy": float(digit_right.mean()),
        "direction_accuracy": float(direction_right.mean()),
        "accuracy": float(both.mean()),
        "per_digit": by(digits, [str(d) for d in range(md.NUM_DIGITS)]),
        "per_direction": by(directions, list(md.DIRECTIONS)),
        "mean_travel_px": float(np.linalg.norm(move, axis=-1).mean()),
        "verdicts": {"digit": digit_right, "direction": direction_right},
    }
    report["passed"] = report["digit_accuracy"] >= PASS_THRESHOLD and report["direction_accuracy"] >= PASS_THRESHOLD
    if cv is not None:
        report["classifier_cv_accuracy_on_real"] = cv
    return report


# ---- generation -------------------------------------------------------------------------------------------------


def prompts(samples_per_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """``(digits, directions)`` (N,): every (digit, direction) pair ``samples_per_prompt`` times, prompt-major."""
    pairs = np.asarray([(d, k) for d in range(md.NUM_DIGITS) for k in range(len(md.DIRECTIONS))], np.int64)
    pairs = np.repeat(pairs, samples_per_prompt, axis=0)
    return pairs[:, 0], pairs[:, 1]


def generate_videos(
    workdir: str,
    *,
    step: int | None = None,
    samples_per_prompt: int = 5,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    method: str | None = None,
    seed: int = 1234,
    batch: int = 100,
) -> tuple[int, dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``(step, config, clips (N, F, S, S, 1) in [−1, 1], digits, directions, sampler settings)`` from a moving-digits
    run's EMA params; the prompts reach the model as the data source builds them (its ``context`` tokens)."""
    import jax
    import jax.numpy as jnp

    from dit_jax import diffusion
    from dit_jax.models import family_of
    from dit_jax.runs import load_ema_params, run_config
    from dit_jax.train.grids import generate

    step, model_config, config = run_config(workdir, step)
    data = config.get("data", {})
    if data.get("name") != "moving_digits":
        raise ValueError(f"{workdir} trained on {data.get('name')!r}; this evaluator knows the moving digits only")
    _, params = load_ema_params(workdir, step)
    family = family_of(model_config)
    s = config.get("sample", {})
    settings = dict(
        method=diffusion.default_method(config["objective"], method or s.get("method")),
        num_steps=int(num_steps or s.get("num_steps", 50)),
        guidance_scale=float(s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale),
        **dict(s.get("options", {})),
    )
    schedule = diffusion.make_schedule(
        config["objective"], config.get("diffusion", {}), learned_sigma=model_config.learn_sigma
    )
    source = md.MovingDigitsSource(int(data.get("image_size") or 16), int(data.get("num_frames") or 8),
                                   int(data.get("text_dim") or 16))  # fmt: skip
    tokens = int(data.get("prompt_tokens") or md.PROMPT_TOKENS)  # the prompt layout the run trained on
    digits, directions = prompts(samples_per_prompt)
    shape = (*source.x_shape[:-1], model_config.in_channels)

    @jax.jit
    def run(params, context, key):
        cond = family.condition(model_config, {"context": context})
        latents = jax.random.normal(key, (context.shape[0], *shape), jnp.float32)
        return generate(model_config, params, cond, latents, jax.random.fold_in(key, 1), schedule=schedule,
                        objective=config["objective"], **settings)  # fmt: skip

    key = jax.random.key(seed)
    batch = min(batch, len(digits))
    out = []
    for i in range(0, len(digits), batch):
        context = md.prompt_context(digits[i : i + batch], directions[i : i + batch], source.text_dim, tokens)
        pad = batch - len(context)
        if pad:
            context = np.concatenate([context, np.zeros((pad, *context.shape[1:]), context.dtype)])
        x = np.asarray(run(params, jnp.asarray(context), jax.random.fold_in(key, i)))
        out.append(x[: batch - pad])
    return step, config, np.concatenate(out), digits, directions, settings


def evaluate(workdir: str, **kwargs: Any) -> dict[str, Any]:
    """Generate, score and write the report (JSON) and previews; returns the report."""
    from dit_jax.files import write_json
    from dit_jax.train.grids import save_samples

    t0 = time.perf_counter()
    step, config, videos, digits, directions, settings = generate_videos(workdir, **kwargs)
    seconds = time.perf_counter() - t0
    scores = score_videos(videos, digits, directions)
    verdicts = scores.pop("verdicts")
    report = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "samples_per_prompt": int(np.sum((digits == 0) & (directions == 0))),
        **settings,
        **scores,
        "classifier": "SVC(gamma=0.001, C=10) on real digits at random places, cut out around the centre of mass "
        "and shrunk to 8x8, per frame",
        "sampling_seconds": seconds,
    }
    out_dir = os.path.join(workdir, "eval")
    path = os.path.join(out_dir, f"step_{step:07d}.json")
    write_json(path, report)
    first = np.flatnonzero(np.r_[True, (np.diff(digits) != 0) | (np.diff(directions) != 0)])  # one clip per prompt
    report["preview"] = save_samples(os.path.join(out_dir, f"step_{step:07d}"), videos[first], md.NUM_DIGITS)
    report["json"] = path
    report["verdicts"] = verdicts
    return report


def print_report(r: dict[str, Any]) -> int:
    """The moving-digits mode's report (after ``dit_jax.evaluate``'s header lines); the exit status: 0 on PASS."""
    print(f"frame classifier accuracy on real digits (5-fold CV): {r['classifier_cv_accuracy_on_real']:.3f}")
    print("  direction   digit  direction   both")
    for name, acc in r["per_direction"].items():
        print(f"  {name:9s} {acc['digit']:7.1%} {acc['direction']:9.1%} {acc['both']:7.1%}")
    print("  digit       digit  direction   both")
    for name, acc in r["per_digit"].items():
        print(f"  {name:9s} {acc['digit']:7.1%} {acc['direction']:9.1%} {acc['both']:7.1%}")
    verdict = "PASS" if r["passed"] else "FAIL"
    print(
        f"frames with the right digit: {r['frame_digit_accuracy']:.1%}   clips: digit {r['digit_accuracy']:.1%}, "
        f"direction {r['direction_accuracy']:.1%}, both {r['accuracy']:.1%}   {verdict} (digit and direction >= 90%)"
    )
    print(f"wrote {r['json']} and {r['preview']}")
    return 0 if r["passed"] else 1
