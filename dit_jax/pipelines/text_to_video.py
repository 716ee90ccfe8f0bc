"""Text-to-video sampling: prompts → the family's text encoder(s) → sampler loop with classifier-free guidance →
causal video VAE decode, frame chunk by frame chunk. ``TextToVideoPipeline.__call__`` mirrors diffusers'
``WanPipeline.__call__`` (Wan 2.1):

* prompts are cleaned as ``WanPipeline`` does (HTML entities unescaped twice, runs of whitespace collapsed; ``ftfy``
  first when it is installed), tokenized to ``max_sequence_length`` (512) tokens and encoded with their mask; the
  family joins the features into the model's text input (Wan: UMT5 states, zero past each prompt);
* guidance (``guidance_scale > 1``, default 5) runs the batch beside the encoded ``negative_prompt`` (default ``""``);
* latents are channels-last video ``(B, F, h, w, C)`` with ``F = (num_frames − 1) / t + 1`` and ``h, w = height / s,
  width / s`` (t, s: the VAE's temporal and spatial factors, 4 and 8 for Wan 2.1); diffusers' are ``(B, C, F, h, w)``;
* the final latents are un-normalised with the VAE's per-channel statistics as ``WanPipeline`` (``z / (1 / σ) + μ``),
  decoded latent frame 0 alone and then one latent frame at a time through the VAE's causal caches (``decode_chunk``
  with the ``"cache"`` collection, as ``AutoencoderKLWan.decode``), clamped to [−1, 1] and returned as
  ``(x / 2 + 0.5).clip(0, 1)``: frames ``(B, num_frames, H, W, 3)``.

Sizes are checked before anything runs: ``height``/``width`` multiples of s × the patch size (16 for Wan) and
``num_frames = 1 + t·k`` (81 = 1 + 4·20), in one error (``WanPipeline`` rounds the frame count with a warning). The
batch is padded to a multiple of the device count and sharded; each (shape, method, steps, options) compiles once.
Random latents come from ``jax.random`` (``seed``): pass ``latents=`` (channels-last) to compare with PyTorch.
"""

import dataclasses
import html
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.schedules import FlowSchedule
from dit_jax.models import build
from dit_jax.pipelines.base import SamplingPipeline, as_key
from dit_jax.pipelines.prompts import PromptEncoder, as_prompt_list
from dit_jax.pipelines.text_encoder import TextEncoder

VIDEO_OUTPUT_TYPES = ("np", "latent")
# WanPipeline.__call__'s defaults
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_NUM_FRAMES = 480, 832, 81
_VIDEO_VAE_FIELDS = ("z_dim", "spatial_factor", "temporal_factor", "latents_mean", "latents_std")


def clean_prompt(text: str) -> str:
    """``WanPipeline``'s prompt cleaning: ``ftfy.fix_text`` (when installed), HTML entities unescaped twice, runs of
    whitespace collapsed to one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def decode_video(vae_config: Any, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, f, h, w, z) → video (B, 1 + t·(f − 1), h·s, w·s, 3) clamped to [−1, 1] (jit-able).

    Un-normalised as ``WanPipeline`` (``latents / (1 / latents_std) + latents_mean``), then decoded as
    ``AutoencoderKLWan.decode``: latent frame 0 alone (``first=True``), then one latent frame per step of a
    ``lax.scan`` that threads the causal convs' ``"cache"`` collection, so memory holds one chunk's activations.
    """
    vae = build(vae_config)
    z = latents.astype(jnp.float32)
    inv_std = 1.0 / jnp.asarray(vae_config.latents_std, jnp.float32)
    z = z / inv_std + jnp.asarray(vae_config.latents_mean, jnp.float32)

    def step(cache: Any, frames: jax.Array, first: bool) -> tuple[jax.Array, Any]:
        variables = {"params": vae_params} if cache is None else {"params": vae_params, "cache": cache}
        out, state = vae.apply(variables, frames, first, method="decode_chunk", mutable=["cache"])
        return out, state["cache"]

    video, cache = step(None, z[:, :1], True)  # B 1 H W 3
    if z.shape[1] > 1:

        def body(cache: Any, frame: jax.Array) -> tuple[Any, jax.Array]:
            out, cache = step(cache, frame, False)
            return cache, out

        frames = jnp.moveaxis(z[:, 1:], 1, 0)[:, :, None]  # f−1 B 1 h w z
        _, rest = jax.lax.scan(body, cache, frames)  # f−1 B t H W 3
        rest = jnp.moveaxis(rest, 0, 1).reshape(z.shape[0], -1, *rest.shape[3:])  # B (f−1)·t H W 3
        video = jnp.concatenate([video, rest], axis=1)
    return jnp.clip(video, -1.0, 1.0)


def _repeat_rows(tree: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A one-row condition repeated to ``n`` rows (others unchanged)."""
    return {k: np.repeat(v, n, 0) if len(v) == 1 and n > 1 else v for k, v in tree.items()}


@dataclasses.dataclass(eq=False)
class TextToVideoPipeline(SamplingPipeline):
    """A text-to-video model such as Wan 2.1 (config + params), its causal video VAE, its text encoder(s) and the
    default sampler (Wan in diffusers: UniPC on flow sigmas with shift 3, 50 steps, guidance 5).

    Build it with ``dit_jax.pipelines.load``. ``text_encoder`` (one-slot families such as Wan: UMT5) or
    ``text_encoders`` (``{slot name: TextEncoder}``, ``family.text_slots``); without one pass ``prompt_embeds``.
    ``max_sequence_length``: text tokens (Wan: 512). The VAE is a causal video VAE whose config gives ``z_dim``,
    ``spatial_factor``, ``temporal_factor``, ``latents_mean`` and ``latents_std`` and whose module decodes chunks
    (``decode_chunk(z, first)`` with a ``"cache"`` collection), e.g. ``AutoencoderKLWan``; None: pixel-space video.
    """

    task = "text-to-video"
    latent_axes = ("f", "h", "w")
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    text_encoder: TextEncoder | None = None
    text_encoders: Mapping[str, TextEncoder] | None = None
    max_sequence_length: int = 512

    def _check_model(self) -> None:
        super()._check_model()
        PromptEncoder.check_length(self.max_sequence_length)
        cfg, family = self.model_config, self.family
        slots = tuple(family.text_slots(cfg))
        if self.text_encoder is not None and self.text_encoders is not None:
            raise ValueError("give text_encoder (one-slot families) or text_encoders (by slot name), not both")
        if self.text_encoder is not None:
            if len(slots) != 1:
                raise ValueError(
                    f"a {family.display_name} model reads prompts with {len(slots)} text encoders "
                    f"{[s.name for s in slots]}: pass text_encoders={{slot name: TextEncoder}} instead of text_encoder="
                )
            encoders = {slots[0].name: self.text_encoder}
        else:
            encoders = dict(self.text_encoders or {})
        if self.offload:  # the encoders' weights in host memory (host copies of encoders given on the device)
            encoders = {k: e.offloaded() if isinstance(e, TextEncoder) else e for k, e in encoders.items()}
        self._prompts = PromptEncoder(cfg, encoders, max_sequence_length=self.max_sequence_length, source=self.source)

    def _vae_channels(self) -> int:
        vae = self.vae_config
        missing = [f for f in _VIDEO_VAE_FIELDS if not hasattr(vae, f)]
        if missing:
            raise TypeError(
                f"{self.source or 'model'}: a TextToVideoPipeline decodes with a causal video VAE (e.g. "
                f"AutoencoderKLWan), got a {type(vae).__name__} without {missing}"
            )
        return int(vae.z_dim)

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def encoders(self) -> dict[str, TextEncoder]:
        """The text encoders by slot name (a slot may have none)."""
        return dict(self._prompts.encoders)

    @property
    def vae_scale_factor(self) -> int:
        """Video pixels per latent pixel along H and W (the VAE's spatial factor; 1 in pixel space)."""
        return 1 if self.vae_config is None else int(self.vae_config.spatial_factor)

    @property
    def vae_temporal_factor(self) -> int:
        """Video frames per latent frame after the first (the VAE's temporal factor; 1 in pixel space)."""
        return 1 if self.vae_config is None else int(self.vae_config.temporal_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(F, h, w, C) of the latents of the model's default (square) training clip."""
        cfg = self.model_config
        return (cfg.input_frames, cfg.input_size, cfg.input_size, cfg.in_channels)

    # ---- sizes -------------------------------------------------------------------------------------------------

    def video_size(
        self, height: int | None = None, width: int | None = None, num_frames: int | None = None
    ) -> tuple[int, int, int]:
        """Latent ``(frames, h, w)`` of a ``num_frames`` × ``height`` × ``width`` request (defaults 81 × 480 × 832,
        ``WanPipeline``'s), checked: every problem in one error."""
        h = DEFAULT_HEIGHT if height is None else height
        w = DEFAULT_WIDTH if width is None else width
        n = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        for name, v in (("height", h), ("width", w), ("num_frames", n)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        cfg = self.model_config
        s, t = self.vae_scale_factor, self.vae_temporal_factor
        m = s * cfg.patch_size
        pt = getattr(cfg, "patch_size_t", 1)
        problems = []
        if h % m or w % m:
            problems.append(
                f"height and width must be multiples of {m} (the VAE's spatial factor {s} × the patch size "
                f"{cfg.patch_size}), got {h}x{w}"
            )
        if (n - 1) % t:
            problems.append(f"num_frames must be 1 + {t}·k (the VAE's temporal factor {t}: e.g. 81), got {n}")
        elif ((n - 1) // t + 1) % pt:
            problems.append(
                f"num_frames={n} gives {(n - 1) // t + 1} latent frames, not a multiple of the temporal patch {pt}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return (int(n) - 1) // t + 1, int(h) // s, int(w) // s

    def prepare_latents(
        self,
        batch_size: int,
        seed: int | jax.Array = 0,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
    ) -> jax.Array:
        """Standard normal latents (batch_size, F, h, w, C) float32 of a request (``fold_in(key(seed), 0)``)."""
        f, h, w = self.video_size(height, width, num_frames)
        return self._noise(batch_size, (f, h, w, self.model_config.in_channels), seed)

    def request_options(
        self, num_inference_steps: int | None, method: str | None, latent_size: tuple[int, int, int],
        options: Mapping[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        """Sampler options of one request: the family's per-request options (``family.sampler_options``, with the
        video token count) when the request uses the pipeline's own sampler, the token count ``image_seq_len`` for a
        flow schedule with a dynamic shift, then ``options`` (they win)."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        schedule, resolved, _ = self.sampler_settings(method)
        cfg = self.model_config
        f, h, w = latent_size
        seq = (f // getattr(cfg, "patch_size_t", 1)) * (h // cfg.patch_size) * (w // cfg.patch_size)
        out: dict[str, Any] = {}
        valid_steps = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps > 0
        if valid_steps and resolved == self.method:
            out.update(self.family.sampler_options(cfg, int(steps), seq))
        if isinstance(schedule, FlowSchedule) and schedule.dynamic_shift is not None:
            out.setdefault("image_seq_len", seq)
        return {**out, **dict(options)}

    def trajectory(
        self,
        num_inference_steps: int | None = None,
        method: str | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        **options: Any,
    ):
        """The sampler's trajectory (timesteps, model calls) of a request, resolved on the host."""
        size = self.video_size(height, width, num_frames)
        options = self.request_options(num_inference_steps, method, size, options)
        return super().trajectory(num_inference_steps, method, **options)

    plan = trajectory

    # ---- text ----------------------------------------------------------------------------------------------------

    def _embeds_key(self) -> str:
        """The model input precomputed ``prompt_embeds`` fill: its one (B, L, C) text input."""
        specs = self.family.condition_specs(self.model_config, 1)
        seq = [k for k, s in specs.items() if len(s.shape) == 3]
        if len(specs) != 1 or len(seq) != 1:
            shapes = {k: tuple(s.shape) for k, s in specs.items()}
            raise ValueError(
                f"precomputed text embeddings do not map onto the inputs {shapes} of a {self.family.display_name} model"
            )
        return seq[0]

    def text_condition(self, prompt: str | Sequence[str], max_sequence_length: int | None = None) -> dict:
        """Prompts → the model's text condition, one row per prompt (Wan: ``{"context"}``, the UMT5 states zero past
        each prompt), as ``WanPipeline._get_t5_prompt_embeds``. ``max_sequence_length`` (default: the pipeline's)
        is the token count of a one-encoder family's encoder."""
        prompts = [clean_prompt(p) for p in as_prompt_list(prompt, "prompt")]
        length = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        length = PromptEncoder.check_length(length)
        slots, encoders = self._prompts.slots, self._prompts.encoders
        if len(slots) != 1:
            return self._prompts.text_condition(prompts, max_sequence_length=length)
        slot = slots[0]
        encoder = encoders.get(slot.name)
        if encoder is None:
            raise ValueError(
                f"{self.source or 'this pipeline'} has no text encoder: pass prompt_embeds= (and "
                "negative_prompt_embeds= for guidance), or load it with text_encoder="
            )
        features = encoder.features(prompts, max_length=length, use_mask=slot.use_mask)
        return self._prompts.join({slot.name: features}, length)

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(prompt_embeds, negative_prompt_embeds)`` float32 (B·k, L, C) as ``WanPipeline.encode_prompt``: k =
        ``num_videos_per_prompt`` rows per prompt; the negatives (``negative_prompt``, default ``""``) are None
        with ``do_classifier_free_guidance=False``. ``max_sequence_length`` defaults to the pipeline's (512, what
        ``__call__`` uses; diffusers' ``encode_prompt`` alone defaults to 226)."""
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt!r} must be a positive integer")
        key = self._embeds_key()
        cond, null = self._conditions(prompt, negative_prompt, None, None, max_sequence_length,
                                      do_classifier_free_guidance)  # fmt: skip

        def rows(d: dict[str, np.ndarray]) -> np.ndarray | None:
            return np.repeat(np.asarray(d[key], np.float32), num_videos_per_prompt, 0) if d else None

        return rows(cond), rows(null)

    def _check_embeds(self, embeds: Any, name: str) -> dict[str, np.ndarray]:
        key = self._embeds_key()
        width = self.family.text_width(self.model_config)
        emb = np.asarray(embeds, np.float32)
        if emb.ndim != 3 or emb.shape[-1] != width or emb.shape[0] == 0:
            raise ValueError(f"{name} must be (B, L, {width}) float arrays, got shape {emb.shape}")
        return {key: emb}

    def _conditions(
        self,
        prompt: Any,
        negative_prompt: Any,
        prompt_embeds: Any,
        negative_prompt_embeds: Any,
        max_sequence_length: int | None,
        guided: bool,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(cond, null)`` text inputs of the model, one row per prompt; ``null`` is empty without guidance."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt or prompt_embeds (one of the two)")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if prompt is not None:
            cond = self.text_condition(prompt, max_sequence_length)
        else:
            cond = self._check_embeds(prompt_embeds, "prompt_embeds")
        n = len(next(iter(cond.values())))
        if not guided:
            return cond, {}
        if negative_prompt_embeds is not None:
            null = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        else:
            negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) not in (1, n):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts")
            length = max_sequence_length
            if length is None and prompt_embeds is not None:  # the negatives get the embeddings' length
                length = next(iter(cond.values())).shape[1]
            null = self.text_condition(negatives * n if len(negatives) == 1 else negatives, length)
        null = _repeat_rows(null, n)
        for k in sorted(set(cond) | set(null)):
            if k not in cond or k not in null or np.shape(null[k]) != np.shape(cond[k]):
                raise ValueError(
                    f"the negative condition's {k!r} has shape {np.shape(null.get(k))} but the prompt's has "
                    f"{np.shape(cond.get(k))} (give 1 or {n} negative rows of the prompts' length)"
                )
        return cond, null

    # ---- sampling ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        method: str | None = None,
        latents: Any = None,
        seed: int | jax.Array = 0,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **sampler_options: Any,
    ) -> np.ndarray:
        """Sample ``num_videos_per_prompt`` videos per prompt: frames (B, num_frames, H, W, 3) float32 in [0, 1]
        (``"np"``) or the final latents (B, F, h, w, C) (``"latent"``).

        Give ``prompt`` or precomputed ``prompt_embeds`` (B, L, C) (e.g. from ``encode_prompt``). Guidance is
        classifier-free at ``guidance_scale > 1`` (default 5) against ``negative_prompt`` (default ``""``; with
        ``prompt_embeds`` encoded to their length) or ``negative_prompt_embeds``. ``height`` × ``width`` (default
        480 × 832, multiples of 16 for Wan) and ``num_frames`` (default 81, 1 + 4·k for Wan); with ``latents``
        (channels-last initial noise (B, F, h, w, C), else drawn from ``seed``) they default to the latents' size.
        ``max_sequence_length``: text tokens (default 512). ``method`` and ``sampler_options`` (e.g.
        ``method="euler"``, ``shift=5.0`` for 720p) replace the default UniPC flow sampler's settings.
        """
        cfg = self.model_config
        if output_type not in VIDEO_OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {VIDEO_OUTPUT_TYPES}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt!r} must be a positive integer")
        c = cfg.in_channels

        # sizes first: a bad size fails before the text encoder runs
        if latents is not None:
            lat = np.asarray(latents, np.float32)
            if lat.ndim != 5 or lat.shape[-1] != c:
                raise ValueError(f"latents must be channels-last (B, F, h, w, {c}), got shape {lat.shape}")
            s, t = self.vae_scale_factor, self.vae_temporal_factor
            height = lat.shape[2] * s if height is None else height
            width = lat.shape[3] * s if width is None else width
            num_frames = (lat.shape[1] - 1) * t + 1 if num_frames is None else num_frames
        size = self.video_size(height, width, num_frames)
        options = self.request_options(num_inference_steps, method, size, sampler_options)
        steps, scale, schedule, method, options = self._call_settings(
            output_type, num_inference_steps, guidance_scale, method, None, options
        )
        guided = scale > 1.0
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt or prompt_embeds (one of the two)")
        k = num_videos_per_prompt
        if prompt is not None:
            b = len(as_prompt_list(prompt, "prompt")) * k
        else:
            b = np.shape(prompt_embeds)[0] * k if np.ndim(prompt_embeds) else 0
        shape = (b, *size, c)
        if latents is not None and tuple(lat.shape) != shape:  # before the text encoder runs
            f, h, w = size
            raise ValueError(
                f"latents must be channels-last of shape {shape} ({b} videos of {f} latent frames at {h}x{w}), got "
                f"{lat.shape}"
            )

        with self._encoding():  # offload: the text encoders are on the devices for this block only
            cond, null = self._conditions(
                prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length, guided
            )
        cond, null = ({key: np.repeat(v, k, 0) for key, v in d.items()} for d in (cond, null))
        key = as_key(seed)
        latents = self._noise(b, shape[1:], key) if latents is None else jnp.asarray(lat)
        x0 = self._sample(cond, null, latents, key, steps, scale, guided, None, schedule, method, options, progress)
        if output_type == "latent":
            return np.asarray(x0)[:b]
        return np.asarray(self._decode(x0))[:b]

    def _vae_decode(self, vae_params: Any, z: jax.Array) -> jax.Array:
        """Video latents → frames in [−1, 1] (``decode_video``; pixel space: the latents)."""
        if self.vae_config is None:
            return z
        return decode_video(self.vae_config, vae_params, z)
