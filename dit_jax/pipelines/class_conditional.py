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

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.pipelines.base import OUTPUT_TYPES, SCHEDULER_CLASSES, SamplingPipeline, as_key
from dit_jax.pipelines.images import to_pil

__all__ = ["OUTPUT_TYPES", "SCHEDULER_CLASSES", "ClassConditionalPipeline"]


@dataclasses.dataclass(eq=False)
class ClassConditionalPipeline(SamplingPipeline):
    """A class-conditional model such as DiT (config + params), its VAE (or None for pixel-space models) and the
    default sampler settings.

    Build it with ``dit_jax.pipelines.load``. ``schedule``/``method``/``options`` are what ``dit_jax.diffusion.sample``
    gets by default; ``scheduler_config`` (a diffusers scheduler config, when known) configures other methods the
    way ``from_config`` does in diffusers. ``devices`` (default: all local devices) carry the sharded batch.
    """

    task = "class-to-image"

    @property
    def num_classes(self) -> int:
        """Class ids are 0 … num_classes − 1; ``num_classes`` is the null class of guidance."""
        return self.family.num_classes(self.model_config)

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
        labels = self.check_labels(class_labels)
        steps, scale, schedule, method, options = self._call_settings(
            output_type, num_inference_steps, guidance_scale, method, guidance_channels, sampler_options
        )
        key = as_key(seed)
        if latents is None:
            latents = self.prepare_latents(len(labels), key)
        latents = self._check_latents(latents, len(labels))
        guided = scale > 1.0
        cond, null = self.family.guidance_conditions(
            self.model_config, self.family.label_condition(self.model_config, labels)
        )
        x0 = self._sample(
            cond, null, latents, key, steps, scale, guided, guidance_channels, schedule, method, options, progress
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
