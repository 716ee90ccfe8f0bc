"""Web demo: one page to try a model in a browser, served by the standard library's ``http.server``.

    python -m dit_jax.demo runs/quickstart                       # a training run (latest EMA), pixel space
    python -m dit_jax.demo dit-xl2-256 --vae sd-vae-ft-mse --dtype bf16 --port 8000
    python -m dit_jax.demo PIXART_SIGMA_DIR                      # a diffusers pipeline folder (text-to-image)
    python -m dit_jax.demo WAN_DIR --dtype bf16                  # a WanPipeline folder (text-to-video)
    python -m dit_jax.demo FLUX_DEV_DIR --dtype bf16 --quantize int4 --offload   # FLUX.1-dev in 8 GB of device memory

The source is anything ``dit_jax.pipelines.load`` takes (training workdir, model directory, PyTorch checkpoint,
diffusers pipeline folder), loaded once at start-up. The page offers a class (class-conditional models) or a prompt
and height/width (text-to-image; text-to-video also the number of frames), steps, guidance scale and seed; a
progress bar follows the sampler's steps (the pipeline's ``progress`` callback, polled from ``/api/progress``), and
the result is shown and offered for download: an image as a PNG, a video as an animated GIF (and as an MP4 when
``imageio-ffmpeg`` is installed), both written by ``dit_jax.pipelines.save_video`` as ``python -m dit_jax.sample
--video`` writes them. A text-to-video run trained on a fixed set of prompts without a text encoder (a moving-digits
run such as the video quickstart; its pipeline reads them through a ``pipelines.PromptTable``) offers those prompts
as a list. One result is generated at a
time: a request that arrives meanwhile gets HTTP 503 "busy". Bad input gets HTTP 400 with one message, shown on the
page.

HTTP interface: ``GET /`` the page, ``GET /api/info`` the model and its defaults, ``POST /api/generate`` (JSON:
``class_id`` or ``prompt``/``height``/``width`` (videos also ``num_frames``), ``steps``, ``guidance``, ``seed``; missing
fields take the model's defaults) → ``{"url", "filename", "width", "height", "downloads", ...}``, ``GET
/api/progress``, ``GET /image/<id>.png``, ``GET /video/<id>.gif`` (and ``.mp4``).
Only the standard library is imported until the model loads, so ``--help`` is instant.
"""

import argparse
import collections
import dataclasses
import html
import io
import json
import math
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dit_jax.cli import add_memory_arguments, memory_options

MAX_SEED = 2**31 - 1
MAX_PROMPT = 2000  # characters
MAX_BODY = 64 * 1024  # bytes of a request body
KEEP_IMAGES = 32  # the newest images stay downloadable
KEEP_VIDEOS = 8  # the newest videos (their GIF and MP4) stay downloadable
MAX_FRAMES = 1024  # frames a video request may ask


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked generation request."""

    steps: int
    guidance: float
    seed: int
    calls: int  # model calls of the sampler's trajectory (the progress bar's length)
    class_id: int | None = None
    prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # videos

    def size(self) -> dict[str, int]:
        """The size arguments of the pipeline call: height/width (text-to-image), and num_frames (videos)."""
        out = dict(height=self.height, width=self.width, num_frames=self.num_frames)
        return {k: v for k, v in out.items() if v is not None}


def _shown(raw: Any) -> str:
    """A request value as a message shows it: a typed text as typed (``steps=0``), anything else as its repr."""
    return raw.strip() if isinstance(raw, str) and raw.strip() else repr(raw)


def _integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """``body[name]`` (an int or a string of one; ``default`` when absent) within ``lo..hi``."""
    raw = body.get(name, default)
    value = raw.strip() if isinstance(raw, str) else raw
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        value = int(value)
    except (TypeError, ValueError):
        value = None
    if value is None or not lo <= value <= hi:
        raise RequestError(f"{name}={_shown(raw)}: expected an integer from {lo} to {hi}")
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    """``body[name]`` (a number or a string of one; ``default`` when absent): finite and ≥ 0."""
    raw = body.get(name, default)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise RequestError(f"{name}={_shown(raw)}: expected a number ≥ 0")
    return value


def table_prompts(pipe: Any) -> dict[str, Any] | None:
    """``{prompt: text condition (tokens, width)}`` of a text-to-video pipeline whose text encoder is a run's fixed
    prompt table (``pipelines.PromptTable``: a moving-digits run such as the video quickstart); None otherwise."""
    from dit_jax.pipelines import PromptTable

    if getattr(pipe, "task", None) != "text-to-video":
        return None
    tables = [e for e in pipe.encoders.values() if isinstance(e, PromptTable)]
    return dict(tables[0].table) if tables else None


class Demo:
    """A loaded pipeline behind the web page: request checking, one generation at a time, its progress, and the
    newest results (PNG, GIF and MP4 bytes by URL path).

    What the page offers is decided once from the pipeline: its kind of media (an image, or a video of
    ``num_frames`` frames) and its input (a class id, or a prompt with height and width). ``prompts`` (videos only):
    the model's text condition of each prompt a model without a text encoder was trained on (``table_prompts``);
    the page then offers those prompts as a list. ``fps``: frames per second of the written videos."""

    def __init__(
        self,
        pipe: Any,
        *,
        max_steps: int = 1000,
        max_size: int = 4096,
        max_frames: int = MAX_FRAMES,
        fps: float = 16.0,
        prompts: Mapping[str, Any] | None = None,
    ):
        import importlib.util

        from dit_jax.pipelines import TextToImagePipeline, TextToVideoPipeline

        self.pipe = pipe
        self.video = isinstance(pipe, TextToVideoPipeline)
        self.text = self.video or isinstance(pipe, TextToImagePipeline)
        if prompts is not None and not self.video:
            raise ValueError(f"prompts= applies to text-to-video models; {pipe.source} is a {pipe.task} model")
        self.prompts = None if prompts is None else dict(prompts)
        self.max_steps = max_steps
        self.max_size = max_size
        self.max_frames = max_frames
        self.fps = float(fps)
        self.mp4 = self.video and importlib.util.find_spec("imageio_ffmpeg") is not None
        self.lock = threading.Lock()  # held while a generation runs
        self._state = threading.Lock()  # guards the progress and the result store
        self._progress: dict[str, Any] = dict(busy=False, phase="idle", step=0, total=0, elapsed=0.0)
        self._started = 0.0
        # result id → {URL path: (bytes, content type)}, oldest first
        self._results: collections.OrderedDict[str, dict[str, tuple[bytes, str]]] = collections.OrderedDict()

    # ---- what the page shows ------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The model, the request fields it takes and their defaults."""
        pipe = self.pipe
        out: dict[str, Any] = dict(
            source=pipe.source,
            family=pipe.family.display_name,
            task=pipe.task,
            media="video" if self.video else "image",
            steps=int(pipe.num_inference_steps),
            guidance=float(pipe.guidance_scale),
            method=pipe.method,
            max_steps=self.max_steps,
            max_seed=MAX_SEED,
            fields=self._fields(),
        )
        if self.text:
            cfg = pipe.model_config
            f = pipe.vae_scale_factor * cfg.patch_size * pipe.family.grid_multiple(cfg)
            out.update(self._default_size(), size_multiple=f, max_size=self.max_size)
        else:
            h, w, _ = pipe.latent_shape
            f = pipe.vae_scale_factor
            out.update(height=h * f, width=w * f, num_classes=int(pipe.num_classes))
        if self.video:  # num_frames = 1 + t·(latent frames − 1) with latent frames a multiple of the temporal patch
            t, pt = pipe.vae_temporal_factor, getattr(pipe.model_config, "patch_size_t", 1)
            out.update(min_frames=1 + t * (pt - 1), frame_step=t * pt, max_frames=self.max_frames, fps=self.fps,
                       formats=self._formats())  # fmt: skip
        if self.prompts is not None:
            out.update(prompts=list(self.prompts))
        return out

    def _default_size(self) -> dict[str, int]:
        """The size a request without one gets: the pipeline's default (a video model in pixel space, e.g. a
        training run on raw frames: the clip the model was trained on)."""
        pipe = self.pipe
        if not self.video:
            (_, _), (h, w) = pipe.image_size()
            return dict(height=h, width=w)
        if pipe.vae_config is None:
            frames, h, w, _ = pipe.latent_shape
            return dict(height=h, width=w, num_frames=frames)
        f, h, w = pipe.video_size()
        s, t = pipe.vae_scale_factor, pipe.vae_temporal_factor
        return dict(height=h * s, width=w * s, num_frames=(f - 1) * t + 1)

    def _formats(self) -> list[str]:
        """The files a video is offered as: the animated GIF the page shows, and MP4 when it can be written."""
        return ["gif", "mp4"] if self.mp4 else ["gif"]

    def _fields(self) -> list[str]:
        first = ["prompt", "height", "width"] if self.text else ["class_id"]
        return first + (["num_frames"] if self.video else []) + ["steps", "guidance", "seed"]

    def progress(self) -> dict[str, Any]:
        """``{busy, phase, step, total, elapsed}`` of the running generation (or the last one)."""
        with self._state:
            out = dict(self._progress)
        if out["busy"]:
            out["elapsed"] = round(time.monotonic() - self._started, 2)
        return out

    def _set(self, **values: Any) -> None:
        with self._state:
            self._progress.update(values)

    def file(self, path: str) -> tuple[bytes, str] | None:
        """``(bytes, content type)`` of a result's URL path (``/image/<id>.png``, ``/video/<id>.gif``), or None if
        unknown (or dropped as older than the newest ones)."""
        key = path.rsplit("/", 1)[-1].split(".", 1)[0]
        with self._state:
            return self._results.get(key, {}).get(path)

    # ---- requests ------------------------------------------------------------------------------------------------

    def parse(self, body: Any) -> Request:
        """Check a request body (a JSON object) against this model; one ``RequestError`` for anything wrong."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - set(self._fields()))
        if unknown:
            kind = self.pipe.task if self.text else "class-conditional"
            raise RequestError(f"unknown field(s) {unknown}: this {kind} model takes {', '.join(self._fields())}")
        pipe = self.pipe
        steps = _integer(body, "steps", int(pipe.num_inference_steps), 1, self.max_steps)
        guidance = _number(body, "guidance", float(pipe.guidance_scale))
        seed = _integer(body, "seed", 0, 0, MAX_SEED)
        try:
            if self.text:
                prompt = self._prompt(body)
                default = self._default_size()
                size = {k: _integer(body, k, default[k], 1, self.max_size) for k in ("height", "width")}
                if self.video:
                    size["num_frames"] = _integer(body, "num_frames", default["num_frames"], 1, self.max_frames)
                    pipe.video_size(**size)  # a size the model cannot sample: one clear error
                else:
                    pipe.image_size(**size)
                calls = pipe.trajectory(steps, **size).num_model_calls
                return Request(steps, guidance, seed, calls, prompt=prompt, **size)
            class_id = _integer(body, "class_id", 0, 0, int(pipe.num_classes) - 1)
            calls = pipe.trajectory(steps).num_model_calls
            return Request(steps, guidance, seed, calls, class_id=class_id)
        except RequestError:
            raise
        except ValueError as e:  # the pipeline's own checks (e.g. steps a sampler cannot take)
            raise RequestError(str(e)) from None

    def _prompt(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt", "")
        if self.prompts is not None:
            if not isinstance(prompt, str) or prompt not in self.prompts:
                some = ", ".join(repr(p) for p in list(self.prompts)[:3])
                raise RequestError(
                    f"prompt={_shown(prompt)}: expected one of the {len(self.prompts)} prompts this model was trained "
                    f"on, e.g. {some}"
                )
            return prompt
        what = "video" if self.video else "image"
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"prompt is empty: write what the {what} should show")
        if len(prompt) > MAX_PROMPT:
            raise RequestError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT}")
        return prompt.strip()

    def generate(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Check and run one request: ``(HTTP status, JSON reply)`` — 200 with the result's URL, 400 with the
        message of a bad request, 503 while another generation runs, 500 for a failure of the model."""
        try:
            req = self.parse(body)
        except RequestError as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        if not self.lock.acquire(blocking=False):
            p = self.progress()
            where = f" (step {p['step']}/{p['total']})" if p["total"] else ""
            what = "video" if self.video else "image"
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": f"busy: another {what} is being generated{where}; try again when it finishes"
            }
        try:
            return HTTPStatus.OK, self._run(req)
        except (ValueError, TypeError) as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except Exception as e:  # the server keeps serving; the trace goes to the console
            traceback.print_exc()
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generation failed: {type(e).__name__}: {e}"}
        finally:
            self._set(busy=False, phase="idle", elapsed=round(time.monotonic() - self._started, 2))
            self.lock.release()

    def _sample(self, req: Request, progress: Any) -> Any:
        """The pipeline's output for one request: (1, H, W, C) images or (1, F, H, W, C) videos in [0, 1]."""
        common = dict(num_inference_steps=req.steps, guidance_scale=req.guidance, seed=req.seed, progress=progress)
        if not self.text:
            return self.pipe([req.class_id], **common)
        if self.prompts is not None:  # the prompt's own text condition; the null one is zeros, as in training
            import numpy as np

            embeds = np.asarray(self.prompts[req.prompt], np.float32)[None]
            common.update(prompt_embeds=embeds, negative_prompt_embeds=np.zeros_like(embeds))
            return self.pipe(**req.size(), **common)
        return self.pipe([req.prompt], **req.size(), **common)

    def _run(self, req: Request) -> dict[str, Any]:
        from dit_jax.sample import slug

        self._started = time.monotonic()
        self._set(busy=True, phase="preparing", step=0, total=req.calls, elapsed=0.0)
        last = [0, req.calls]

        def progress(i: int, n: int) -> None:  # on the host, after each model call (possibly out of order)
            with self._state:
                if i >= last[0]:
                    last[:] = [i, n]
                    self._progress.update(phase="decoding" if i >= n else "sampling", step=i, total=n)

        out = self._sample(req, progress)[0]  # H W C or F H W C
        key = uuid.uuid4().hex[:16]
        name = f"{slug(req.prompt)}_seed{req.seed}" if self.text else f"class{req.class_id}_seed{req.seed}"
        if self.video:
            self._set(phase="writing")
            files = _video_files(out, self.fps, self._formats())
            stored = {f"/video/{key}.{fmt}": (data, _TYPES[fmt]) for fmt, data in files.items()}
        else:
            stored = {f"/image/{key}.png": (_png(out), _TYPES["png"])}
        downloads = [
            dict(format=url.rsplit(".", 1)[1].upper(), url=url, filename=f"{name}.{url.rsplit('.', 1)[1]}")
            for url in stored
        ]
        with self._state:
            self._results[key] = stored
            keep = KEEP_VIDEOS if self.video else KEEP_IMAGES
            while len(self._results) > keep:
                self._results.popitem(last=False)
        seconds = round(time.monotonic() - self._started, 2)
        what = f"prompt {req.prompt!r}" if self.text else f"class {req.class_id}"
        size = f", {req.num_frames} frames of {out.shape[2]}×{out.shape[1]}" if self.video else ""
        summary = f"generated {what}{size}, {req.steps} steps, guidance {req.guidance:g}, seed {req.seed}: {seconds} s"
        print(summary, file=sys.stderr, flush=True)
        reply = dict(
            url=downloads[0]["url"],
            filename=downloads[0]["filename"],
            downloads=downloads,
            width=int(out.shape[-2]),
            height=int(out.shape[-3]),
            seconds=seconds,
            step=last[0],
            total=last[1],
        )
        if self.video:
            reply.update(num_frames=int(out.shape[0]), fps=self.fps)
        return reply

    # ---- the page ------------------------------------------------------------------------------------------------

    def page(self) -> str:
        """The HTML page (form, progress bar, result) for this model."""
        info = self.info()
        e = html.escape
        num = 'type="number" inputmode="numeric"'
        if self.text:
            m = info["size_multiple"]
            if self.prompts is not None:
                options = "".join(f'<option value="{e(p)}">{e(p)}</option>' for p in self.prompts)
                prompt = f'<label>Prompt<select id="prompt" name="prompt">{options}</select></label>'
            else:
                prompt = (
                    f'<label>Prompt<textarea id="prompt" name="prompt" rows="3" maxlength="{MAX_PROMPT}" required>'
                    "</textarea></label>"
                )
            frames = ""
            if self.video:
                first, t = info["min_frames"], info["frame_step"]
                frames = (
                    f'<label>Frames<input id="num_frames" name="num_frames" {num} min="{first}" step="{t}" '
                    f'max="{self.max_frames}" value="{info["num_frames"]}"></label>'
                )
            size = (
                f"{prompt}"
                f'<div class="row"><label>Height<input id="height" name="height" {num} min="{m}" step="{m}" '
                f'max="{self.max_size}" value="{info["height"]}"></label>'
                f'<label>Width<input id="width" name="width" {num} min="{m}" step="{m}" max="{self.max_size}" '
                f'value="{info["width"]}"></label>{frames}</div>'
            )
        else:
            options = "".join(f'<option value="{i}">{i}</option>' for i in range(info["num_classes"]))
            size = (
                f'<label>Class<select id="class_id" name="class_id">{options}</select></label>'
                f'<p class="note">Size: {info["height"]} × {info["width"]} px (fixed by the model)</p>'
            )
        form = (
            f"{size}"
            f'<div class="row"><label>Steps<input id="steps" name="steps" {num} min="1" max="{self.max_steps}" '
            f'value="{info["steps"]}"></label>'
            f'<label>Guidance scale<input id="guidance" name="guidance" type="number" min="0" step="0.1" '
            f'value="{info["guidance"]:g}"></label>'
            f'<label>Seed<input id="seed" name="seed" {num} min="0" max="{MAX_SEED}" value="0"></label>'
            '<button type="button" id="random-seed" title="a random seed">random</button></div>'
        )
        what = "video (animated GIF preview)" if self.video else "image"
        return (
            _PAGE.replace("%TITLE%", e(f"dit_jax demo — {info['family']}"))
            .replace("%SOURCE%", e(f"{info['source']} · {info['family']} · {info['task']} · {info['method']}"))
            .replace("%FORM%", form)
            .replace("%WHAT%", what)
        )


_TYPES = {"png": "image/png", "gif": "image/gif", "mp4": "video/mp4"}


def _png(pixels: Any) -> bytes:
    """(H, W, C) floats in [0, 1] → PNG bytes (greyscale for one channel)."""
    from PIL import Image

    from dit_jax.pipelines import to_uint8

    pixels = to_uint8(pixels)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def _video_files(frames: Any, fps: float, formats: list[str]) -> dict[str, bytes]:
    """One video's frames (F, H, W, C) in [0, 1] → ``{format: file bytes}``, written by ``save_video`` (what
    ``python -m dit_jax.sample --video`` writes) into a temporary folder."""
    from dit_jax.pipelines import save_video

    with tempfile.TemporaryDirectory(prefix="dit_jax_demo_") as folder:
        return {fmt: save_video(frames, Path(folder) / f"video.{fmt}", fps=fps).read_bytes() for fmt in formats}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } .source { color: #666; margin-top: 0; word-break: break-all; }
label { display: block; margin: .6rem 0; font-weight: 600; }
input, select, textarea { display: block; width: 100%; box-sizing: border-box; margin-top: .25rem; font: inherit;
  padding: .3rem; font-weight: normal; }
.row { display: flex; gap: 1rem; align-items: end; } .row label { flex: 1; }
.row button { margin: .6rem 0; } .note { color: #444; }
#generate { font-size: 1.05rem; padding: .45rem 1.4rem; margin-top: .5rem; }
progress { width: 100%; height: 1.1rem; margin-top: 1rem; }
#error { color: #b00020; background: #fdecee; padding: .5rem .75rem; border-radius: 4px; }
figure { margin: 0; }
#image { display: block; min-width: 256px; max-width: 100%; height: auto; image-rendering: pixelated;
  margin: 1rem 0 .5rem; border: 1px solid #ccc; }
</style></head>
<body data-state="idle">
<h1>dit_jax demo</h1><p class="source">%SOURCE%</p>
<form id="form" novalidate>%FORM%<button type="submit" id="generate">Generate</button></form>
<progress id="progress" max="1" value="0"></progress><div id="status">Ready.</div>
<p id="error" role="alert" hidden></p>
<figure id="result" hidden><img id="image" alt="the generated %WHAT%">
<figcaption><span id="downloads"></span> <span id="caption"></span></figcaption></figure>
<script>
"use strict";
const form = document.getElementById("form"), button = document.getElementById("generate");
const bar = document.getElementById("progress"), statusLine = document.getElementById("status");
const errorBox = document.getElementById("error"), result = document.getElementById("result");
const image = document.getElementById("image"), downloads = document.getElementById("downloads");
let poller = null;

function showProgress(p) {
  if (p.total > 0) { bar.max = p.total; bar.value = p.step; }
  const steps = p.total > 0 ? " step " + p.step + "/" + p.total : "";
  const hint = p.phase === "preparing" ? " (a new setting compiles first)" : "";
  statusLine.textContent = p.phase + steps + hint + ", " + p.elapsed.toFixed(1) + " s";
}

async function poll() {
  try { const r = await fetch("/api/progress"); if (r.ok) { const p = await r.json(); if (p.busy) showProgress(p); } }
  catch (e) { /* the next poll tries again */ }
}

document.getElementById("random-seed").addEventListener("click", () => {
  document.getElementById("seed").value = Math.floor(Math.random() * 2147483647);
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  document.body.dataset.state = "running";
  errorBox.hidden = true; button.disabled = true;
  bar.removeAttribute("value"); statusLine.textContent = "starting";
  poller = setInterval(poll, 250);
  const body = Object.fromEntries(new FormData(form).entries());
  try {
    const r = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
    let out;
    try { out = await r.json(); } catch (e) { out = {error: r.status + " " + r.statusText}; }
    if (!r.ok) throw new Error(out.error || (r.status + " " + r.statusText));
    bar.max = out.total; bar.value = out.step;
    await new Promise((resolve, reject) => {
      image.onload = resolve; image.onerror = () => reject(new Error("the result did not load"));
      image.src = out.url;
    });
    // a link per file: the first (PNG or GIF) is #download, the others #download-<format> (MP4)
    downloads.replaceChildren(...out.downloads.map((d, k) => {
      const a = document.createElement("a");
      a.id = k === 0 ? "download" : "download-" + d.format.toLowerCase();
      a.href = d.url; a.download = d.filename; a.textContent = "Download " + d.format;
      return a;
    }).flatMap((a, k) => k === 0 ? [a] : [" ", a]));
    const frames = out.num_frames ? ", " + out.num_frames + " frames at " + out.fps + " fps" : "";
    document.getElementById("caption").textContent =
      out.width + " × " + out.height + " px" + frames + ", " + out.seconds + " s";
    statusLine.textContent = "Done: " + out.step + "/" + out.total + " steps in " + out.seconds + " s.";
    result.hidden = false;
    document.body.dataset.state = "done";
  } catch (e) {
    errorBox.textContent = e.message; errorBox.hidden = false;
    bar.value = 0; statusLine.textContent = "Failed.";
    document.body.dataset.state = "error";
  } finally {
    clearInterval(poller); button.disabled = false;
  }
});
</script></body></html>
"""


# ---- the server --------------------------------------------------------------------------------------------------


def make_server(demo: Demo | None, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A (not yet serving) HTTP server for ``demo`` on ``host:port`` (port 0: any free port); ``demo`` may be set
    later as ``server.demo`` (the command line binds the port before it loads the model)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "dit_jax-demo"

        def log_message(self, format: str, *args: Any) -> None:  # the demo logs generations itself
            pass

        def _send(self, status: int, data: bytes, content_type: str, cache: str = "no-store") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            demo = self.server.demo
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, demo.page().encode(), "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(HTTPStatus.OK, demo.info())
            elif path == "/api/progress":
                self._json(HTTPStatus.OK, demo.progress())
            elif path.startswith(("/image/", "/video/")) and (found := demo.file(path)) is not None:
                self._send(HTTPStatus.OK, found[0], found[1], cache="private, max-age=3600, immutable")
            elif path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

        def do_POST(self) -> None:
            demo = self.server.demo
            path = urlsplit(self.path).path
            if path != "/api/generate":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path} (POST /api/generate)"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"the request body must be 0..{MAX_BODY} bytes of JSON"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, UnicodeDecodeError):
                self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is not valid JSON"})
                return
            status, payload = demo.generate(body)
            self._json(status, payload)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.demo = demo
    return server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit_jax.demo",
        description="Serve a web page to generate images or videos with a model: class or prompt, steps, guidance, "
        "seed, size (and frames); a progress bar; the image shown and downloadable as PNG, a video as an animated GIF "
        "(and MP4 with imageio-ffmpeg).",
    )
    p.add_argument(
        "source",
        metavar="MODEL_OR_WORKDIR",
        help="training run directory (latest EMA params), model directory, PyTorch checkpoint or diffusers "
        "pipeline folder",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--dtype", default="fp32", help="compute dtype of the transformer and the VAE: fp32 or bf16")
    p.add_argument(
        "--vae", help="VAE: diffusers folder, VAE model directory or checkpoint (needed with a latent model)"
    )
    p.add_argument(
        "--text-encoder",
        help="text encoder(s) of a text-to-image model directory: a T5 folder or pipeline folder (PixArt), a "
        "pipeline folder holding the text encoders (SD3, Flux)",
    )
    p.add_argument("--text-dtype", help="compute dtype of the text encoders (default: --dtype)")
    p.add_argument("--scheduler", help="diffusers scheduler config (scheduler_config.json or a folder) to sample with")
    add_memory_arguments(p)
    p.add_argument("--max-steps", type=int, default=1000, help="most sampler steps a request may ask (default 1000)")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second of the videos (default 16)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve until interrupted; returns the exit status (0 ok, 1 error, 2 usage error)."""
    args = _parser().parse_args(argv)
    if args.max_steps < 1:
        print(f"error: --max-steps {args.max_steps}: expected a positive integer", file=sys.stderr)
        return 1
    if not (math.isfinite(args.fps) and args.fps > 0):
        print(f"error: --fps {args.fps:g}: expected a positive number", file=sys.stderr)
        return 1
    try:
        server = make_server(None, args.host, args.port)  # a taken port fails before the model loads
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"loading {args.source} ...", file=sys.stderr, flush=True)
    try:
        from dit_jax.pipelines import load

        extra = {k: v for k, v in (("text_encoder", args.text_encoder), ("text_dtype", args.text_dtype)) if v}
        extra.update(memory_options(args))
        pipe = load(args.source, vae=args.vae, scheduler=args.scheduler, dtype=args.dtype, **extra)
        prompts = table_prompts(pipe)
        demo = Demo(pipe, max_steps=args.max_steps, fps=args.fps, prompts=prompts)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        server.server_close()
        return 1
    server.demo = demo
    host, port = server.server_address[:2]
    print(f"dit_jax demo: {pipe.source} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
