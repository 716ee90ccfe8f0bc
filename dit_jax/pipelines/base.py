"""What every sampling pipeline shares: sampler settings from a diffusers scheduler config, a guided sampler loop
jitted once per configuration with the batch padded and sharded over the devices, and VAE decoding.

``SamplingPipeline`` holds a model (config + params), its VAE (or None in pixel space) and the default sampler; the
model's family (``dit_jax.models.family``) feeds it its condition. Subclasses turn a request into a condition and
the null condition of guidance: ``ClassConditionalPipeline`` (labels, the null class), ``TextToImagePipeline``
(text features + masks, a negative or learned null caption) and ``TextToVideoPipeline`` (video latents
(B, F, h, w, C), decoded by a causal video VAE through the ``_vae_channels``/``_vae_decode`` hooks).
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import diffusion
from dit_jax.diffusion.policy import SCHEDULER_CLASSES  # noqa: F401  (exported by the pipelines)
from dit_jax.diffusion.samplers import Trajectory
from dit_jax.diffusion.schedules import DDPMSchedule, FlowSchedule
from dit_jax.encoders.tiling import decode_tiled, tiling_geometry
from dit_jax.encoders.vae import AutoencoderKL, VAEConfig, unscale_latents
from dit_jax.models import build, family_of
from dit_jax.parallel import logical_rules
from dit_jax.parallel.mesh import MESH_AXES
from dit_jax.parallel.sequence import SEQUENCE_MODES, sequence_mode
from dit_jax.pipelines import offload as _offload

OUTPUT_TYPES = ("np", "pil", "latent")


def freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (dicts, lists and arrays → tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def is_key(seed: Any) -> bool:
    """Whether ``seed`` is already a typed ``jax.random`` key."""
    return isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)


def as_key(seed: int | jax.Array) -> jax.Array:
    """``seed`` (an int or a typed key) as a typed key."""
    return seed if is_key(seed) else jax.random.key(int(seed))


def _source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear (``align_corners=False``, output size given) along one axis: (i0, i1, λ) per output pixel."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_and_crop(images: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h, w, C) → (B, height, width, C): scale to cover (bilinear, no antialiasing) and centre-crop, as diffusers'
    ``PixArtImageProcessor.resize_and_crop_tensor`` (used to undo resolution binning)."""
    h, w = images.shape[1], images.shape[2]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    top, left = (rh - height) // 2, (rw - width) // 2
    y0, y1, ly = (a[top : top + height] for a in _source_index(h, rh))
    x0, x1, lx = (a[left : left + width] for a in _source_index(w, rw))
    ly, lx = jnp.asarray(ly)[None, :, None, None], jnp.asarray(lx)[None, None, :, None]
    rows = images[:, y0] * (1 - ly) + images[:, y1] * ly
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def _layer_guided(
    cond_model: Callable,
    cond: Any,
    null_cond: Any,
    scale: jax.Array,
    guidance_channels: int | None,
    layers: tuple[int, ...],
    layer_scale: float,
    active_t: tuple[float, ...],
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance plus skip-layer guidance (SD3.5, diffusers ``skip_guidance_layers``): on the model
    timesteps in ``active_t`` the guided output also gets ``layer_scale · (cond − cond without layers)``, where the
    second term runs the model on the conditional batch with the blocks ``layers`` skipped (the condition's
    ``skip_layers``, read by the family's ``apply``). Off those steps the extra pass is not run (``lax.cond``)."""
    active = jnp.asarray(active_t, jnp.float32)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        k = c if guidance_channels is None else guidance_channels
        both = jax.tree.map(lambda u, v: jnp.concatenate([u, v.astype(u.dtype)], 0), cond, null_cond)
        out = cond_model(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        pair = out.reshape((2, b) + out.shape[1:])
        cond_out, uncond_out = pair[0], pair[1]
        g = uncond_out[..., :k] + scale * (cond_out[..., :k] - uncond_out[..., :k])
        g = g if k == out.shape[-1] else jnp.concatenate([g, cond_out[..., k:]], axis=-1)

        def with_skip() -> jax.Array:
            skipped = cond_model(x, t, {**cond, "skip_layers": layers})
            return (g + layer_scale * (cond_out - skipped)).astype(out.dtype)

        return jax.lax.cond(jnp.any(t[0] == active), with_skip, lambda: g.astype(out.dtype))

    return model_fn


def _rescaled_guided(
    cond_model: Callable, cond: Any, null_cond: Any, scale: jax.Array, guidance_channels: int | None, rescale: float
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance with diffusers' ``guidance_rescale`` φ (``rescale_noise_cfg``): the guided channels
    g become ``φ·g·std(cond)/std(g) + (1 − φ)·g``, standard deviations (unbiased) over each image's guided channels."""

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        k = c if guidance_channels is None else guidance_channels
        both = jax.tree.map(lambda u, v: jnp.concatenate([u, v.astype(u.dtype)], 0), cond, null_cond)
        out = cond_model(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        pair = out.reshape((2, b) + out.shape[1:]).astype(jnp.float32)
        text, uncond = pair[0][..., :k], pair[1][..., :k]
        g = uncond + scale * (text - uncond)
        axes = tuple(range(1, g.ndim))
        ratio = jnp.std(text, axis=axes, ddof=1, keepdims=True) / jnp.std(g, axis=axes, ddof=1, keepdims=True)
        g = rescale * (g * ratio) + (1.0 - rescale) * g
        g = g if k == out.shape[-1] else jnp.concatenate([g, pair[0][..., k:]], axis=-1)
        return g.astype(out.dtype)

    return model_fn


@dataclasses.dataclass(eq=False)
class SamplingPipeline:
    """A diffusion model (config + params), its VAE (or None for pixel-space models) and the default sampler.

    ``schedule``/``method``/``options`` are what ``dit_jax.diffusion.sample`` gets by default; ``scheduler_config``
    (a diffusers scheduler config, when known) configures other methods the way ``from_config`` does in diffusers.
    ``devices`` (default: all local devices) carry the sharded batch. ``sequence_parallel`` = n > 1 splits each
    image's tokens over n of them (sequence parallelism, ``dit_jax.parallel.sequence``; ``sequence_mode`` "auto",
    "ulysses" or "ring") and the batch over the rest: for 2K/4K images whose attention does not fit one device.
    ``offload=True`` keeps the params of the model, the VAE and the text encoders in host memory (NumPy) and places
    each component on the devices only while it runs (``dit_jax.pipelines.offload``): the text encoders while the
    prompts are encoded, the model for the sampler loop (once per call), the VAE for the decode, each released before
    the next is placed. Text encoders given to the pipeline are used through host copies (``TextEncoder.offloaded``).
    """

    model_config: Any
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
    sequence_parallel: int = 1
    sequence_mode: str = "auto"
    offload: bool = False

    def __post_init__(self):
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload={self.offload!r} must be True or False")
        self._check_model()
        if (self.vae_config is None) != (self.vae_params is None):
            raise ValueError("give both vae_config and vae_params, or neither (a pixel-space model)")
        if self.vae_config is not None and self._vae_channels() != self.model_config.in_channels:
            raise ValueError(
                f"the VAE has {self._vae_channels()} latent channels but the model takes "
                f"{self.model_config.in_channels} input channels ({self.source})"
            )
        self.sampler_settings()  # validate the default method and options now
        self._devices = list(self.devices) if self.devices is not None else jax.local_devices()
        n, s = len(self._devices), self.sequence_parallel
        if not (isinstance(s, int) and s >= 1 and n % s == 0):
            raise ValueError(f"sequence_parallel={s!r} must be a positive integer that divides the {n} devices")
        if self.sequence_mode not in SEQUENCE_MODES:
            raise ValueError(f"sequence_mode={self.sequence_mode!r} is invalid: expected one of {SEQUENCE_MODES}")
        shape = {"data": n // s, "fsdp": 1, "sequence": s, "tensor": 1}
        self._mesh = Mesh(
            np.array(self._devices).reshape([shape[a] for a in MESH_AXES]),
            MESH_AXES,
            axis_types=(AxisType.Auto,) * len(MESH_AXES),
        )
        self._rules = logical_rules()
        if self.offload:  # params in host memory; placed per stage (_on_device)
            self.params = _offload.to_host(self.params)
            self.vae_params = _offload.to_host(self.vae_params)
        self._placed: dict[str, Any] = {}
        self._vae_tiling: dict[str, Any] | None = None  # enable_vae_tiling
        self._compiled: dict[tuple, Callable] = {}
        self._progress: Callable[[int, int], None] | None = None

    task = ""  # the model-family task this pipeline drives (``dit_jax.models.family.TASKS``)
    latent_axes = ("h", "w")  # the latents' axes between batch and channels (for messages)

    def _vae_channels(self) -> int:
        """The latent channels of the pipeline's VAE (image pipelines: an ``AutoencoderKL``)."""
        if not isinstance(self.vae_config, VAEConfig):
            raise TypeError(
                f"{self.source or 'model'}: a {type(self).__name__} decodes with an AutoencoderKL (VAEConfig), got "
                f"{type(self.vae_config).__name__}"
            )
        return self.vae_config.latent_channels

    def _check_model(self) -> None:
        """Raise if ``model_config`` is not a model this pipeline can drive."""
        try:
            task = family_of(self.model_config).task
        except TypeError:
            task = None
        if task != self.task:
            raise TypeError(
                f"{self.source or 'model'}: a {type(self).__name__} drives {self.task} models, got "
                f"{type(self.model_config).__name__}"
            )

    @property
    def family(self):
        """The model's family (how it reads its condition, its sizes and text settings)."""
        return family_of(self.model_config)

    @property
    def encoders(self) -> dict[str, Any]:
        """The text encoders by slot name (none here; text-conditioned pipelines have theirs)."""
        return {}

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the latents (pixels for a pixel-space model) the model was trained on."""
        s = self.model_config.input_size
        return (s, s, self.model_config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each axis (2^(VAE blocks − 1); 1 in pixel space)."""
        return 1 if self.vae_config is None else 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def mesh(self) -> Mesh:
        """The mesh the batch is sharded over: data = devices / sequence_parallel, sequence = sequence_parallel."""
        return self._mesh

    # ---- sampler settings ------------------------------------------------------------------------------------

    def sampler_settings(
        self, method: str | None = None, **options: Any
    ) -> tuple[DDPMSchedule | FlowSchedule, str, dict[str, Any]]:
        """``(schedule, method, options)`` that ``__call__`` passes to ``dit_jax.diffusion.sample``.

        ``method`` (default: the pipeline's) must suit the schedule (DDPM: ddpm, ddim, dpmpp_2m; flow: euler, heun,
        dpmpp_2m). ``options`` (sampler options, e.g. ``respacing="250"``, ``eta=``) win over the defaults.
        """
        return diffusion.sampler_settings(
            self.schedule,
            self.method,
            self.options,
            learned_sigma=self.model_config.learn_sigma,
            scheduler_config=self.scheduler_config,
            requested=method,
            **options,
        )

    def _call_settings(
        self,
        output_type: str,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        method: str | None,
        guidance_channels: int | None,
        sampler_options: dict[str, Any],
    ) -> tuple[int, float, DDPMSchedule | FlowSchedule, str, dict[str, Any]]:
        """``(steps, scale, schedule, method, options)`` of a call, every argument checked before anything compiles."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = float(self.guidance_scale if guidance_scale is None else guidance_scale)
        schedule, method, options = self.sampler_settings(method, **sampler_options)
        diffusion.make_trajectory(schedule, method, steps, **options)  # bad steps/options: one clear error now
        c = self.model_config.in_channels
        if guidance_channels is not None and not (isinstance(guidance_channels, int) and 0 < guidance_channels <= c):
            raise ValueError(f"guidance_channels={guidance_channels!r} must be in 1..{c} (the latent channels)")
        return steps, scale, schedule, method, options

    def trajectory(
        self, num_inference_steps: int | None = None, method: str | None = None, **options: Any
    ) -> Trajectory:
        """The sampler's trajectory (timesteps, model calls) for these settings, resolved on the host."""
        schedule, method, options = self.sampler_settings(method, **options)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return diffusion.make_trajectory(schedule, method, steps, **options)

    plan = trajectory  # the earlier name

    # ---- latents and decoding --------------------------------------------------------------------------------

    def prepare_latents(self, batch_size: int, seed: int | jax.Array = 0) -> jax.Array:
        """Standard normal latents (batch_size, h, w, C) float32 from ``seed`` (``fold_in(key(seed), 0)``).

        ``jax.random`` differs from torch's generator: the same seed gives other latents than diffusers.
        """
        return self._noise(batch_size, self.latent_shape, seed)

    def enable_vae_tiling(
        self, tile_size: int | None = None, *, overlap: float = 0.25, norm_passes: int | None = None
    ) -> None:
        """Decode latents larger than one tile tile by tile (``dit_jax.encoders.tiling.decode_tiled``, as diffusers'
        ``enable_vae_tiling``): the VAE's memory is one tile's activations, for 2K/4K images. ``tile_size``: image
        pixels (default: the VAE's ``sample_size``); ``overlap``: the share of a tile its neighbour sees;
        ``norm_passes``: None makes every GroupNorm use whole-image statistics (the untiled decode up to the seams;
        26 tiled passes for the SD/SDXL layout), 0 per-tile statistics (diffusers' tiling, one pass)."""
        if not isinstance(self.vae_config, VAEConfig):
            what = "a pixel-space model has no VAE" if self.vae_config is None else "this VAE is not an AutoencoderKL"
            raise ValueError(f"enable_vae_tiling: {what} ({self.source or type(self).__name__})")
        tiling_geometry(AutoencoderKL(self.vae_config), tile_size, overlap, norm_passes)  # bad values fail here
        self._vae_tiling = dict(tile_size=tile_size, overlap=float(overlap), norm_passes=norm_passes)

    def disable_vae_tiling(self) -> None:
        """Decode whole latents again (the default)."""
        self._vae_tiling = None

    def decode(self, latents: Any) -> np.ndarray:
        """Final latents (B, h, w, C) → images (B, H, W, 3) in [0, 1] (pixel-space pipelines: ``x / 2 + 0.5``); video
        pipelines: (B, F, h, w, C) → frames (B, num_frames, H, W, 3)."""
        x = jnp.asarray(latents, jnp.float32)
        c = self.model_config.in_channels
        if x.ndim != len(self.latent_axes) + 2 or x.shape[-1] != c:
            layout = ", ".join(("B", *self.latent_axes, str(c)))
            order = "NHWC" if self.latent_axes == ("h", "w") else "channels-last"
            raise ValueError(f"latents must be ({layout}) {order}, got {x.shape}")
        b = x.shape[0]
        return np.asarray(self._decode(self._pad(x)))[:b]

    # ---- internals -------------------------------------------------------------------------------------------

    @staticmethod
    def _noise(batch_size: int, shape: tuple[int, ...], seed: int | jax.Array) -> jax.Array:
        key = jax.random.fold_in(as_key(seed), 0)
        return jax.random.normal(key, (int(batch_size), *shape), jnp.float32)

    def _padded(self, b: int) -> int:
        n = self._mesh.shape["data"]
        return -(-b // n) * n

    def _pad(self, x: Any, value: float = 0) -> Any:
        """Pad the leading (batch) axis to a multiple of the device count."""
        x = jnp.asarray(x)
        pad = self._padded(x.shape[0]) - x.shape[0]
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value) if pad else x

    def _batch_sharding(self) -> NamedSharding:
        return NamedSharding(self._mesh, P("data"))

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self._mesh, P())

    def _put(self, name: str, tree: Any) -> Any:
        """Parameters replicated on the pipeline's devices (once)."""
        if name not in self._placed:
            self._placed[name] = jax.device_put(tree, self._replicated())
        return self._placed[name]

    @contextlib.contextmanager
    def _on_device(self, name: str, tree: Any) -> Iterator[Any]:
        """Parameters replicated on the pipeline's devices for a block: placed once and kept (``_put``), or with
        ``offload`` placed for the block and released after it (the block waits for the results that read them)."""
        if not self.offload:
            yield self._put(name, tree)
        else:
            with _offload.on_device(tree, self._replicated()) as placed:
                yield placed

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        """A block that encodes prompts: an offloaded text encoder is placed at its first use and stays placed to the
        end of the block (prompts and negative prompts: one transfer), then released before the sampler runs."""
        with contextlib.ExitStack() as stack:
            for encoder in self.encoders.values():
                stack.enter_context(encoder.hold())
            yield

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """The mesh, logical axis rules and sequence mode the pipeline's functions are traced and run under."""
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules), sequence_mode(self.sequence_mode):
            yield

    def _report(self, i: int, n: int) -> None:
        if self._progress is not None:
            self._progress(i, n)

    def _sampler_fn(
        self,
        key: tuple,
        schedule,
        method,
        steps,
        options,
        guided,
        guidance_channels,
        progress: bool,
        layer_guidance: tuple | None = None,
        guidance_rescale: float = 0.0,
    ):
        """The jitted sampler loop for one configuration (cached on the pipeline). ``layer_guidance``: ``(skipped
        layers, scale, model timesteps where it is on)`` of skip-layer guidance (see ``_layer_guided``);
        ``guidance_rescale``: φ of ``_rescaled_guided`` (0: plain guidance)."""
        if key in self._compiled:
            return self._compiled[key]
        cfg, family = self.model_config, self.family
        model = build(cfg)
        c = cfg.in_channels
        keep_mean = isinstance(schedule, FlowSchedule) and cfg.learn_sigma  # a flow sampler wants C channels

        def run(params, x, cond, null_cond, scale, rng):
            def cond_model(x, t, cond):
                out = family.apply(model, params, x, t, cond)
                return out[..., :c] if keep_mean else out

            if guidance_rescale and guided:
                guided_fn = _rescaled_guided(cond_model, cond, null_cond, scale, guidance_channels, guidance_rescale)
                return diffusion.sample(
                    guided_fn,
                    x,
                    key=rng,
                    schedule=schedule,
                    method=method,
                    num_steps=steps,
                    progress=self._report if progress else None,
                    **options,
                )
            if layer_guidance is not None and guided:
                guided_fn = _layer_guided(cond_model, cond, null_cond, scale, guidance_channels, *layer_guidance)
                return diffusion.sample(
                    guided_fn,
                    x,
                    key=rng,
                    schedule=schedule,
                    method=method,
                    num_steps=steps,
                    progress=self._report if progress else None,
                    **options,
                )
            return diffusion.generate(
                cond_model,
                cond,
                null_cond if guided else None,
                x,
                rng,
                guidance_scale=scale,
                guide_channels=guidance_channels,
                schedule=schedule,
                method=method,
                num_steps=steps,
                progress=self._report if progress else None,
                **options,
            )

        batch, rep = self._batch_sharding(), self._replicated()
        fn = jax.jit(run, in_shardings=(rep, batch, batch, batch, rep, rep), out_shardings=batch)
        self._compiled[key] = fn
        return fn

    def _sample(
        self,
        cond: Any,
        null_cond: Any,
        latents: jax.Array,
        key: jax.Array,
        steps: int,
        scale: float,
        guided: bool,
        guidance_channels: int | None,
        schedule: DDPMSchedule | FlowSchedule,
        method: str,
        options: dict[str, Any],
        progress: Callable[[int, int], None] | None,
        layer_guidance: tuple | None = None,
        guidance_rescale: float = 0.0,
    ) -> jax.Array:
        """Run the sampler on the padded, sharded batch; ``cond``/``null_cond`` are batch-leading pytrees (padded
        with zeros unless already padded). Returns the padded final latents."""
        batch = self._batch_sharding()
        x = jax.device_put(self._pad(latents), batch)
        cond, null_cond = (jax.device_put(jax.tree.map(self._pad, c), batch) for c in (cond, null_cond))
        cache_key = (
            "sample",
            tuple(x.shape),
            schedule,
            method,
            steps,
            freeze(options),
            guided,
            guidance_channels if guided else None,
            progress is not None,
            layer_guidance if guided else None,
            float(guidance_rescale) if guided else 0.0,
        )
        fn = self._sampler_fn(
            cache_key,
            schedule,
            method,
            steps,
            options,
            guided,
            guidance_channels,
            progress is not None,
            layer_guidance if guided else None,
            float(guidance_rescale) if guided else 0.0,
        )
        rng = jax.random.fold_in(key, 1)
        self._progress = progress
        try:
            with self._on_device("model", self.params) as params:  # offload: placed for this loop only
                with self._context():
                    out = fn(params, x, cond, null_cond, jnp.float32(scale), rng)
                out = jax.block_until_ready(out)
                if progress is not None:
                    jax.effects_barrier()
        finally:
            self._progress = None
        return out

    def _vae_decode(self, vae_params: Any, z: jax.Array) -> jax.Array:
        """Diffusion latents → pixels in about [−1, 1] (traced inside ``_decode``): ``vae.decode`` of the unscaled
        latents, or the latents themselves in pixel space."""
        if self.vae_config is None:
            return z
        vae = build(self.vae_config)
        if self._vae_tiling is not None:
            return decode_tiled(vae, vae_params, unscale_latents(self.vae_config, z), **self._vae_tiling)
        return vae.apply({"params": vae_params}, unscale_latents(self.vae_config, z), method="decode")

    def _decode(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        """Padded latents (sharded) → padded images in [0, 1]; ``size`` (H, W) resizes and centre-crops the decoded
        images (in [−1, 1], before clipping) as diffusers does after resolution binning."""
        cache_key = ("decode", tuple(x.shape), size, tuple(sorted((self._vae_tiling or {}).items())))
        if cache_key not in self._compiled:

            def decode(vae_params, z):
                img = self._vae_decode(vae_params, z)
                if size is not None:
                    img = resize_and_crop(img, *size)
                return jnp.clip(img / 2 + 0.5, 0.0, 1.0)

            batch = self._batch_sharding()
            self._compiled[cache_key] = jax.jit(decode, in_shardings=(self._replicated(), batch), out_shardings=batch)
        if self.vae_config is None:
            with self._context():
                return self._compiled[cache_key](None, jax.device_put(x, self._batch_sharding()))
        with self._on_device("vae", self.vae_params) as vae_params, self._context():
            out = self._compiled[cache_key](vae_params, jax.device_put(x, self._batch_sharding()))
            return jax.block_until_ready(out) if self.offload else out
