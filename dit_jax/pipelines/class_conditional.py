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
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import diffusion
from dit_jax.diffusion.samplers import DDPM_METHODS, FLOW_METHODS, Plan
from dit_jax.diffusion.schedules import DDPMSchedule, FlowSchedule
from dit_jax.encoders.vae import VAEConfig, unscale_latents
from dit_jax.models import DiTConfig, build
from dit_jax.parallel import logical_rules
from dit_jax.pipelines.images import to_pil

OUTPUT_TYPES = ("np", "pil", "latent")
# The diffusers scheduler class of each DDPM-family method: a method other than the pipeline's default is configured
# like ``<Class>.from_config(pipe.scheduler.config)`` in diffusers (shared keys carry over, the rest are defaults).
SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
_MESH_AXES = ("data", "fsdp", "tensor")


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (dicts, lists and arrays → tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _is_key(seed: Any) -> bool:
    return isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(eq=False)
class ClassConditionalPipeline:
    """A DiT (config + params), its VAE (or None for pixel-space models) and the default sampler settings.

    Build it with ``dit_jax.pipelines.load``. ``schedule``/``method``/``options`` are what ``dit_jax.diffusion.sample``
    gets by default; ``scheduler_config`` (a diffusers scheduler config, when known) configures other methods the
    way ``from_config`` does in diffusers. ``devices`` (default: all local devices) carry the sharded batch.
    """

    model_config: DiTConfig
    params: Any
    schedule: DDPMSchedule | FlowSchedule
    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    vae_config: VAEConfig | None = None
    vae_params: Any = None
    scheduler_config: dict[str, Any] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    devices: Sequence[Any] | None = None
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.model_config, DiTConfig):
            raise TypeError(
                f"{self.source or 'model'}: a class-conditional pipeline needs a DiT, got "
                f"{type(self.model_config).__name__}"
            )
        if (self.vae_config is None) != (self.vae_params is None):
            raise ValueError("give both vae_config and vae_params, or neither (a pixel-space model)")
        if self.vae_config is not None and self.vae_config.latent_channels != self.model_config.in_channels:
            raise ValueError(
                f"the VAE has {self.vae_config.latent_channels} latent channels but the model takes "
                f"{self.model_config.in_channels} input channels ({self.source})"
            )
        self.sampler_settings()  # validate the default method and options now
        self._devices = list(self.devices) if self.devices is not None else jax.local_devices()
        self._mesh = Mesh(
            np.array(self._devices).reshape(len(self._devices), 1, 1), _MESH_AXES, axis_types=(AxisType.Auto,) * 3
        )
        self._rules = logical_rules()
        self._placed: dict[str, Any] = {}
        self._compiled: dict[tuple, Callable] = {}
        self._progress: Callable[[int, int], None] | None = None

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the latents (pixels for a pixel-space model) the model was trained on."""
        s = self.model_config.input_size
        return (s, s, self.model_config.in_channels)

    @property
    def num_classes(self) -> int:
        """Class ids are 0 … num_classes − 1; ``num_classes`` is the null class of guidance."""
        return self.model_config.num_classes

    @property
    def mesh(self) -> Mesh:
        """The (data = all devices, fsdp = 1, tensor = 1) mesh the batch is sharded over."""
        return self._mesh

    # ---- sampler settings ------------------------------------------------------------------------------------

    def sampler_settings(
        self, method: str | None = None, **options: Any
    ) -> tuple[DDPMSchedule | FlowSchedule, str, dict[str, Any]]:
        """``(schedule, method, options)`` that ``__call__`` passes to ``dit_jax.diffusion.sample``.

        ``method`` (default: the pipeline's) must suit the schedule (DDPM: ddpm, ddim, dpmpp_2m; flow: euler, heun,
        dpmpp_2m). ``options`` (sampler options, e.g. ``respacing="250"``, ``eta=``) win over the defaults.
        """
        schedule, chosen, base = self.schedule, self.method, dict(self.options)
        allowed = DDPM_METHODS if isinstance(schedule, DDPMSchedule) else FLOW_METHODS
        if method is not None and method != chosen:
            if method not in allowed:
                raise ValueError(
                    f"unknown method {method!r} for this pipeline's {type(schedule).__name__}; expected one of "
                    f"{allowed}"
                )
            base = {}
            if isinstance(schedule, DDPMSchedule) and self.scheduler_config is not None:
                config = {**self.scheduler_config, "_class_name": SCHEDULER_CLASSES[method]}
                schedule, _, base = diffusion.from_diffusers_scheduler_config(config)
            chosen = method
        elif chosen not in allowed:
            raise ValueError(f"unknown method {chosen!r} for a {type(schedule).__name__}; expected one of {allowed}")
        if isinstance(schedule, DDPMSchedule):
            learned = self.model_config.learn_sigma
            schedule = dataclasses.replace(schedule, learned_sigma=learned)
            if chosen == "ddpm" and learned:
                base["variance_type"] = "learned_range"  # the original DiT sampler; diffusers drops the variance
        if options.get("respacing") is not None or options.get("timesteps") is not None:
            for key in ("timestep_spacing", "steps_offset"):  # fixed by the explicit timesteps
                base.pop(key, None)
        return schedule, chosen, {**base, **options}

    def plan(self, num_inference_steps: int | None = None, method: str | None = None, **options: Any) -> Plan:
        """The sampler's trajectory (timesteps, model calls) for these settings, resolved on the host."""
        schedule, method, options = self.sampler_settings(method, **options)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return diffusion.make_plan(schedule, method, steps, **options)

    # ---- sampling --------------------------------------------------------------------------------------------

    def prepare_latents(self, batch_size: int, seed: int | jax.Array = 0) -> jax.Array:
        """Standard normal latents (batch_size, h, w, C) float32 from ``seed`` (``fold_in(key(seed), 0)``).

        ``jax.random`` differs from torch's generator: the same seed gives other latents than diffusers.
        """
        key = seed if _is_key(seed) else jax.random.key(int(seed))
        return jax.random.normal(jax.random.fold_in(key, 0), (int(batch_size), *self.latent_shape), jnp.float32)

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
        key = seed if _is_key(seed) else jax.random.key(int(seed))
        if latents is None:
            latents = self.prepare_latents(len(labels), key)
        latents = self._check_latents(latents, len(labels))
        guided = scale > 1.0
        c = self.model_config.in_channels
        if guidance_channels is not None and not (isinstance(guidance_channels, int) and 0 < guidance_channels <= c):
            raise ValueError(f"guidance_channels={guidance_channels!r} must be in 1..{c} (the latent channels)")
        x0 = self._sample(
            labels, latents, key, steps, scale, guided, guidance_channels, schedule, method, options, progress
        )
        b = len(labels)
        if output_type == "latent":
            return np.asarray(x0)[:b]
        images = np.asarray(self._decode(x0))[:b]
        return to_pil(images) if output_type == "pil" else images

    def decode(self, latents: Any) -> np.ndarray:
        """Final latents (B, h, w, C) → images (B, H, W, 3) in [0, 1] (pixel-space pipelines: ``x / 2 + 0.5``)."""
        x = jnp.asarray(latents, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != self.model_config.in_channels:
            raise ValueError(f"latents must be (B, h, w, {self.model_config.in_channels}) NHWC, got {x.shape}")
        b = x.shape[0]
        return np.asarray(self._decode(self._pad(x)))[:b]

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

    def _padded(self, b: int) -> int:
        n = len(self._devices)
        return -(-b // n) * n

    def _pad(self, x: jax.Array) -> jax.Array:
        pad = self._padded(x.shape[0]) - x.shape[0]
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x

    def _batch_sharding(self) -> NamedSharding:
        return NamedSharding(self._mesh, P("data"))

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self._mesh, P())

    def _put(self, name: str, tree: Any) -> Any:
        """Parameters replicated on the pipeline's devices (once)."""
        if name not in self._placed:
            self._placed[name] = jax.device_put(tree, self._replicated())
        return self._placed[name]

    def _report(self, i: int, n: int) -> None:
        if self._progress is not None:
            self._progress(i, n)

    def _sampler_fn(self, key: tuple, schedule, method, steps, options, guided, guidance_channels, progress: bool):
        """The jitted sampler loop for one configuration (cached on the pipeline)."""
        if key in self._compiled:
            return self._compiled[key]
        cfg = self.model_config
        model = build(cfg)
        c, null = cfg.in_channels, cfg.num_classes
        keep_mean = isinstance(schedule, FlowSchedule) and cfg.learn_sigma  # a flow sampler wants C channels

        def run(params, x, y, scale, rng):
            def cond_model(x, t, labels):
                out = model.apply({"params": params}, x, t, labels)
                return out[..., :c] if keep_mean else out

            if guided:
                null_y = jnp.full_like(y, null)
                model_fn = diffusion.cfg(cond_model, y, null_y, scale, guide_channels=guidance_channels)
            else:
                model_fn = lambda x, t: cond_model(x, t, y)  # noqa: E731
            return diffusion.sample(
                model_fn,
                x,
                schedule=schedule,
                method=method,
                num_steps=steps,
                key=rng,
                progress=self._report if progress else None,
                **options,
            )

        batch, rep = self._batch_sharding(), self._replicated()
        fn = jax.jit(run, in_shardings=(rep, batch, batch, rep, rep), out_shardings=batch)
        self._compiled[key] = fn
        return fn

    def _sample(
        self, labels, latents, key, steps, scale, guided, guidance_channels, schedule, method, options, progress
    ):
        b = len(labels)
        x = jax.device_put(self._pad(latents), self._batch_sharding())
        y = jax.device_put(np.pad(labels, (0, self._padded(b) - b)), self._batch_sharding())
        cache_key = (
            "sample",
            tuple(x.shape),
            schedule,
            method,
            steps,
            _freeze(options),
            guided,
            guidance_channels if guided else None,
            progress is not None,
        )
        fn = self._sampler_fn(
            cache_key, schedule, method, steps, options, guided, guidance_channels, progress is not None
        )
        params = self._put("model", self.params)
        rng = jax.random.fold_in(key, 1)
        self._progress = progress
        try:
            with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
                out = fn(params, x, y, jnp.float32(scale), rng)
            out = jax.block_until_ready(out)
            if progress is not None:
                jax.effects_barrier()
        finally:
            self._progress = None
        return out

    def _decode(self, x: jax.Array) -> jax.Array:
        """Padded latents (sharded) → padded images in [0, 1]."""
        cache_key = ("decode", tuple(x.shape))
        if cache_key not in self._compiled:
            vae_cfg = self.vae_config

            def decode(vae_params, z):
                if vae_cfg is None:
                    img = z
                else:
                    vae = build(vae_cfg)
                    img = vae.apply({"params": vae_params}, unscale_latents(vae_cfg, z), method="decode")
                return jnp.clip(img / 2 + 0.5, 0.0, 1.0)

            batch = self._batch_sharding()
            self._compiled[cache_key] = jax.jit(decode, in_shardings=(self._replicated(), batch), out_shardings=batch)
        vae_params = self._put("vae", self.vae_params) if self.vae_config is not None else None
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._compiled[cache_key](vae_params, jax.device_put(x, self._batch_sharding()))
