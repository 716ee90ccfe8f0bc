"""Command line: sample class-conditional (DiT) or text-to-image (PixArt, SD3/SD3.5, Flux) images and write a PNG
grid or one PNG per image, or text-to-video (Wan 2.1) videos (``--video``) and write MP4/GIF/WebP files.

    python -m dit_jax.sample --pipeline DIR --classes 207,360,387 --steps 250 --method ddpm --guidance 4.0 \\
        --seed 0 --out grid.png
    python -m dit_jax.sample --model MODEL_DIR --vae VAE_DIR --classes 207,360 --out-dir samples/
    python -m dit_jax.sample --workdir RUN_DIR --classes 0,1,2,3 --out grid.png
    python -m dit_jax.sample --pipeline PIXART_DIR --prompt "a cat" --prompt "a dog" --height 512 --width 768 \\
        --out grid.png
    python -m dit_jax.sample --model PIXART_MODEL --vae VAE_DIR --text-encoder T5_DIR --prompts-file prompts.txt \\
        --out-dir samples/
    python -m dit_jax.sample --pipeline SD3.5_MEDIUM_DIR --prompt "a cat" --prompt-3 "a cat, photo" \\
        --skip-guidance-layers 7,8,9 --out grid.png
    python -m dit_jax.sample --pipeline FLUX_DEV_DIR --prompt "a cat" --guidance 3.5 --height 768 --out cat.png
    python -m dit_jax.sample --pipeline FLUX_DEV_DIR --prompt "a cat" --dtype bf16 --quantize int8 --out cat.png
    python -m dit_jax.sample --pipeline WAN_DIR --video --prompt "a cat walking on grass" --num-frames 81 \
        --height 480 --width 832 --out cat.mp4
    python -m dit_jax.sample --model WAN_MODEL --vae WAN_VAE_DIR --text-encoder UMT5_DIR --video \
        --prompts-file prompts.txt --out-dir videos/ --video-format gif

The source is a diffusers pipeline folder (``--pipeline``), a model directory or PyTorch checkpoint with a VAE
(``--model``, ``--vae``; a text-to-image model also ``--text-encoder``: a T5 folder for PixArt, a pipeline folder
holding the text encoders for SD3/Flux), or a training run (``--workdir``, latest EMA params).
Class-conditional models take ``--classes``, text-to-image ones ``--prompt`` (repeatable) and/or ``--prompts-file``
(one prompt per line); ``--prompt-2``/``--prompt-3`` give the second/third text encoder one prompt for every image
(SD3: CLIP-G/T5, Flux: T5; default: each image's prompt); ``--clip-skip K`` uses the CLIP encoders' hidden
states ``[-(K + 2)]`` (SD3, as diffusers' ``clip_skip``). ``--guidance`` is classifier-free guidance (PixArt, SD3)
or the embedded guidance of guidance-distilled models (Flux-dev), whose classifier-free guidance is ``--true-cfg``
with ``--negative-prompt``. Unset sampler flags take the source's defaults (``dit_jax.pipelines.load``).
``--respacing adm`` selects the original DiT/ADM timesteps for ``ddpm``/``ddim`` (250 DDPM steps as in the paper).
Initial noise is drawn once for all images from ``--seed``
(``jax.random``), so ``--batch-size`` does not change the images of deterministic samplers; batch j of a
stochastic sampler draws its noise from seed + j. A failed run prints one error line and writes nothing.

Text-to-video models take ``--video``: one video per prompt of ``--num-frames`` frames (default 81) at ``--height``
× ``--width`` (default 480 × 832), written with ``--fps`` frames per second (default 16) to ``--out FILE.mp4``
(``.gif``/``.webp``: animated previews; one prompt) or ``--out-dir DIR`` (``NNNN_PROMPT.mp4``; ``--video-format
gif``/``webp`` for previews). MP4 needs ``imageio-ffmpeg`` (``pip install 'dit-jax[video]'``). Image flags on a
video model, or ``--video`` on an image model, are one clear error.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from dit_jax.cli import add_memory_arguments, memory_options
from dit_jax.nn.layers import dtype_names

_DTYPES = tuple(dtype_names(("float32", "bfloat16")))


def parse_classes(text: str) -> list[int]:
    """``"207,360,387"`` → ``[207, 360, 387]`` (one clear error for anything else)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        classes = [int(t) for t in items]
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected comma-separated integer class ids, e.g. 207,360,387") from None
    if not classes:
        raise ValueError(f"--classes {text!r}: no class ids given")
    return classes


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values followed by the non-empty lines of ``--prompts-file`` (one clear error if none)."""
    out = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts given: --prompt is empty and --prompts-file has no non-empty line")
    return out


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: lower-case words of letters and digits joined by ``-``."""
    words = "".join(ch if ch.isascii() and ch.isalnum() else " " for ch in text.lower()).split()
    return "-".join(words)[:limit].strip("-") or "prompt"


def sampler_options(args: argparse.Namespace, method: str, steps: int) -> dict[str, Any]:
    """Sampler options from ``--respacing`` and ``--option KEY=VALUE``."""
    from dit_jax.convert.__main__ import parse_set

    try:
        options = parse_set(args.option)
    except ValueError as e:
        raise ValueError(str(e).replace("--set", "--option")) from None
    if args.respacing:
        spec = args.respacing
        if spec == "adm":
            if method not in ("ddpm", "ddim"):
                raise ValueError(f"--respacing adm applies to --method ddpm or ddim, not {method!r}")
            spec = str(steps) if method == "ddpm" else f"ddim{steps}"
        options["respacing"] = spec
    return options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit_jax.sample",
        description="Sample class-conditional (DiT) or text-to-image (PixArt, SD3, Flux) images from a diffusers "
        "pipeline, a model directory or a training run.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="diffusers pipeline folder (model_index.json, transformer/, vae/, scheduler/)")
    src.add_argument("--model", help="model directory (python -m dit_jax.convert) or PyTorch DiT checkpoint")
    src.add_argument("--workdir", help="training run directory (latest checkpoint's EMA params)")
    p.add_argument("--vae", help="VAE: diffusers folder, VAE model directory or checkpoint (needed with --model)")
    p.add_argument("--scheduler", help="diffusers scheduler config (scheduler_config.json or a folder) to sample with")
    p.add_argument(
        "--text-encoder",
        help="text encoder(s) for --model: a T5 folder or pipeline folder (PixArt), a "
        "pipeline folder holding the text encoders (SD3, Flux), a UMT5 folder or pipeline folder (Wan)",
    )
    p.add_argument("--classes", help="comma-separated class ids, one image each, e.g. 207,360,387 (DiT)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt, one image or video each (repeatable)")
    p.add_argument("--prompts-file", help="text file with one prompt per line (text-to-image)")
    p.add_argument("--prompt-2", help="the second text encoder's prompt for every image (SD3: CLIP-G, Flux: T5)")
    p.add_argument("--prompt-3", help="the third text encoder's prompt for every image (SD3: T5)")
    p.add_argument("--negative-prompt", help="negative prompt of guidance (text-to-image; default '')")
    p.add_argument("--negative-prompt-2", help="the second text encoder's negative prompt (default: --negative-prompt)")
    p.add_argument("--negative-prompt-3", help="the third text encoder's negative prompt (default: --negative-prompt)")
    p.add_argument(
        "--max-sequence-length", type=int, help="T5 tokens (default: PixArt-Σ 300, α 120, SD3 256, Flux 512)"
    )
    p.add_argument(
        "--true-cfg",
        type=float,
        help="classifier-free guidance of embedded-guidance models (Flux; needs --negative-prompt)",
    )
    p.add_argument("--skip-guidance-layers", help="skip-layer guidance blocks, e.g. 7,8,9 (SD3.5-medium)")
    p.add_argument(
        "--clip-skip",
        type=int,
        help="CLIP layers to skip: the CLIP features are hidden_states[-(K + 2)] instead of the penultimate (SD3)",
    )
    p.add_argument("--height", type=int, help="image/video height in pixels (default: the model's size; video 480)")
    p.add_argument("--width", type=int, help="image/video width in pixels (default: the model's size; video 832)")
    p.add_argument("--no-resolution-binning", action="store_true", help="sample at the exact size (PixArt)")
    p.add_argument("--text-dtype", choices=_DTYPES, help="compute dtype of the text encoders (default: --dtype)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the source's: DiT 50, PixArt 20, SD3/Flux 28)")
    p.add_argument("--method", help="sampler: ddpm, ddim, dpmpp_2m (DDPM models); euler, heun, dpmpp_2m (flow)")
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance scale (classifier-free when > 1; Flux: the embedded "
        "guidance; default DiT 4.0, PixArt 4.5, SD3 7.0, Flux 3.5)",
    )
    p.add_argument("--guidance-channels", type=int, help="guide only the first K latent channels (original DiT: 3)")
    p.add_argument("--respacing", help="ADM timestep respacing: 'adm' (original DiT/ADM steps) or a spec ('250')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="sampler option (e.g. eta=1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (jax.random; not torch's)")
    p.add_argument("--batch-size", type=int, help="images per sampler call (default: all at once)")
    p.add_argument("--dtype", default="fp32", choices=_DTYPES, help="compute dtype of the transformer and the VAE")
    add_memory_arguments(p)
    p.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each image's tokens over N devices (2K/4K images; the batch goes over the other devices)",
    )
    p.add_argument(
        "--sequence-mode",
        default="auto",
        choices=["auto", "ulysses", "ring"],
        help="sequence parallelism: ulysses (heads divisible by N), ring, or auto (ulysses when it applies)",
    )
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode tile by tile (the VAE's sample_size, whole-image GroupNorm statistics): bounded VAE memory for "
        "2K/4K images",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write one PNG grid to this file")
    out.add_argument("--out-dir", help="write one PNG per image into this folder (NNNN_CLASS.png or NNNN_PROMPT.png)")
    p.add_argument("--nrow", type=int, help="images per row of the grid (default 8)")
    p.add_argument("--video", action="store_true", help="sample videos (text-to-video models, e.g. Wan 2.1)")
    p.add_argument("--num-frames", type=int, help="frames per video (--video; default 81: 1 + 4k for Wan)")
    p.add_argument("--fps", type=float, help="frames per second of the written videos (--video; default 16)")
    p.add_argument(
        "--video-format",
        choices=["mp4", "gif", "webp"],
        help="file format of --out-dir videos (--video; default mp4, which needs imageio-ffmpeg)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_VIDEO_FLAGS = ("--num-frames", "--fps", "--video-format")
# flags of image sampling that a text-to-video run does not take
_IMAGE_ONLY_FLAGS = ("--classes", "--nrow", "--prompt-2", "--prompt-3", "--negative-prompt-2",
                     "--negative-prompt-3", "--true-cfg", "--skip-guidance-layers", "--clip-skip",
                     "--guidance-channels", "--respacing")  # fmt: skip


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    return [f for f in flags if getattr(args, f[2:].replace("-", "_")) is not None]


def _check_outputs(args: argparse.Namespace) -> None:
    from dit_jax.pipelines.video import VIDEO_SUFFIXES

    if args.video:
        given = _given(args, _IMAGE_ONLY_FLAGS) + (["--no-resolution-binning"] if args.no_resolution_binning else [])
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ValueError(f"--video samples text-to-video models from prompts: {', '.join(given)} {verb} not apply")
        if args.out is not None and Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"--out {args.out}: expected a video file name ending in {', '.join(VIDEO_SUFFIXES)}")
        if args.out is not None and args.video_format is not None:
            raise ValueError("--video-format applies to --out-dir; with --out the file name's suffix says the format")
        if args.num_frames is not None and args.num_frames < 1:
            raise ValueError(f"--num-frames {args.num_frames}: expected a positive integer")
        if args.fps is not None and not args.fps > 0:
            raise ValueError(f"--fps {args.fps}: expected a positive number")
    else:
        given = _given(args, _VIDEO_FLAGS)
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to videos: add --video (text-to-video models)")
        if args.out is not None and Path(args.out).suffix.lower() != ".png":
            hint = " (videos: add --video)" if Path(args.out).suffix.lower() in VIDEO_SUFFIXES else ""
            raise ValueError(f"--out {args.out}: expected a .png file name{hint}")
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a folder")
    if args.nrow is not None and args.nrow < 1:
        raise ValueError(f"--nrow {args.nrow}: expected a positive integer")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a positive integer")


_TEXT_FLAGS = ("--height", "--width", "--text-encoder", "--prompt-2", "--prompt-3", "--negative-prompt",
               "--negative-prompt-2", "--negative-prompt-3", "--max-sequence-length", "--true-cfg",
               "--skip-guidance-layers", "--clip-skip")  # fmt: skip


def parse_layers(text: str) -> list[int]:
    """``"7,8,9"`` → ``[7, 8, 9]`` (one clear error for anything else)."""
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(
            f"--skip-guidance-layers {text!r}: expected comma-separated block indices, e.g. 7,8,9"
        ) from None
    if not layers:
        raise ValueError(f"--skip-guidance-layers {text!r}: no block indices given")
    return layers


def _text_call(args: argparse.Namespace, binning: bool | None) -> dict[str, Any]:
    """The text-to-image call arguments the flags set (unset flags are left to the pipeline)."""
    call = dict(height=args.height, width=args.width, use_resolution_binning=binning)
    for name in ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
                 "max_sequence_length", "clip_skip"):  # fmt: skip
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    if args.true_cfg is not None:
        call["true_cfg_scale"] = args.true_cfg
    if args.skip_guidance_layers is not None:
        call["skip_guidance_layers"] = parse_layers(args.skip_guidance_layers)
    return call


def _check_inputs(args: argparse.Namespace, text: bool, kind: str) -> list:
    """Class ids or prompts, whichever the source takes (one clear error for the other); ``kind`` names the model
    family for messages."""
    if text:
        if args.classes is not None:
            raise ValueError(
                f"this source is a text-to-image ({kind}) model: give --prompt/--prompts-file, not --classes"
            )
        return read_prompts(args.prompt, args.prompts_file)
    given = [f for f, v in (("--prompt", args.prompt), ("--prompts-file", args.prompts_file)) if v]
    given += [f for f in _TEXT_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise ValueError(
            f"this source is a class-conditional {kind}: {', '.join(given)} {verb} not apply; give --classes"
        )
    if args.classes is None:
        raise ValueError("give --classes (comma-separated class ids) for a class-conditional model")
    return parse_classes(args.classes)


def run(args: argparse.Namespace) -> list[Path]:
    """Load, sample and write; returns the written PNG (or video) paths."""
    import numpy as np

    from dit_jax.pipelines import TextToImagePipeline, TextToVideoPipeline, load, make_grid, save_png, to_uint8

    _check_outputs(args)
    if args.classes is not None:
        parse_classes(args.classes)  # a malformed list fails before loading anything
    elif not args.prompt and args.prompts_file is None:
        raise ValueError("give --classes (DiT) or --prompt/--prompts-file (PixArt)")
    if args.video and args.out is not None:
        n = len(read_prompts(args.prompt, args.prompts_file))
        if n != 1:
            raise ValueError(f"--out writes one video but {n} prompts are given: use --out-dir (one video per prompt)")
    source = args.pipeline or args.model or args.workdir
    extra = {k: v for k, v in (("text_encoder", args.text_encoder), ("text_dtype", args.text_dtype)) if v is not None}
    extra.update(memory_options(args))
    pipe = load(
        source,
        vae=args.vae,
        scheduler=args.scheduler,
        dtype=args.dtype,
        sequence_parallel=args.sequence_parallel,
        sequence_mode=args.sequence_mode,
        **extra,
    )
    video = isinstance(pipe, TextToVideoPipeline)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    kind = f"{pipe.family.task} {pipe.family.display_name}"
    if video and not args.video:
        raise ValueError(
            f"this source is a {kind} model: add --video (and write --out FILE.mp4|.gif|.webp or --out-dir)"
        )
    if args.video and not video:
        flags = ", ".join(["--video"] + _given(args, _VIDEO_FLAGS))
        raise ValueError(f"this source is a {kind} model, not a text-to-video one: {flags} do not apply")
    if video:
        return _run_video(args, pipe)
    text = isinstance(pipe, TextToImagePipeline)
    items = _check_inputs(args, text, pipe.family.display_name)
    if text:
        binning = False if args.no_resolution_binning else None
        size = dict(height=args.height, width=args.width)
        pipe.image_size(use_resolution_binning=binning, **size)  # a bad size fails before any compile
        call = _text_call(args, binning)
        if args.true_cfg is not None and not pipe.uses_true_cfg:
            name = pipe.family.display_name
            raise ValueError(f"--true-cfg applies to models with embedded guidance (Flux); use --guidance for {name}")
        where = dict(size, use_resolution_binning=binning)  # the trajectory depends on the size (Flux's shift)
    else:
        pipe.check_labels(items)  # out-of-range ids fail before any compile
        call, where = {}, {}
    steps = pipe.num_inference_steps if args.steps is None else args.steps
    _, method, _ = pipe.sampler_settings(args.method)
    options = sampler_options(args, method, steps)
    calls = pipe.trajectory(steps, method, **where, **options).num_model_calls

    n = len(items)
    size = args.batch_size or n
    batches = [(i, min(i + size, n)) for i in range(0, n, size)]
    if text:
        latents = pipe.prepare_latents(
            n, args.seed, height=args.height, width=args.width, use_resolution_binning=binning
        )
    else:
        latents = pipe.prepare_latents(n, args.seed)
    _say_source(pipe)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * calls, desc="sampling", unit="step", dynamic_ncols=True)
    images = []
    try:
        for j, (lo, hi) in enumerate(batches):
            done = j * calls

            def progress(i: int, total: int, done: int = done) -> None:
                if bar is not None and done + i > bar.n:
                    bar.update(done + i - bar.n)

            images.append(
                pipe(
                    items[lo:hi],
                    num_inference_steps=steps,
                    guidance_scale=args.guidance,
                    method=method,
                    latents=latents[lo:hi],
                    seed=args.seed + j,
                    guidance_channels=args.guidance_channels,
                    progress=progress if bar is not None else None,
                    **call,
                    **options,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    pixels = to_uint8(np.concatenate(images))
    if args.out is not None:
        return [save_png(args.out, make_grid(pixels, nrow=args.nrow or 8))]
    width = max(4, int(math.log10(n)) + 1)
    names = [slug(p) for p in items] if text else [str(c) for c in items]
    return [
        save_png(Path(args.out_dir) / f"{i:0{width}d}_{name}.png", im)
        for i, (name, im) in enumerate(zip(names, pixels))
    ]


def _say_source(pipe: Any) -> None:
    """One line saying what is sampled: the pipeline's source (a training run: its checkpoint and weights, e.g. a
    LoRA run's EMA adapters merged into its base)."""
    print(f"sampling from {pipe.source}", flush=True)


def _progress_bar(args: argparse.Namespace, total: int):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True)


def _run_video(args: argparse.Namespace, pipe: Any) -> list[Path]:
    """Sample one video per prompt with a text-to-video pipeline and write them; returns the written paths."""
    import numpy as np

    from dit_jax.pipelines import save_video

    prompts = read_prompts(args.prompt, args.prompts_file)
    size = dict(height=args.height, width=args.width, num_frames=args.num_frames)
    pipe.video_size(**size)  # a bad size fails before any compile
    call = {k: getattr(args, k) for k in ("negative_prompt", "max_sequence_length") if getattr(args, k) is not None}
    steps = pipe.num_inference_steps if args.steps is None else args.steps
    _, method, _ = pipe.sampler_settings(args.method)
    options = sampler_options(args, method, steps)
    calls = pipe.trajectory(steps, method, **size, **options).num_model_calls

    n = len(prompts)
    per_call = args.batch_size or n
    batches = [(i, min(i + per_call, n)) for i in range(0, n, per_call)]
    latents = pipe.prepare_latents(n, args.seed, **size)
    _say_source(pipe)
    bar = _progress_bar(args, len(batches) * calls)
    videos = []
    try:
        for j, (lo, hi) in enumerate(batches):
            done = j * calls

            def progress(i: int, total: int, done: int = done) -> None:
                if bar is not None and done + i > bar.n:
                    bar.update(done + i - bar.n)

            videos.append(
                pipe(
                    prompts[lo:hi],
                    num_inference_steps=steps,
                    guidance_scale=args.guidance,
                    method=method,
                    latents=latents[lo:hi],
                    seed=args.seed + j,
                    progress=progress if bar is not None else None,
                    **size,
                    **call,
                    **options,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    frames = np.concatenate(videos)
    fps = 16.0 if args.fps is None else args.fps
    if args.out is not None:
        return [save_video(frames[0], args.out, fps=fps)]
    width = max(4, int(math.log10(n)) + 1)
    suffix = args.video_format or "mp4"
    return [
        save_video(video, Path(args.out_dir) / f"{i:0{width}d}_{slug(p)}.{suffix}", fps=fps)
        for i, (p, video) in enumerate(zip(prompts, frames))
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the sampler; returns the exit status (0 ok, 1 error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        paths = run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files in {Path(args.out_dir)}"
    print(f"wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
