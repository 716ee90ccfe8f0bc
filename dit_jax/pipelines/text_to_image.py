"""Text-to-image sampling: prompts → T5 → sampler loop with classifier-free guidance → VAE decode.

What the model takes (text width, micro-conditions, aspect-ratio bins, a learned null caption, token-grid multiples)
comes from its family (``dit_jax.models.family``). For PixArt-α/Σ, ``TextToImagePipeline.__call__`` mirrors diffusers
``PixArtSigmaPipeline``/``PixArtAlphaPipeline.__call__``:
prompts are tokenized to ``max_sequence_length`` tokens (300 for Σ, 120 for α) and encoded with T5; guidance
(``guidance_scale > 1``) runs the batch beside the encoded ``negative_prompt`` (default ``""``) with its own
attention mask and guides all latent channels; a learned variance is dropped before the solver; micro-conditions
``resolution = [h, w]`` and ``aspect_ratio = [h / w]`` go to models that have them (α-1024); with resolution
binning the requested size is mapped to the closest aspect-ratio bin of diffusers' tables, sampled there, decoded
and resized (bilinear) and centre-cropped back. The original PixArt behaviours are options: ``null_caption=
"learned"`` (α's learned null caption ``y_embedding``, the unconditional branch reusing the prompt's mask),
``guidance_channels=3`` (``forward_with_cfg``), and the original DPM-Solver (``method="dpmpp_2m",
variant="dpm_solver"``). The batch is padded to a multiple of the device count and sharded; each (shape, method,
steps, options) compiles once.

Random latents come from ``jax.random`` (``seed``): pass ``latents=`` (NHWC) to compare with PyTorch.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.pipelines.base import SamplingPipeline, as_key
from dit_jax.pipelines.images import to_pil
from dit_jax.pipelines.text_encoder import TextEncoder

NULL_CAPTIONS = ("negative", "learned")


def closest_bin(height: int, width: int, bins: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bin whose ratio, rounded to 2 decimals as diffusers' table keys, is closest to height / width (ties: the
    smaller ratio), as ``PixArtImageProcessor.classify_height_width_bin``."""
    ratio = height / width
    return min(bins, key=lambda hw: abs(round(hw[0] / hw[1], 2) - ratio))


def _as_list(prompt: Any, name: str) -> list[str]:
    items = [prompt] if isinstance(prompt, str) else list(prompt)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return items


@dataclasses.dataclass(eq=False)
class TextToImagePipeline(SamplingPipeline):
    """A text-to-image model such as PixArt (config + params), its VAE, a T5 ``TextEncoder`` (or None: then pass
    ``prompt_embeds``) and the default sampler settings (PixArt in diffusers: DPM-Solver++, 20 steps, guidance 4.5).

    Build it with ``dit_jax.pipelines.load``. ``max_sequence_length``: caption tokens (PixArt: 300 for Σ, 120 for α).
    ``aspect_ratio_bins``: (height, width) pixel sizes for resolution binning; None takes the family's table for the
    model's sample size (PixArt: diffusers' tables for 32, 64, 128, 256), if there is one.
    """

    task = "text-to-image"
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    text_encoder: TextEncoder | None = None
    max_sequence_length: int = 300
    aspect_ratio_bins: Sequence[tuple[int, int]] | None = None

    def _check_model(self) -> None:
        super()._check_model()
        if not isinstance(self.max_sequence_length, int) or self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length!r} must be a positive integer")
        width = self.family.text_width(self.model_config)
        if self.text_encoder is not None and self.text_encoder.config.d_model != width:
            raise ValueError(
                f"the text encoder gives {self.text_encoder.config.d_model}-wide features but the model takes "
                f"{width}-wide captions ({self.source})"
            )

    # ---- text --------------------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[str], max_sequence_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts → ``(embeddings float32 (B, L, C), attention mask int32 (B, L))``: T5 features of the prompts
        tokenized, truncated and padded to ``L = max_sequence_length`` (default: the pipeline's)."""
        prompts = _as_list(prompt, "prompt")
        if self.text_encoder is None:
            raise ValueError(
                f"{self.source or 'this pipeline'} has no text encoder: pass prompt_embeds= and "
                "prompt_attention_mask= (or load it with text_encoder=)"
            )
        length = self.max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        if length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be a positive integer")
        tokens = self.text_encoder.tokenizer(prompts, max_length=length, padding="max_length", truncation=True,
                                             add_special_tokens=True, return_tensors="np")  # fmt: skip
        ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
        return self.text_encoder.encode_ids(ids, mask), mask

    def _check_embeds(self, embeds: Any, mask: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            raise ValueError(f"{name}_attention_mask is required with {name}_embeds (the caption's token mask)")
        embeds, mask = np.asarray(embeds, np.float32), np.asarray(mask)
        width = self.family.text_width(self.model_config)
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise ValueError(f"{name}_embeds must be (B, L, {width}), got shape {embeds.shape}")
        if mask.shape != embeds.shape[:2]:
            raise ValueError(f"{name}_attention_mask must be {embeds.shape[:2]} (B, L), got shape {mask.shape}")
        return embeds, mask.astype(np.int32)

    # ---- sizes ---------------------------------------------------------------------------------------------------

    def bins(self) -> Sequence[tuple[int, int]] | None:
        """The aspect-ratio bins of resolution binning (None if there are none for this model's sample size)."""
        if self.aspect_ratio_bins is not None:
            return self.aspect_ratio_bins
        return self.family.aspect_ratio_bins(self.model_config)

    def image_size(
        self, height: int | None = None, width: int | None = None, use_resolution_binning: bool | None = None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((sampled height, width), (output height, width))`` in pixels for a request, checked.

        Defaults: the model's sample size × the VAE factor. ``use_resolution_binning`` (None: on when the pipeline
        has bins) samples at the closest aspect-ratio bin and resizes to the request, as diffusers does.
        """
        f, p = self.vae_scale_factor, self.model_config.patch_size
        default = self.model_config.input_size * f
        out = (default if height is None else height, default if width is None else width)
        for name, v in zip(("height", "width"), out):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer (pixels)")
        out = (int(out[0]), int(out[1]))
        bins = self.bins()
        if use_resolution_binning and not bins:
            raise ValueError(
                f"use_resolution_binning=True: no aspect-ratio bins for sample size {self.model_config.input_size} "
                "of this model; pass aspect_ratio_bins= to the pipeline or use_resolution_binning=False"
            )
        binned = bool(bins) if use_resolution_binning is None else bool(use_resolution_binning)
        size = closest_bin(*out, bins) if binned else out
        m = f * p
        if size[0] % m or size[1] % m:
            raise ValueError(
                f"height={size[0]}, width={size[1]} must be multiples of {m} (the VAE factor {f} × the patch size {p})"
            )
        r = self.family.grid_multiple(self.model_config)
        grid = (size[0] // m, size[1] // m)
        if grid[0] % r or grid[1] % r:
            raise ValueError(
                f"height={size[0]}, width={size[1]} give a {grid[0]}x{grid[1]} token grid, which "
                f"{self.family.grid_constraint(self.model_config)} cannot divide: use multiples of {m * r} pixels"
            )
        return size, out

    def prepare_latents(
        self,
        batch_size: int,
        seed: int | jax.Array = 0,
        *,
        height: int | None = None,
        width: int | None = None,
        use_resolution_binning: bool | None = None,
    ) -> jax.Array:
        """Standard normal latents (batch_size, h, w, C) for the sampled size of this request (after binning)."""
        (h, w), _ = self.image_size(height, width, use_resolution_binning)
        f = self.vae_scale_factor
        return self._noise(batch_size, (h // f, w // f, self.model_config.in_channels), seed)

    def _captions(
        self,
        prompt: Any,
        negative_prompt: Any,
        prompt_embeds: Any,
        prompt_attention_mask: Any,
        negative_prompt_embeds: Any,
        negative_prompt_attention_mask: Any,
        max_sequence_length: int | None,
        null_caption: str | None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(cond, null)`` caption inputs of the model (one row per prompt); ``null`` is empty without guidance."""
        cfg, family = self.model_config, self.family
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                "pass prompt or prompt_embeds, not both" if prompt is not None else "pass prompt or prompt_embeds"
            )
        if prompt is not None:
            emb, mask = self.encode_prompt(prompt, max_sequence_length)
        else:
            emb, mask = self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt")
        n, length = len(emb), emb.shape[1]
        cond = {"caption": emb, "caption_mask": mask}
        null: dict[str, Any] = {}
        if null_caption == "learned":
            null_length = family.learned_null_length(cfg)
            if null_length is None:
                raise ValueError(
                    f"null_caption='learned': {self.source or 'this model'} has no learned null caption (y_embedding; "
                    "original PixArt-α checkpoints have it, diffusers folders do not)"
                )
            if negative_prompt_embeds is not None or negative_prompt != "":
                raise ValueError("negative_prompt/negative_prompt_embeds do not apply with null_caption='learned'")
            if length != null_length:
                raise ValueError(
                    f"null_caption='learned' needs captions of {null_length} tokens (the learned null caption's "
                    f"length), got {length}: use max_sequence_length={null_length}"
                )
            cond["drop"] = np.zeros(n, bool)
            null = {"caption": emb, "caption_mask": mask, "drop": np.ones(n, bool)}
        elif null_caption == "negative":
            if negative_prompt_embeds is not None:
                neg, neg_mask = self._check_embeds(
                    negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt"
                )
            else:
                negatives = _as_list(negative_prompt, "negative_prompt")
                if len(negatives) not in (1, n):
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts")
                neg, neg_mask = self.encode_prompt(negatives, length)
            if len(neg) == 1 and n > 1:
                neg, neg_mask = np.repeat(neg, n, 0), np.repeat(neg_mask, n, 0)
            if neg.shape != emb.shape:
                raise ValueError(f"negative_prompt_embeds of shape {neg.shape} do not match prompt_embeds {emb.shape}")
            null = {"caption": neg, "caption_mask": neg_mask}
        return cond, null

    # ---- sampling ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        method: str | None = None,
        latents: Any = None,
        seed: int | jax.Array = 0,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        prompt_embeds: Any = None,
        prompt_attention_mask: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_attention_mask: Any = None,
        use_resolution_binning: bool | None = None,
        null_caption: str = "negative",
        guidance_channels: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **sampler_options: Any,
    ) -> np.ndarray | list:
        """Sample ``num_images_per_prompt`` images per prompt: (B, H, W, 3) floats in [0, 1] (``"np"``), PIL images
        (``"pil"``) or the final latents (B, h, w, C) at the sampled (binned) size (``"latent"``).

        Give ``prompt`` or ``prompt_embeds`` + ``prompt_attention_mask`` (e.g. from ``encode_prompt``). Guidance uses
        ``negative_prompt`` (or ``negative_prompt_embeds`` + mask) with its own mask, as diffusers;
        ``null_caption="learned"`` uses the model's learned null caption with the prompt's mask (original PixArt-α).
        ``latents``: initial noise (B, h, w, C) NHWC at the sampled size, else drawn from ``seed``.
        ``sampler_options`` go to ``dit_jax.diffusion.sample`` (e.g. ``variant="dpm_solver"``, ``eta=``).
        """
        cfg = self.model_config
        if null_caption not in NULL_CAPTIONS:
            raise ValueError(f"null_caption={null_caption!r} is invalid: expected one of {NULL_CAPTIONS}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        steps, scale, schedule, method, options = self._call_settings(
            output_type, num_inference_steps, guidance_scale, method, guidance_channels, sampler_options
        )
        guided = scale > 1.0
        c = cfg.in_channels

        # sizes first: a bad size fails before the text encoder runs
        if latents is not None:
            lat = jnp.asarray(latents, jnp.float32)
            if lat.ndim != 4 or lat.shape[-1] != c:
                raise ValueError(f"latents must be NHWC of shape (B, h, w, {c}), got {lat.shape}")
            f = self.vae_scale_factor
            height = lat.shape[1] * f if height is None else height
            width = lat.shape[2] * f if width is None else width
        (h, w), out_size = self.image_size(height, width, use_resolution_binning)

        cond, null = self._captions(
            prompt,
            negative_prompt,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            max_sequence_length,
            null_caption if guided else None,
        )
        n = len(cond["caption"])
        k = num_images_per_prompt
        cond, null = (jax.tree.map(lambda a: np.repeat(a, k, 0), d) for d in (cond, null))
        b = n * k
        size_cond = self.family.size_condition(cfg, h, w, b)  # the sampled (binned) size
        cond.update(size_cond)
        null.update(size_cond if guided else {})
        # padded rows keep every caption token, so no attention row is fully masked
        for d in (cond, null):
            if "caption_mask" in d:
                d["caption_mask"] = np.asarray(self._pad(d["caption_mask"], 1))

        key = as_key(seed)
        f = self.vae_scale_factor
        shape = (b, h // f, w // f, c)
        if latents is None:
            latents = self._noise(b, shape[1:], key)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(
                f"latents must be NHWC of shape {shape} ({b} images at {h}x{w} px, the sampled size), got "
                f"{latents.shape}"
            )
        x0 = self._sample(
            cond, null, latents, key, steps, scale, guided, guidance_channels, schedule, method, options, progress
        )
        if output_type == "latent":
            return np.asarray(x0)[:b]
        images = np.asarray(self._decode(x0, out_size if out_size != (h, w) else None))[:b]
        return to_pil(images) if output_type == "pil" else images
