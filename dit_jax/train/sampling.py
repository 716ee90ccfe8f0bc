"""Samples from training params: ``generate`` (shared with ``python -m dit_jax.evaluate``) and sample grids.

Sampling uses ``dit_jax.diffusion.sample`` with classifier-free guidance (``dit_jax.diffusion.cfg``): DiT's null
class is ``num_classes``, PixArt's null caption is its learned ``y_embedding`` (``drop_caption``). Pixel-space
runs (the quickstart) write PNG grids directly; latent runs decode with ``config.sample.vae`` (a VAE model
directory) or, without one, save the latents as ``.npy``.
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

from dit_jax.models import DiTConfig, ModelConfig, build

DEFAULT_METHODS = {"flow": "euler", "ddpm": "ddpm"}


def sample_method(objective: str, method: str | None) -> str:
    """The configured sampler, or the objective's default (flow: Euler; DDPM: ancestral)."""
    return method or DEFAULT_METHODS[objective]


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
    """x₀ from ``latents`` (noise) given ``cond`` (DiT: ``{"y"}``; PixArt: ``{"caption", "caption_mask"}``)."""
    from dit_jax import diffusion

    model = build(model_config)
    c = model_config.in_channels
    flow_on_sigma = objective == "flow" and model_config.learn_sigma

    def cond_model(x, t, cnd):
        if isinstance(model_config, DiTConfig):
            out = model.apply({"params": params}, x, t, cnd["y"])
        else:
            out = model.apply(
                {"params": params},
                x,
                t,
                cnd["caption"],
                cnd.get("caption_mask"),
                cnd.get("resolution"),
                cnd.get("aspect_ratio"),
                drop_caption=cnd["drop"],
            )
        return out[..., :c] if flow_on_sigma else out

    if isinstance(model_config, DiTConfig):
        null = {"y": jnp.full_like(cond["y"], model_config.num_classes)}
    else:
        cond = dict(cond, drop=jnp.zeros(cond["caption"].shape[0], bool))
        if cond.get("caption_mask") is not None:
            cond["caption_mask"] = jnp.asarray(cond["caption_mask"])
        null = dict(cond, drop=jnp.ones_like(cond["drop"]))
        if null.get("caption_mask") is not None:
            null["caption_mask"] = jnp.ones_like(null["caption_mask"])
    model_fn = diffusion.cfg(cond_model, cond, null, float(guidance_scale))
    return diffusion.sample(
        model_fn, latents, schedule=schedule, method=method, num_steps=num_steps, key=key, **options
    )


def to_images(x: np.ndarray) -> np.ndarray:
    """[−1, 1] float (N, H, W, C) → uint8; one channel stays grey, more than 3 keep the first 3."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x[..., :3] if x.shape[-1] >= 3 else x[..., :1]


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, C) uint8 → one (rows·H, cols·W, C) image, row-major, with a 1-pixel border."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = im
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Write a PNG atomically (temporary name, then rename)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp)
    os.replace(tmp, path)


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
        if isinstance(model_config, DiTConfig):
            classes = [int(c) for c in s.get("labels", ())]
            classes = classes or list(range(min(int(s.num_classes), model_config.num_classes)))
            self.rows = len(classes)
            y = np.repeat(np.asarray(classes, np.int32), int(s.per_class))
            cond = {"y": jnp.asarray(y)}
            n = len(y)
        else:
            n = min(int(s.per_class) * int(s.num_classes), x.shape[0])
            self.rows = max(1, int(np.sqrt(n)))
            keys = ("caption", "caption_mask", "resolution", "aspect_ratio")
            cond = {k: _replicated_rows(global_batch[k], n, mesh) for k in keys if k in global_batch}
        replicated = NamedSharding(mesh, P())
        key = jax.random.key(int(s.seed))
        latents = jax.random.normal(key, (n, *shape), jnp.float32)
        method = sample_method(config.objective, s.get("method"))

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
            save_png(path + ".png", image_grid(to_images(x), self.rows))
        elif self.vae_dir:
            save_png(path + ".png", image_grid(to_images(self._decode(x)), self.rows))
        else:  # latents without a VAE to decode them
            np.save(path + ".npy", x)
        logging.info("samples at step %d: %s", step, path)

    def _decode(self, x: np.ndarray) -> np.ndarray:
        from dit_jax.checkpoint import load_model
        from dit_jax.encoders.vae import unscale_latents

        if self._vae is None:
            vae_config, vae_params = load_model(self.vae_dir)
            vae = build(vae_config)
            self._vae = (
                jax.jit(lambda p, z: vae.apply({"params": p}, unscale_latents(vae_config, z), method=vae.decode)),
                vae_params,
            )
        fn, p = self._vae
        return np.asarray(fn(p, jnp.asarray(x)))


def _replicated_rows(x: jax.Array, n: int, mesh: Mesh) -> jax.Array:
    """The first ``n`` rows of a (possibly multi-process) global array, replicated on every device."""
    return jax.jit(lambda a: a[:n], out_shardings=NamedSharding(mesh, P()))(x)
