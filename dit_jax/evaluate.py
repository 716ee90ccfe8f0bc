"""``python -m dit_jax.evaluate``: check a digits run's samples (``--workdir``), or score samples by FID (``--fid``).

``--workdir runs/quickstart`` (the default mode): do the samples of a digits run show the right digit? Generates
``--samples_per_class`` images per class with the run's EMA params (the sampler settings of the run's
``config.sample`` unless overridden), shrinks them back to 8×8 by area averaging, and classifies them with an SVM
fitted on the real digits passed through the same resize and shrink. Prints per-class and overall accuracy and
writes ``WORKDIR/eval/step_<N>.json`` (and a PNG of the first samples of each class). The quickstart's bar: every
class ≥ 90%.

``--fid REF.npz --samples SAMPLES.npz|DIR --inception pt_inception-2015-12-05-6726825d.pth``: FID, sFID, Inception
Score and precision/recall of the samples against an ADM reference batch (``dit_jax.metrics``), printed as JSON
(and written atomically to ``--out`` when given). The Inception weights are a local file; nothing is downloaded.
"""

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

PASS_THRESHOLD = 0.9


def shrink(images: np.ndarray, size: int = 8) -> np.ndarray:
    """(N, S, S, 1) in [−1, 1] → (N, size·size) features on the sklearn digits scale 0–16 (area averaging)."""
    n, s = images.shape[0], images.shape[1]
    f = s // size
    x = np.clip((images[..., 0] + 1.0) / 2.0, 0.0, 1.0)
    x = x.reshape(n, size, f, size, f).mean(axis=(2, 4))
    return (x * 16.0).reshape(n, size * size)


def fit_classifier(image_size: int, seed: int = 0) -> tuple[Any, float]:
    """An SVM on the real digits (resized as in training, shrunk back); returns it and its 5-fold CV accuracy."""
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    from dit_jax.data import load_digits_arrays

    x, y = load_digits_arrays(image_size)
    feats = shrink(x)
    clf = SVC(gamma=0.001, C=10.0, random_state=seed)
    cv = float(np.mean(cross_val_score(clf, feats, y, cv=5)))
    clf.fit(feats, y)
    return clf, cv


def generate_digits(
    workdir: str,
    *,
    step: int | None = None,
    samples_per_class: int = 100,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    method: str | None = None,
    seed: int = 1234,
    batch: int = 250,
) -> tuple[int, dict[str, Any], np.ndarray, np.ndarray, dict[str, Any]]:
    """``(step, config, images (N, S, S, C) in [−1, 1], labels (N,), sampler settings)`` from a run's EMA params."""
    import jax
    import jax.numpy as jnp

    from dit_jax import diffusion
    from dit_jax.models import family_of
    from dit_jax.runs import load_ema_params, run_config
    from dit_jax.train.grids import generate

    step, model_config, config = run_config(workdir, step)
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
    size = model_config.input_size
    labels = np.repeat(np.arange(family.num_classes(model_config), dtype=np.int32), samples_per_class)

    @jax.jit
    def run(params, y, key):
        latents = jax.random.normal(key, (y.shape[0], size, size, model_config.in_channels), jnp.float32)
        return generate(
            model_config,
            params,
            family.label_condition(model_config, y),
            latents,
            jax.random.fold_in(key, 1),
            schedule=schedule,
            objective=config["objective"],
            **settings,
        )

    key = jax.random.key(seed)
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i : i + batch]
        pad = batch - len(y)
        y_in = np.concatenate([y, np.zeros(pad, np.int32)]) if pad else y
        x = np.asarray(run(params, jnp.asarray(y_in), jax.random.fold_in(key, i)))
        out.append(x[: len(y)])
    return step, config, np.concatenate(out), labels, settings


def evaluate(workdir: str, **kwargs) -> dict[str, Any]:
    """Generate, classify and score; returns the report that is also written as JSON."""
    from dit_jax.files import write_json
    from dit_jax.pipelines.images import save_png
    from dit_jax.train.grids import grid_png

    t0 = time.perf_counter()
    step, config, images, labels, settings = generate_digits(workdir, **kwargs)
    seconds = time.perf_counter() - t0
    if config["data"].get("name") != "digits":
        raise ValueError(f"{workdir} trained on {config['data'].get('name')!r}; this evaluator knows the digits only")
    clf, cv = fit_classifier(images.shape[1])
    pred = clf.predict(shrink(images))
    classes = sorted(set(labels.tolist()))
    per_class = {str(c): float(np.mean(pred[labels == c] == c)) for c in classes}
    report = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "samples_per_class": int(np.sum(labels == classes[0])),
        **settings,
        "per_class_accuracy": per_class,
        "accuracy": float(np.mean(pred == labels)),
        "min_class_accuracy": min(per_class.values()),
        "passed": min(per_class.values()) >= PASS_THRESHOLD,
        "classifier": "SVC(gamma=0.001, C=10) on the real digits (resized as in training, shrunk to 8x8)",
        "classifier_cv_accuracy_on_real": cv,
        "sampling_seconds": seconds,
    }
    out_dir = os.path.join(workdir, "eval")
    path = os.path.join(out_dir, f"step_{step:07d}.json")
    write_json(path, report)
    first = np.concatenate([images[labels == c][:10] for c in classes])
    save_png(os.path.join(out_dir, f"step_{step:07d}.png"), grid_png(first, len(classes)))
    report["json"] = path
    return report


_WORKDIR_FLAGS = ("workdir", "step", "samples_per_class", "num_steps", "guidance_scale", "method", "seed")
_FID_FLAGS = ("samples", "inception", "batch_size", "stored_stats", "out")


def _flag(name: str) -> str:
    return "--" + (name.replace("_", "-") if name in _FID_FLAGS else name)


def fid_main(args: argparse.Namespace) -> int:
    """The ``--fid`` mode: score ``--samples`` against the reference batch; prints the report as JSON."""
    import json

    from dit_jax.files import write_json
    from dit_jax.metrics import evaluate_samples

    def progress(what: str, done: int, total: int) -> None:
        print(f"\r{what}: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)

    try:
        report = evaluate_samples(
            args.fid,
            args.samples,
            args.inception,
            batch_size=args.batch_size or 64,
            stored_stats=args.stored_stats,
            progress=progress,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["inception"] = os.path.abspath(args.inception)
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return 0


DEFAULT_WORKDIR = "runs/quickstart"


def run_mode(fn: Any, args: argparse.Namespace, count_name: str, default_count: int, unit: str) -> dict | None:
    """The digits-run mode's shared part (image and video runs): ``fn(workdir, ...)`` with the run-mode flags
    (``--samples_per_class`` passed as ``count_name``, default ``default_count``), then the report's header lines.
    Bad input prints one ``error:`` line and gives None (exit status 2)."""
    count = default_count if args.samples_per_class is None else args.samples_per_class
    try:
        r = fn(
            args.workdir or DEFAULT_WORKDIR,
            step=args.step,
            num_steps=args.num_steps,
            guidance_scale=args.guidance_scale,
            method=args.method,
            seed=1234 if args.seed is None else args.seed,
            **{count_name: count},
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    sampler = f"{r['method']} {r['num_steps']} steps, guidance {r['guidance_scale']}"
    print(f"checkpoint {r['step']} of {r['workdir']}: {r[count_name]} {unit}, {sampler}")
    print(f"sampling took {r['sampling_seconds']:.0f} s")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_jax.evaluate", description=__doc__.splitlines()[0])
    run = p.add_argument_group("digits run (default mode)")
    run.add_argument("--workdir", help="training run directory (default: runs/quickstart)")
    run.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    run.add_argument("--samples_per_class", type=int, help="samples per class (default: 100)")
    run.add_argument("--num_steps", type=int, help="sampler steps (default: the run's config.sample.num_steps)")
    run.add_argument("--guidance_scale", type=float, help="CFG scale (default: the run's config.sample)")
    run.add_argument("--method", help="sampler (default: the run's config.sample.method or the objective's)")
    run.add_argument("--seed", type=int, help="sampling seed (default: 1234)")
    fid = p.add_argument_group("FID mode")
    fid.add_argument("--fid", metavar="REF.npz", help="ADM reference batch (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    fid.add_argument("--samples", metavar="SAMPLES", help="samples: an .npz with arr_0 (uint8 NHWC) or a PNG folder")
    fid.add_argument("--inception", metavar="PATH.pth", help="pytorch-fid's pt_inception-2015-12-05-*.pth (local)")
    fid.add_argument("--batch-size", dest="batch_size", type=int, help="images per Inception batch (default: 64)")
    fid.add_argument(
        "--stored-stats", dest="stored_stats", action="store_true",
        help="use the reference's stored mu/sigma even when it holds images (ADM's evaluator does)",
    )  # fmt: skip
    fid.add_argument("--out", metavar="FILE.json", help="also write the report there (atomically)")
    args = p.parse_args(argv)
    given = lambda names: [_flag(n) for n in names if getattr(args, n) not in (None, False)]  # noqa: E731
    if args.fid is not None:
        if given(_WORKDIR_FLAGS):
            p.error(
                f"{', '.join(given(_WORKDIR_FLAGS))} belong to the digits-run mode and cannot be combined with --fid"
            )
        missing = [f"--{n}" for n in ("samples", "inception") if getattr(args, n) is None]
        if missing:
            p.error(f"--fid needs {' and '.join(missing)}")
        if args.batch_size is not None and args.batch_size < 1:
            p.error(f"--batch-size must be a positive integer, got {args.batch_size}")
        return fid_main(args)
    if given(_FID_FLAGS):
        p.error(f"{', '.join(given(_FID_FLAGS))} need --fid REF.npz (the FID mode)")
    from dit_jax import evaluate_video  # a moving-digits (video quickstart) run has its own checks

    if evaluate_video.is_video_run(args.workdir or DEFAULT_WORKDIR):
        r = run_mode(evaluate_video.evaluate, args, "samples_per_prompt", 5, "clips per prompt (40 prompts)")
        return 2 if r is None else evaluate_video.print_report(r)
    r = run_mode(evaluate, args, "samples_per_class", 100, "samples per class")
    if r is None:
        return 2
    print(f"classifier accuracy on real digits (5-fold CV): {r['classifier_cv_accuracy_on_real']:.3f}")
    for c, acc in r["per_class_accuracy"].items():
        print(f"  class {c}: {acc:6.1%}")
    verdict = "PASS" if r["passed"] else "FAIL"
    print(f"overall: {r['accuracy']:.1%}   worst class: {r['min_class_accuracy']:.1%}   {verdict} (every class >= 90%)")
    print(f"wrote {r['json']}")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
