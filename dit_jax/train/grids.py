"""Sample grids during training (``GridSampler``) and ``generate``: samples from a run's params, shared with
``python -m dit_jax.evaluate``.

Sampling is ``dit_jax.diffusion.generate`` with classifier-free guidance against the model family's null condition
(DiT: the null class ``num_classes``; PixArt: its learned null caption). Pixel-space runs (the quickstart) write PNG
grids directly; latent runs decode with ``config.sample.vae`` (a VAE model directory) or, without one, save the
latents as ``.npy``. Video samples (N, F, H, W, C) become an animated GIF of grids plus a PNG of frame strips
(one row per sample).
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import diffusion
from dit_jax.models import ModelConfig, build, family_of
from dit_jax.pipelines.images import make_grid, save_png, to_uint8


def generate(
    model_config: ModelConfig,
    params: Any,
    cond: dict[str, jax.Array],
    latents: jax.Array,
    key: jax.Array,
    *,
    schedule: Any,
    objective: str,
    method: str,
    num_steps: int,
    guidance_scale: float,
    **options: Any,
) -> jax.Array:
    """x₀ from ``latents`` (noise) given ``cond`` (the family's condition, e.g. DiT ``{"y"}``, PixArt
    ``{"caption", "caption_mask"}``), guided against the family's null condition."""
    family = family_of(model_config)
    model = build(model_config)
    c = model_config.in_channels
    flow_on_sigma = objective == "flow" and model_config.learn_sigma

    def cond_model(x, t, cnd):
        out = family.apply(model, params, x, t, cnd)
        return out[..., :c] if flow_on_sigma else out

    cond, null = family.guidance_conditions(model_config, cond)
    return diffusion.generate(
        cond_model,
        cond,
        null,
        latents,
        key,
        guidance_scale=float(guidance_scale),
        schedule=schedule,
        method=method,
        num_steps=num_steps,
        **options,
    )


def grid_png(x: np.ndarray, rows: int) -> np.ndarray:
    """Samples in [−1, 1] (N, H, W, C) → one uint8 grid image of ``rows`` rows with a 1-pixel border (one channel
    stays grey; more than 3 keep the first 3)."""
    images = to_uint8((np.asarray(x, np.float32) + 1.0) / 2.0)
    images = images[..., :3] if images.shape[-1] >= 3 else images[..., :1]
    return make_grid(images, nrow=-(-len(images) // rows), padding=1)


def grid_video(x: np.ndarray, rows: int) -> np.ndarray:
    """Video samples in [−1, 1] (N, F, H, W, C) → uint8 frames (F, GH, GW, C): frame k is the grid of every
    sample's frame k, laid out as ``grid_png``."""
    x = np.asarray(x, np.float32)
    return np.stack([grid_png(x[:, k], rows) for k in range(x.shape[1])])


def frame_strip(x: np.ndarray) -> np.ndarray:
    """Video samples in [−1, 1] (N, F, H, W, C) → one uint8 image: a row per sample, its frames left to right."""
    x = np.asarray(x, np.float32)
    n, f = x.shape[:2]
    return grid_png(x.reshape(n * f, *x.shape[2:]), n)


def save_samples(path: str, x: np.ndarray, rows: int, fps: float = 8) -> str:
    """Write samples in [−1, 1] under ``path`` (no suffix): images (N, H, W, C) as a PNG grid, videos
    (N, F, H, W, C) as an animated GIF of grids (and a PNG of frame strips). Returns the main file's path."""
    if np.ndim(x) == 5:
        from dit_jax.pipelines.video import save_video

        save_png(path + ".png", frame_strip(x))
        return str(save_video(grid_video(x, rows), path + ".gif", fps=fps))
    save_png(path + ".png", grid_png(x, rows))
    return path + ".png"


class GridSampler:
    """Fixed noise and conditions (from ``config.sample.seed``), sampled with the EMA params, written as a grid."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model_config: ModelConfig,
        schedule: Any,
        mesh: Mesh,
        param_shardings: Any,
        global_batch: dict[str, jax.Array],
    ):
        s = config.sample
        self.pixel_space = config.data.name != "latents"
        x = global_batch["x"]
        shape = x.shape[1:]
        cond, n, self.rows = family_of(model_config).grid_condition(model_config, s, global_batch)
        cond = {k: _replicated_rows(v, n, mesh) for k, v in cond.items()}
        replicated = NamedSharding(mesh, P())
        key = jax.random.key(int(s.seed))
        latents = jax.random.normal(key, (n, *shape), jnp.float32)
        method = diffusion.default_method(config.objective, s.get("method"))

        def run(params, cond, latents):
            return generate(
                model_config,
                params,
                cond,
                latents,
                jax.random.fold_in(key, 1),
                schedule=schedule,
                objective=config.objective,
                method=method,
                num_steps=int(s.num_steps),
                guidance_scale=float(s.guidance_scale),
                **dict(s.get("options", {})),
            )

        self._fn = jax.jit(run, in_shardings=(param_shardings, replicated, replicated), out_shardings=replicated)
        self._cond = jax.device_put(cond, replicated)
        self._latents = jax.device_put(latents, replicated)
        self._vae = None
        self.vae_dir = s.get("vae") or ""

    def samples(self, params: Any) -> np.ndarray:
        out = self._fn(params, self._cond, self._latents)
        return np.asarray(out.addressable_data(0))

    def write(self, params: Any, step: int, workdir: str) -> None:
        """Sample (every process takes part) and write ``WORKDIR/samples/step_<N>.png`` from process 0."""
        x = self.samples(params)
        if jax.process_index() != 0:
            return
        path = os.path.join(workdir, "samples", f"step_{step:07d}")
        if self.pixel_space:
            path = save_samples(path, x, self.rows)
        elif self.vae_dir:
            path = save_samples(path, self._decode(x), self.rows)
        else:  # latents without a VAE to decode them
            path += ".npy"
            np.save(path, x)
        logging.info("samples at step %d: %s", step, path)

    def _decode(self, x: np.ndarray) -> np.ndarray:
        """Latents → pixels with ``config.sample.vae``: an image VAE's ``decode``, or for video latents
        (N, F, H, W, C) the causal video VAE decode of the text-to-video pipelines."""
        from dit_jax.checkpoint import load_model

        if self._vae is None:
            vae_config, vae_params = load_model(self.vae_dir)
            if x.ndim == 5:
                from dit_jax.pipelines.text_to_video import decode_video

                fn = jax.jit(lambda p, z: decode_video(vae_config, p, z))
            else:
                from dit_jax.encoders.vae import unscale_latents

                vae = build(vae_config)
                fn = jax.jit(lambda p, z: vae.apply({"params": p}, unscale_latents(vae_config, z), method=vae.decode))
            self._vae = (fn, vae_params)
        fn, p = self._vae
        return np.asarray(fn(p, jnp.asarray(x)))


def _replicated_rows(x: jax.Array, n: int, mesh: Mesh) -> jax.Array:
    """The first ``n`` rows of a (possibly multi-process) global array, replicated on every device."""
    return jax.jit(lambda a: a[:n], out_shardings=NamedSharding(mesh, P()))(x)
