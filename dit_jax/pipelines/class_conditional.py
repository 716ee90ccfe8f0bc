"""Class-conditional sampling with a DiT: labels → sampler loop with classifier-free guidance → VAE decode → images.

``ClassConditionalPipeline.__call__`` mirrors diffusers ``DiTPipeline.__call__``: guidance is on when
``guidance_scale > 1`` and doubles the batch with the null class (``num_classes``), guiding all latent channels
(``guidance_channels=3`` gives the original DiT ``forward_with_cfg``); a learned variance is dropped by DDIM and
DPM-Solver and used by ``ddpm`` (learned-range variance, as the original DiT); latents are decoded with
``latents / scaling_factor`` (+ shift) and images returned as ``(x / 2 + 0.5).clip(0, 1)``. The batch is padded to a
multiple of the device count and sharded over the devices; each (shape, method, steps, options) compiles once and
is cached on the pipeline.

Random latents come from ``jax.random`` (``seed``), so they differ from torch's for the same seed: pass
``latents=`` (NHWC) to compare with PyTorch.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import diffusion
from dit_jax.models import DiTConfig
from dit_jax.pipelines.base import OUTPUT_TYPES, SCHEDULER_CLASSES, SamplingPipeline, as_key
from dit_jax.pipelines.images import to_pil

__all__ = ["OUTPUT_TYPES", "SCHEDULER_CLASSES", "ClassConditionalPipeline"]


@dataclasses.dataclass(eq=False)
class ClassConditionalPipeline(SamplingPipeline):
    """A DiT (config + params), its VAE (or None for pixel-space models) and the default sampler settings.

    Build it with ``dit_jax.pipelines.load``. ``schedule``/``method``/``options`` are what ``dit_jax.diffusion.sample``
    gets by default; ``scheduler_config`` (a diffusers scheduler config, when known) configures other methods the
    way ``from_config`` does in diffusers. ``devices`` (default: all local devices) carry the sharded batch.
    """

    model_config: DiTConfig

    def _check_model(self) -> None:
        if not isinstance(self.model_config, DiTConfig):
            raise TypeError(
                f"{self.source or 'model'}: a class-conditional pipeline needs a DiT, got "
                f"{type(self.model_config).__name__}"
            )

    def _model_fn(self, model: nn.Module, params: Any, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, t, labels)

    @property
    def num_classes(self) -> int:
        """Class ids are 0 … num_classes − 1; ``num_classes`` is the null class of guidance."""
        return self.model_config.num_classes

    def __call__(
        self,
        class_labels: int | Sequence[int] | np.ndarray,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        method: str | None = None,
        latents: Any = None,
        seed: int | jax.Array = 0,
        output_type: str = "np",
        guidance_channels: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **sampler_options: Any,
    ) -> np.ndarray | list:
        """Sample one image per label: (B, H, W, 3) floats in [0, 1] (``"np"``), PIL images (``"pil"``) or the
        final latents (B, h, w, C) (``"latent"``).

        Defaults (steps, guidance, method) are the pipeline's. ``latents``: initial noise (B, h, w, C) NHWC, else
        drawn from ``seed``; the stochastic samplers' noise comes from ``fold_in(key(seed), 1)``. ``progress(i, n)``
        is called on the host after each of the n model calls. ``sampler_options`` go to
        ``dit_jax.diffusion.sample`` (e.g. ``respacing="250"`` for the original DiT's 250 DDPM steps, ``eta=``).
        A pixel-space pipeline (no VAE) returns the model's channels (1 for the digits quickstart).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
        labels = self.check_labels(class_labels)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = float(self.guidance_scale if guidance_scale is None else guidance_scale)
        schedule, method, options = self.sampler_settings(method, **sampler_options)
        diffusion.make_plan(schedule, method, steps, **options)  # bad steps/options: one clear error before compiling
        key = as_key(seed)
        if latents is None:
            latents = self.prepare_latents(len(labels), key)
        latents = self._check_latents(latents, len(labels))
        guided = scale > 1.0
        c = self.model_config.in_channels
        if guidance_channels is not None and not (isinstance(guidance_channels, int) and 0 < guidance_channels <= c):
            raise ValueError(f"guidance_channels={guidance_channels!r} must be in 1..{c} (the latent channels)")
        null = np.full_like(labels, self.num_classes)
        x0 = self._sample(
            labels, null, latents, key, steps, scale, guided, guidance_channels, schedule, method, options, progress
        )
        b = len(labels)
        if output_type == "latent":
            return np.asarray(x0)[:b]
        images = np.asarray(self._decode(x0))[:b]
        return to_pil(images) if output_type == "pil" else images

    def check_labels(self, class_labels: Any) -> np.ndarray:
        """Class ids as int32, or one error naming the ids outside 0 … num_classes − 1."""
        raw = np.atleast_1d(np.asarray(class_labels))
        if raw.ndim != 1 or raw.size == 0:
            raise ValueError(f"class_labels must be a non-empty list of class ids, got {class_labels!r}")
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"class_labels must be integers, got {raw.tolist()!r}")
        bad = [int(v) for v in raw if not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(
                f"class id(s) {bad} out of range: this model has classes 0..{self.num_classes - 1} "
                f"({self.num_classes} is the null class used by guidance)"
            )
        return raw.astype(np.int32)

    # ---- internals -------------------------------------------------------------------------------------------

    def _check_latents(self, latents: Any, batch: int) -> jax.Array:
        x = jnp.asarray(latents, jnp.float32)
        c, p = self.model_config.in_channels, self.model_config.patch_size
        if x.ndim != 4 or x.shape[0] != batch or x.shape[-1] != c:
            raise ValueError(f"latents must be NHWC of shape ({batch}, h, w, {c}) for {batch} labels, got {x.shape}")
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"latent size {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}")
        return x
