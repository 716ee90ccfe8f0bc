"""Text-to-image sampling: prompts → the family's text encoders → sampler loop with guidance → VAE decode.

What the model takes comes from its family (``dit_jax.models.family``): its text slots (which encoder reads which
prompt, at which length, with or without the padding mask), how their features become the model's condition, text
width, micro-conditions, aspect-ratio bins, a learned null caption, token-grid multiples, embedded guidance and the
sampler options its reference pipeline sets per request. ``TextToImagePipeline.__call__`` mirrors diffusers:

* PixArt-α/Σ (``PixArtSigmaPipeline``/``PixArtAlphaPipeline``): one T5 slot; prompts are tokenized to
  ``max_sequence_length`` tokens (300 for Σ, 120 for α) and encoded with their mask; guidance (``guidance_scale >
  1``) runs the batch beside the encoded ``negative_prompt`` (default ``""``) with its own mask and guides all
  latent channels; micro-conditions ``resolution = [h, w]`` and ``aspect_ratio = [h / w]`` go to models that have
  them (α-1024); with resolution binning the requested size is mapped to the closest aspect-ratio bin of diffusers'
  tables, sampled there, decoded and resized (bilinear) and centre-cropped back. The original PixArt behaviours are
  options: ``null_caption="learned"`` (α's learned null caption ``y_embedding``, the unconditional branch reusing the
  prompt's mask), ``guidance_channels=3`` (``forward_with_cfg``), and the original DPM-Solver (``method="dpmpp_2m",
  variant="dpm_solver"``).
* SD3/SD3.5 (``StableDiffusion3Pipeline``): CLIP-L reads ``prompt``, CLIP-G ``prompt_2``, T5 ``prompt_3`` (each
  falling back to ``prompt``; negatives likewise, default ``""``), without padding masks, T5 at
  ``max_sequence_length`` (256); classifier-free guidance at ``guidance_scale`` (7.0); Euler on the shifted flow
  sigmas; skip-layer guidance (SD3.5-medium) with ``skip_guidance_layers``; ``clip_skip`` (the prompt's CLIP
  features from ``hidden_states[-(clip_skip + 2)]``).
* Flux (``FluxPipeline``): CLIP reads ``prompt``, T5 ``prompt_2`` (512 tokens); a guidance-distilled model (dev)
  takes ``guidance_scale`` as an input and runs no classifier-free guidance; true CFG only with ``true_cfg_scale > 1``
  and a negative prompt; explicit sigmas ``linspace(1, 1/n, n)`` shifted by μ of the packed image token count.
* Hunyuan-DiT (``HunyuanDiTPipeline``): a BERT (77 tokens) and mT5 (256 tokens) both read ``prompt`` with their
  masks; DDPM v-prediction on the first 4 of the model's 8 output channels (the learned variance is dropped), 50
  steps, CFG 5 against ``negative_prompt`` (default ``""``), ``guidance_rescale``; v1.1's size conditions
  (``original_size``, ``target_size``, ``crops_coords_top_left``) and style 0; resolution binning by the family's
  own rule (``family.binned_size``: standard shapes, the image returned at the binned size).

Precomputed text: ``prompt_embeds`` with ``prompt_attention_mask`` (PixArt) or with ``pooled_prompt_embeds`` (SD3,
Flux) or with ``prompt_embeds_2`` and both masks (two text sequences: Hunyuan-DiT), and the negatives likewise;
which model inputs they fill comes from ``family.condition_specs`` (``embeds_keys``), so the pipeline names no
family.

Latents are NHWC (B, h, w, C) at the VAE's resolution (Flux: unpacked; the model packs them). The batch is padded to
a multiple of the device count and sharded; each (shape, method, steps, options) compiles once.

Random latents come from ``jax.random`` (``seed``): pass ``latents=`` (NHWC) to compare with PyTorch.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import diffusion
from dit_jax.diffusion.schedules import FlowSchedule
from dit_jax.pipelines.base import SamplingPipeline, as_key
from dit_jax.pipelines.images import to_pil
from dit_jax.pipelines.prompts import PROMPT_NAMES, PromptEncoder
from dit_jax.pipelines.prompts import as_prompt_list as _as_list
from dit_jax.pipelines.text_encoder import TextEncoder

NULL_CAPTIONS = ("negative", "learned")
# StableDiffusion3Pipeline's skip-layer guidance defaults (used when skip_guidance_layers is given)
SKIP_LAYER_GUIDANCE = {"scale": 2.8, "start": 0.01, "stop": 0.2}


def closest_bin(height: int, width: int, bins: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bin whose ratio, rounded to 2 decimals as diffusers' table keys, is closest to height / width (ties: the
    smaller ratio), as ``PixArtImageProcessor.classify_height_width_bin``."""
    ratio = height / width
    return min(bins, key=lambda hw: abs(round(hw[0] / hw[1], 2) - ratio))


def _rows(tree: Mapping[str, Any]) -> int:
    """The common leading (batch) size of a condition's arrays."""
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in tree.items()}
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        shapes = {k: np.shape(v) for k, v in tree.items()}
        raise ValueError(f"a condition needs arrays with one common leading batch size, got shapes {shapes}")
    return next(iter(sizes.values()))


def _sequence_args(keys: "EmbedsKeys", prefix: str) -> list[tuple[str, str, type]]:
    """``(model input, __call__ argument, dtype)`` of a two-sequence model's embeddings: ``{prefix}_embeds``,
    ``{prefix}_attention_mask`` and their ``_2`` ones (masks only where the model takes them)."""
    out = []
    for seq, mask, suffix in ((keys.sequence, keys.mask, ""), (keys.sequence_2, keys.mask_2, "_2")):
        out.append((seq, f"{prefix}_embeds{suffix}", np.float32))
        if mask is not None:
            out.append((mask, f"{prefix}_attention_mask{suffix}", np.int32))
    return out


def _repeat_rows(tree: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A one-row condition repeated to ``n`` rows (others unchanged)."""
    if n > 1 and _rows(tree) == 1:
        return {k: np.repeat(v, n, 0) for k, v in tree.items()}
    return tree


@dataclasses.dataclass(frozen=True)
class EmbedsKeys:
    """The model inputs that precomputed text embeddings fill (``TextToImagePipeline.embeds_keys``): ``sequence``
    (``prompt_embeds``, width ``width``), ``mask`` (``prompt_attention_mask``) and ``pooled``
    (``pooled_prompt_embeds``, width ``pooled_width``), None where the model has no such input; ``offset``: the text
    tokens of the sequence beside the ``max_sequence_length`` ones (e.g. SD3's 77 CLIP tokens). Models that read two
    text sequences (Hunyuan-DiT: CLIP and mT5) also have ``sequence_2`` (``prompt_embeds_2``, width ``width_2``) and
    ``mask_2`` (``prompt_attention_mask_2``)."""

    sequence: str
    width: int
    mask: str | None = None
    pooled: str | None = None
    pooled_width: int | None = None
    offset: int = 0
    sequence_2: str | None = None
    width_2: int | None = None
    mask_2: str | None = None

    @property
    def two_sequences(self) -> bool:
        return self.sequence_2 is not None


@dataclasses.dataclass(eq=False)
class TextToImagePipeline(SamplingPipeline):
    """A text-to-image model such as PixArt, SD3 or Flux (config + params), its VAE, its text encoders and the
    default sampler settings (e.g. PixArt in diffusers: DPM-Solver++, 20 steps, guidance 4.5).

    Build it with ``dit_jax.pipelines.load``. ``text_encoders`` maps the family's text slots (``family.text_slots``,
    e.g. SD3: ``clip_l``, ``clip_g``, ``t5``) to ``TextEncoder``s; a missing slot is left to the family (SD3 without
    T5: zero T5 features). One-slot families (PixArt) may pass ``text_encoder`` instead; with no encoder at all pass
    ``prompt_embeds`` (with ``prompt_attention_mask``, or ``pooled_prompt_embeds`` for models with a pooled text vector
    such as SD3 and Flux) or ``condition=``. ``max_sequence_length``: the text tokens of slots without their
    own length (PixArt: 300 for Σ, 120 for α; SD3 256, Flux 512). ``aspect_ratio_bins``: (height, width) pixel sizes
    for resolution binning; None takes the family's table for the model's sample size (PixArt), if there is one.
    ``true_cfg``: whether ``guidance_scale`` is the embedded guidance and classifier-free guidance is
    ``true_cfg_scale`` with a negative prompt, as in ``FluxPipeline``; None: so for guidance-distilled models and
    for families that have guidance-distilled presets (Flux-schnell follows Flux-dev's pipeline).
    """

    task = "text-to-image"
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    text_encoder: TextEncoder | None = None
    max_sequence_length: int = 300
    aspect_ratio_bins: Sequence[tuple[int, int]] | None = None
    text_encoders: Mapping[str, TextEncoder] | None = None
    true_cfg: bool | None = None

    def _check_model(self) -> None:
        super()._check_model()
        if not isinstance(self.max_sequence_length, int) or self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length!r} must be a positive integer")
        cfg, family = self.model_config, self.family
        slots = tuple(family.text_slots(cfg))
        names = [s.name for s in slots]
        if self.text_encoder is not None and self.text_encoders is not None:
            raise ValueError("give text_encoder (one-slot families) or text_encoders (by slot name), not both")
        if self.text_encoder is not None:
            if len(slots) != 1:
                raise ValueError(
                    f"a {family.display_name} model reads prompts with {len(slots)} text encoders {names}: pass "
                    "text_encoders={slot name: TextEncoder} instead of text_encoder="
                )
            encoders = {slots[0].name: self.text_encoder}
        else:
            encoders = dict(self.text_encoders or {})
        if self.offload:  # the encoders' weights in host memory (host copies of encoders given on the device)
            encoders = {k: e.offloaded() if isinstance(e, TextEncoder) else e for k, e in encoders.items()}
        self._prompts = PromptEncoder(cfg, encoders, max_sequence_length=self.max_sequence_length, source=self.source)
        self._slots, self._encoders = self._prompts.slots, self._prompts.encoders

    # ---- text --------------------------------------------------------------------------------------------------

    @property
    def slots(self) -> tuple:
        """The family's text slots (``TextSlot``: name, components, prompt, length, mask)."""
        return self._slots

    @property
    def encoders(self) -> dict[str, TextEncoder]:
        """The text encoders by slot name (a slot may have none)."""
        return dict(self._encoders)

    @property
    def uses_true_cfg(self) -> bool:
        """Whether ``guidance_scale`` is the embedded guidance and classifier-free guidance ``true_cfg_scale`` with
        a negative prompt (``FluxPipeline``), rather than classifier-free guidance at ``guidance_scale``."""
        if self.family.embedded_guidance(self.model_config):
            return True
        if self.true_cfg is not None:
            return bool(self.true_cfg)
        return self.family.true_cfg(self.model_config)

    def _one_slot(self, what: str):
        if len(self._slots) != 1:
            raise ValueError(
                f"{what} applies to one-encoder models; a {self.family.display_name} model reads "
                f"{[s.name for s in self._slots]}: pass condition= (e.g. from text_condition(...)) instead"
            )
        return self._slots[0]

    def _length(self, max_sequence_length: int | None) -> int:
        length = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be a positive integer")
        return int(length)

    def embeds_keys(self) -> EmbedsKeys:
        """Which model inputs precomputed embeddings fill, from ``family.condition_specs``: ``prompt_embeds`` the one
        (B, L, C) input, ``prompt_attention_mask`` a (B, L) integer input, ``pooled_prompt_embeds`` a (B, P) float
        input that is no size micro-condition (SD3, Flux: ``context`` and ``pooled``; PixArt: ``caption`` and
        ``caption_mask``); a model with two (B, L, C) inputs and no pooled vector takes ``prompt_embeds`` and
        ``prompt_embeds_2``, each with its mask (Hunyuan-DiT: ``clip``, ``clip_mask``, ``t5``, ``t5_mask``)."""
        cfg, family = self.model_config, self.family
        specs = family.condition_specs(cfg, 1)
        side = cfg.input_size * self.vae_scale_factor
        sizes = set(family.size_condition(cfg, side, side, 1))
        floating = {k: bool(jnp.issubdtype(s.dtype, jnp.floating)) for k, s in specs.items()}
        seq = [k for k, s in specs.items() if len(s.shape) == 3]
        masks = [k for k, s in specs.items() if len(s.shape) == 2 and not floating[k]]
        pooled = [k for k, s in specs.items() if len(s.shape) == 2 and floating[k] and k not in sizes]
        tokens = [int(specs[k].shape[1]) for k in seq]
        if len(seq) == 2 and not pooled and (not masks or [int(specs[k].shape[1]) for k in masks] == tokens):
            # two text sequences, each with its mask in the same order (e.g. CLIP and mT5): prompt_embeds and _2
            return EmbedsKeys(
                sequence=seq[0],
                width=int(specs[seq[0]].shape[-1]),
                mask=masks[0] if masks else None,
                sequence_2=seq[1],
                width_2=int(specs[seq[1]].shape[-1]),
                mask_2=masks[1] if masks else None,
            )
        if len(seq) != 1 or len(masks) > 1 or len(pooled) > 1:
            shapes = {k: tuple(s.shape) for k, s in specs.items()}
            raise ValueError(
                f"precomputed text embeddings do not map onto the inputs {shapes} of a {family.display_name} model: "
                "pass condition= instead"
            )
        spec = specs[seq[0]]
        return EmbedsKeys(
            sequence=seq[0],
            width=int(spec.shape[-1]),
            mask=masks[0] if masks else None,
            pooled=pooled[0] if pooled else None,
            pooled_width=int(specs[pooled[0]].shape[-1]) if pooled else None,
            offset=max(0, int(spec.shape[1]) - int(family.max_sequence_length(cfg))),
        )

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        max_sequence_length: int | None = None,
        *,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        do_classifier_free_guidance: bool | None = None,
        num_images_per_prompt: int = 1,
        clip_skip: int | None = None,
    ) -> tuple | dict[str, np.ndarray | None]:
        """Prompts → precomputed text embeddings for ``__call__``.

        One-encoder models (PixArt): ``(embeddings float32 (B, L, C), attention mask int32 (B, L))``, the features
        of ``prompt`` tokenized, truncated and padded to ``L = max_sequence_length`` (default: the pipeline's).
        Models with a pooled text vector (SD3, Flux): ``(prompt_embeds, negative_prompt_embeds,
        pooled_prompt_embeds, negative_pooled_prompt_embeds)`` as ``StableDiffusion3Pipeline.encode_prompt``, float32,
        ``num_images_per_prompt`` rows per prompt; the negatives (``negative_prompt``, default ``""``; ``_2``/``_3``
        default to it) are None with ``do_classifier_free_guidance=False`` (default True). ``clip_skip`` as in
        ``__call__`` (the prompts' features only).
        Models with two text sequences (Hunyuan-DiT): a dict of ``__call__``'s keyword arguments ``prompt_embeds``,
        ``prompt_attention_mask``, ``prompt_embeds_2``, ``prompt_attention_mask_2`` and their ``negative_`` ones (of
        ``negative_prompt``, default ``""``; None without guidance), ``num_images_per_prompt`` rows per prompt, as
        ``HunyuanDiTPipeline.encode_prompt`` gives them for each encoder: ``pipe(**pipe.encode_prompt(prompt))``.
        """
        keys = self.embeds_keys()
        if keys.two_sequences:
            extra = dict(prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt_2=negative_prompt_2,
                         negative_prompt_3=negative_prompt_3, clip_skip=clip_skip)  # fmt: skip
            given = sorted(k for k, v in extra.items() if v is not None)
            if given:
                raise ValueError(
                    f"encode_prompt of a {self.family.display_name} model: {', '.join(given)} do not apply (every "
                    "text encoder reads prompt and negative_prompt)"
                )
            return self._encode_sequences(
                keys, prompt, negative_prompt, max_sequence_length, do_classifier_free_guidance, num_images_per_prompt
            )
        if keys.pooled is None:
            extra = dict(prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
                         negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                         do_classifier_free_guidance=do_classifier_free_guidance, clip_skip=clip_skip)  # fmt: skip
            given = sorted(k for k, v in extra.items() if v is not None)
            if num_images_per_prompt != 1:
                given.append("num_images_per_prompt")
            if given:
                raise ValueError(
                    f"encode_prompt of a {self.family.display_name} model gives (embeddings, mask) of prompt: "
                    f"{', '.join(given)} apply to models with a pooled text vector"
                )
            return self._one_slot_features(prompt, max_sequence_length)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        length = self._length(max_sequence_length)
        cond = self.text_condition(prompt, prompt_2, prompt_3, max_sequence_length=length, clip_skip=clip_skip)
        n = _rows(cond)
        null = None
        if do_classifier_free_guidance is None or do_classifier_free_guidance:
            negatives = {1: negative_prompt, 2: negative_prompt_2, 3: negative_prompt_3}
            null = _repeat_rows(self._negative_condition(negatives, n, length), n)

        def rows(d: dict[str, np.ndarray] | None, key: str) -> np.ndarray | None:
            return None if d is None else np.repeat(np.asarray(d[key], np.float32), num_images_per_prompt, 0)

        return (rows(cond, keys.sequence), rows(null, keys.sequence), rows(cond, keys.pooled), rows(null, keys.pooled))

    def _encode_sequences(
        self,
        keys: EmbedsKeys,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        max_sequence_length: int | None,
        do_classifier_free_guidance: bool | None,
        num_images_per_prompt: int,
    ) -> dict[str, np.ndarray | None]:
        """``encode_prompt`` of a model with two text sequences: ``__call__``'s embedding arguments."""
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        length = self._length(max_sequence_length)
        cond = self.text_condition(prompt, max_sequence_length=length)
        n = _rows(cond)
        null = None
        if do_classifier_free_guidance is None or do_classifier_free_guidance:
            null = _repeat_rows(self._negative_condition({1: negative_prompt, 2: None, 3: None}, n, length), n)
        out: dict[str, np.ndarray | None] = {}
        for d, prefix in ((cond, "prompt"), (null, "negative_prompt")):
            for key, name, dtype in _sequence_args(keys, prefix):
                out[name] = None if d is None else np.repeat(np.asarray(d[key], dtype), num_images_per_prompt, 0)
        return out

    def _one_slot_features(
        self, prompt: str | Sequence[str], max_sequence_length: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        prompts = _as_list(prompt, "prompt")
        slot = self._one_slot("encode_prompt")
        encoder = self._encoders.get(slot.name)
        if encoder is None:
            raise ValueError(
                f"{self.source or 'this pipeline'} has no text encoder: pass prompt_embeds= and "
                "prompt_attention_mask= (or load it with text_encoder=)"
            )
        length = slot.max_length or self._length(max_sequence_length)
        feats = encoder.features(prompts, max_length=length, use_mask=slot.use_mask)
        return feats["hidden"], feats["mask"]

    def text_condition(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        *,
        max_sequence_length: int | None = None,
        clip_skip: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompts → the model's text condition, one row per prompt (e.g. SD3 ``{"context", "pooled"}``): each slot
        encodes its prompt (``prompt_2``/``prompt_3`` default to ``prompt``; a single string or one-entry list is
        used for every prompt) and ``family.text_condition`` joins the features. ``clip_skip``: the CLIP encoders'
        ``penultimate`` features are ``hidden_states[-(clip_skip + 2)]`` (``TextEncoder.features``)."""
        prompts = self._prompt_encoder(clip_skip)
        return prompts.text_condition(prompt, prompt_2, prompt_3, max_sequence_length=max_sequence_length)

    def _prompt_encoder(self, clip_skip: int | None) -> PromptEncoder:
        """The prompt encoder, with ``clip_skip`` set on its CLIP encoders (``TextEncoder.with_clip_skip``; the
        weights and compiled encoders are shared)."""
        if clip_skip is None:
            return self._prompts
        if self._encoders and not any(e.is_clip for e in self._encoders.values()):
            raise ValueError(
                f"clip_skip={clip_skip!r} applies to CLIP text encoders; a {self.family.display_name} model reads "
                f"prompts with {sorted(self._encoders)}"
            )
        encoders = {k: e.with_clip_skip(clip_skip) if e.is_clip else e for k, e in self._encoders.items()}
        return PromptEncoder(self.model_config, encoders, max_sequence_length=self._prompts.max_sequence_length,
                             source=self.source)  # fmt: skip

    def _join(self, features: dict[str, dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
        """``family.text_condition`` of the slots' features, as numpy arrays."""
        return self._prompts.join(features, length)

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

    def _check_condition(self, condition: Any, name: str) -> dict[str, np.ndarray]:
        if not isinstance(condition, Mapping) or not condition:
            raise ValueError(f"{name} must be a non-empty dict of the model's text inputs, got {type(condition)}")
        cond = {k: np.asarray(v) for k, v in condition.items()}
        _rows(cond)
        specs = self.family.condition_specs(self.model_config, 1)
        for k, v in cond.items():
            spec = specs.get(k)
            if spec is not None and (v.ndim != len(spec.shape) or (v.ndim >= 2 and v.shape[-1] != spec.shape[-1])):
                raise ValueError(f"{name}[{k!r}] must be {('B',) + tuple(spec.shape[1:])}-shaped, got {v.shape}")
        return cond

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
        has bins or its family a binning rule) samples at the closest aspect-ratio bin and resizes to the request,
        as diffusers' PixArt pipelines do, or, for a family with a rule of its own (``family.binned_size``, e.g.
        ``HunyuanDiTPipeline``'s standard shapes), samples and returns the image at the binned size.
        """
        f, p = self.vae_scale_factor, self.model_config.patch_size
        default = self.model_config.input_size * f
        out = (default if height is None else height, default if width is None else width)
        for name, v in zip(("height", "width"), out):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer (pixels)")
        out = (int(out[0]), int(out[1]))
        bins = self.bins()
        own = None  # the size of the family's own binning rule, if it has one and binning may apply
        if self.aspect_ratio_bins is None and (use_resolution_binning is None or use_resolution_binning):
            own = self.family.binned_size(self.model_config, *out)
        if use_resolution_binning and not bins and own is None:
            raise ValueError(
                f"use_resolution_binning=True: no aspect-ratio bins for sample size {self.model_config.input_size} "
                "of this model; pass aspect_ratio_bins= to the pipeline or use_resolution_binning=False"
            )
        binned = (bool(bins) or own is not None) if use_resolution_binning is None else bool(use_resolution_binning)
        if binned and own is not None:
            size = out = (int(own[0]), int(own[1]))
        else:
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

    # ---- sampler options per request -----------------------------------------------------------------------------

    def _reference_method(self) -> str | None:
        """The sampler of the family's reference pipeline (whose per-request options the family gives)."""
        config = self.family.scheduler_config
        if config is None:
            return self.method
        return diffusion.from_diffusers_scheduler_config(dict(config))[1]

    def request_options(
        self, num_inference_steps: int | None, method: str | None, size: tuple[int, int], options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Sampler options of one request at the sampled ``size`` (H, W) pixels: ``family.sampler_options`` (e.g.
        Flux's explicit sigmas and image token count) when the request uses the family's reference sampler, the
        image token count ``image_seq_len`` for a flow schedule with a dynamic shift, then ``options`` (they win)."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        schedule, resolved, _ = self.sampler_settings(method)
        f, p = self.vae_scale_factor, self.model_config.patch_size
        seq = (size[0] // f // p) * (size[1] // f // p)
        out: dict[str, Any] = {}
        valid_steps = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps > 0
        if valid_steps and resolved == self._reference_method():
            out.update(self.family.sampler_options(self.model_config, int(steps), seq))
        if isinstance(schedule, FlowSchedule) and schedule.dynamic_shift is not None:
            out.setdefault("image_seq_len", seq)
        user = dict(options)
        if user.get("mu") is not None:  # μ given: no image token count beside it
            out.pop("image_seq_len", None)
        if user.get("timesteps") is not None:  # explicit timesteps replace the family's sigmas
            out.pop("sigmas", None)
        return {**out, **user}

    def trajectory(
        self,
        num_inference_steps: int | None = None,
        method: str | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        use_resolution_binning: bool | None = None,
        **options: Any,
    ):
        """The sampler's trajectory (timesteps, model calls) of a request at ``height`` × ``width`` (default: the
        model's size), with the per-request options (``request_options``), resolved on the host."""
        size, _ = self.image_size(height, width, use_resolution_binning)
        options = self.request_options(num_inference_steps, method, size, options)
        return super().trajectory(num_inference_steps, method, **options)

    plan = trajectory

    # ---- conditions ----------------------------------------------------------------------------------------------

    def _embeds_condition(
        self, keys: EmbedsKeys, embeds: Any, pooled: Any, mask: Any, name: str
    ) -> dict[str, np.ndarray]:
        """Precomputed ``{name}_embeds`` and their pooled vector (and mask, for a model that takes one) as the
        model's text inputs (``keys``), checked."""
        pooled_name = name.replace("prompt", "pooled_prompt") + "_embeds"
        display = self.family.display_name
        if pooled is None:
            raise ValueError(
                f"{name}_embeds need {pooled_name} as well: a {display} model takes a pooled text vector "
                f"({keys.pooled!r}) beside the text sequence ({keys.sequence!r})"
            )
        if keys.mask is not None:
            emb, m = self._check_embeds(embeds, mask, name)
            cond = {keys.sequence: emb, keys.mask: m}
        else:
            if mask is not None:
                raise ValueError(f"{name}_attention_mask does not apply: a {display} model takes no text mask")
            emb = np.asarray(embeds, np.float32)
            if emb.ndim != 3 or emb.shape[-1] != keys.width:
                raise ValueError(f"{name}_embeds must be (B, L, {keys.width}), got shape {emb.shape}")
            cond = {keys.sequence: emb}
        vec = np.asarray(pooled, np.float32)
        if vec.shape != (emb.shape[0], keys.pooled_width):
            raise ValueError(
                f"{pooled_name} must be ({emb.shape[0]}, {keys.pooled_width}) (one row per row of {name}_embeds "
                f"{emb.shape}), got shape {vec.shape}"
            )
        cond[keys.pooled] = vec
        return cond

    def _negative_condition(self, negatives: dict[int, Any], n: int, length: int) -> dict[str, np.ndarray]:
        """The text condition of the negative prompts (default ``""``; ``_2``/``_3`` default to the first), one or
        ``n`` rows; without ``clip_skip``, as ``StableDiffusion3Pipeline.encode_prompt`` encodes them."""
        first = "" if negatives[1] is None else negatives[1]
        lists = {1: _as_list(first, "negative_prompt")}
        for k in (2, 3):
            lists[k] = lists[1] if negatives[k] is None else _as_list(negatives[k], f"negative_{PROMPT_NAMES[k]}")
        for k, items in lists.items():
            if len(items) not in (1, n):
                name = "negative_prompt" if k == 1 else f"negative_{PROMPT_NAMES[k]}"
                raise ValueError(f"{name} has {len(items)} entries for {n} prompts")
        rows = max(len(v) for v in lists.values())
        lists = {k: v * rows if len(v) == 1 else v for k, v in lists.items()}
        return self.text_condition(lists[1], lists[2], lists[3], max_sequence_length=length)

    def _conditions(
        self,
        prompts: dict[int, Any],
        negatives: dict[int, Any],
        prompt_embeds: Any,
        prompt_attention_mask: Any,
        negative_prompt_embeds: Any,
        negative_prompt_attention_mask: Any,
        condition: Any,
        negative_condition: Any,
        max_sequence_length: int | None,
        null_caption: str | None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        clip_skip: int | None = None,
        prompt_embeds_2: Any = None,
        prompt_attention_mask_2: Any = None,
        negative_prompt_embeds_2: Any = None,
        negative_prompt_attention_mask_2: Any = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(cond, null)`` text inputs of the model (one row per prompt); ``null`` is empty without guidance."""
        cfg, family = self.model_config, self.family
        seconds = dict(prompt_embeds_2=prompt_embeds_2, prompt_attention_mask_2=prompt_attention_mask_2,
                       negative_prompt_embeds_2=negative_prompt_embeds_2,
                       negative_prompt_attention_mask_2=negative_prompt_attention_mask_2)  # fmt: skip
        embeds_given = prompt_embeds is not None or prompt_embeds_2 is not None
        given = [prompts[1] is not None, embeds_given, condition is not None]
        if sum(given) > 1:
            raise ValueError("pass prompt or prompt_embeds, not both (or a precomputed condition= alone)")
        if not any(given):
            raise ValueError("pass prompt or prompt_embeds (or a precomputed condition=)")
        if pooled_prompt_embeds is not None and prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds go with prompt_embeds: pass both")
        if negative_pooled_prompt_embeds is not None and negative_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds go with negative_prompt_embeds: pass both")
        keys = None
        if embeds_given or negative_prompt_embeds is not None or any(v is not None for v in seconds.values()):
            keys = self.embeds_keys()
            if keys.pooled is None and (pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None):
                name = "pooled_prompt_embeds" if pooled_prompt_embeds is not None else "negative_pooled_prompt_embeds"
                raise ValueError(
                    f"{name}: a {family.display_name} model takes no pooled text vector (its text inputs: "
                    f"{', '.join(k for k in (keys.sequence, keys.mask) if k)}); pass prompt_embeds with "
                    "prompt_attention_mask"
                )
        pooled = keys is not None and keys.pooled is not None  # embeddings with a pooled vector (SD3, Flux)
        two = keys is not None and keys.two_sequences  # two text sequences, each with its mask (Hunyuan-DiT)
        given_2 = [k for k, v in seconds.items() if v is not None]
        if given_2 and not two:
            raise ValueError(
                f"{given_2[0]}: a {family.display_name} model reads one text sequence; the _2 embeddings apply to "
                "models with two"
            )
        length = self._length(max_sequence_length)
        if prompts[1] is not None:
            cond = self.text_condition(
                prompts[1], prompts[2], prompts[3], max_sequence_length=length, clip_skip=clip_skip
            )
        elif embeds_given and two:
            parts = ((prompt_embeds, prompt_attention_mask), (prompt_embeds_2, prompt_attention_mask_2))
            cond = self._sequences_condition(keys, parts, "prompt")
        elif prompt_embeds is not None and pooled:
            cond = self._embeds_condition(keys, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask, "prompt")
            tokens = cond[keys.sequence].shape[1] - keys.offset
            if max_sequence_length is None and tokens >= 1:  # negative prompts are encoded to the embeddings' length
                length = tokens
        elif prompt_embeds is not None:
            slot = self._one_slot("prompt_embeds")
            emb, mask = self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt")
            length = emb.shape[1]
            cond = self._join({slot.name: {"hidden": emb, "mask": mask}}, length)
        else:
            cond = self._check_condition(condition, "condition")
        n = _rows(cond)
        null: dict[str, Any] = {}
        encoded_negative = False
        if null_caption == "learned":
            null_length = family.learned_null_length(cfg)
            if null_length is None:
                raise ValueError(
                    f"null_caption='learned': {self.source or 'this model'} has no learned null caption (y_embedding; "
                    "original PixArt-α checkpoints have it, diffusers folders do not)"
                )
            negative_embeds = negative_prompt_embeds is not None or negative_prompt_embeds_2 is not None
            if negative_embeds or negative_condition is not None or negatives[1] not in (None, ""):
                raise ValueError("negative_prompt/negative_prompt_embeds do not apply with null_caption='learned'")
            tokens = max((np.shape(v)[1] for v in cond.values() if np.ndim(v) >= 2), default=None)
            if tokens != null_length:
                raise ValueError(
                    f"null_caption='learned' needs captions of {null_length} tokens (the learned null caption's "
                    f"length), got {tokens}: use max_sequence_length={null_length}"
                )
            cond["drop"] = np.zeros(n, bool)
            null = {**cond, "drop": np.ones(n, bool)}
        elif null_caption == "negative":
            if negative_condition is not None:
                null = self._check_condition(negative_condition, "negative_condition")
            elif two and (negative_prompt_embeds is not None or negative_prompt_embeds_2 is not None):
                null = self._negative_sequences(
                    keys,
                    ((negative_prompt_embeds, negative_prompt_attention_mask),
                     (negative_prompt_embeds_2, negative_prompt_attention_mask_2)),
                    negatives,
                    n,
                    length,
                )  # fmt: skip
            elif negative_prompt_embeds is not None and pooled:
                null = self._embeds_condition(
                    keys,
                    negative_prompt_embeds,
                    negative_pooled_prompt_embeds,
                    negative_prompt_attention_mask,
                    "negative_prompt",
                )
                if _rows(null) not in (1, n):
                    raise ValueError(f"negative_prompt_embeds have {_rows(null)} rows for {n} prompts (give 1 or {n})")
            elif negative_prompt_embeds is not None:
                slot = self._one_slot("negative_prompt_embeds")
                neg, neg_mask = self._check_embeds(
                    negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt"
                )
                if len(neg) not in (1, n) or neg.shape[1] != length:
                    raise ValueError(
                        f"negative_prompt_embeds of shape {neg.shape} do not match prompt_embeds "
                        f"{(n, length, neg.shape[-1])}"
                    )
                null = self._join({slot.name: {"hidden": neg, "mask": neg_mask}}, length)
            else:
                if embeds_given and not self._encoders:
                    what = "negative_pooled_prompt_embeds" if pooled else "negative_prompt_attention_mask"
                    if two:
                        what = "negative_prompt_attention_mask, negative_prompt_embeds_2 and its mask"
                    raise ValueError(
                        f"{self.source or 'this pipeline'} has no text encoder for the negative prompt of guidance: "
                        f"with prompt_embeds pass negative_prompt_embeds and {what}"
                    )
                null = self._negative_condition(negatives, n, length)
                encoded_negative = True
            null = _repeat_rows(null, n)
            for k in sorted(set(cond) | set(null)):
                if k not in cond or k not in null or np.shape(null[k]) != np.shape(cond[k]):
                    hint = ""
                    if encoded_negative and embeds_given:
                        hint = (
                            f" (negative_prompt was encoded with max_sequence_length={length}: pass the "
                            "max_sequence_length prompt_embeds were encoded with, or negative_prompt_embeds)"
                        )
                    raise ValueError(
                        f"the negative condition's {k!r} has shape {np.shape(null.get(k))} but the prompt's has "
                        f"{np.shape(cond.get(k))}{hint}"
                    )
        return cond, null

    def _sequences_condition(
        self, keys: EmbedsKeys, parts: Sequence[tuple[Any, Any]], name: str, only: Sequence[int] = (0, 1)
    ) -> dict[str, np.ndarray]:
        """Precomputed ``{name}_embeds`` + ``{name}_attention_mask`` and ``{name}_embeds_2`` + its mask (``parts``)
        as a two-sequence model's text inputs (``keys``), checked; ``only``: which of the two."""
        display = self.family.display_name
        layout = ((keys.sequence, keys.width, keys.mask, ""), (keys.sequence_2, keys.width_2, keys.mask_2, "_2"))
        cond: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        for i in only:
            (embeds, mask), (seq, width, mask_key, suffix) = parts[i], layout[i]
            arg, mask_arg = f"{name}_embeds{suffix}", f"{name}_attention_mask{suffix}"
            if embeds is None:
                raise ValueError(
                    f"{arg} is missing: a {display} model reads two text sequences ({keys.sequence!r}, "
                    f"{keys.sequence_2!r}); pass {name}_embeds and {name}_embeds_2, each with its attention mask"
                )
            emb = np.asarray(embeds, np.float32)
            if emb.ndim != 3 or emb.shape[-1] != width:
                raise ValueError(f"{arg} must be (B, L, {width}), got shape {emb.shape}")
            cond[seq], rows[arg] = emb, emb.shape[0]
            if mask_key is None:
                if mask is not None:
                    raise ValueError(f"{mask_arg} does not apply: a {display} model takes no mask of {arg}")
                continue
            if mask is None:
                raise ValueError(f"{mask_arg} is required with {arg} (its token mask)")
            m = np.asarray(mask)
            if m.shape != emb.shape[:2]:
                raise ValueError(f"{mask_arg} must be {emb.shape[:2]} (B, L), got shape {m.shape}")
            cond[mask_key] = m.astype(np.int32)
        if len(set(rows.values())) > 1:
            raise ValueError(f"{' and '.join(rows)} must have the same number of rows, got {rows}")
        return cond

    def _negative_sequences(
        self, keys: EmbedsKeys, parts: Sequence[tuple[Any, Any]], negatives: dict[int, Any], n: int, length: int
    ) -> dict[str, np.ndarray]:
        """The null condition of a two-sequence model from ``negative_prompt_embeds`` and/or ``_2`` (``parts``, with
        their masks); a sequence given no embeddings is ``negative_prompt`` encoded by its encoder, as
        ``HunyuanDiTPipeline.encode_prompt`` does encoder by encoder."""
        have = [i for i, (embeds, _) in enumerate(parts) if embeds is not None]
        null = self._sequences_condition(keys, parts, "negative_prompt", only=have)
        if _rows(null) not in (1, n):
            raise ValueError(f"negative_prompt_embeds have {_rows(null)} rows for {n} prompts (give 1 or {n})")
        null = _repeat_rows(null, n)
        if len(have) < len(parts):
            if not self._encoders:
                missing = "negative_prompt_embeds" if 0 not in have else "negative_prompt_embeds_2"
                raise ValueError(
                    f"{self.source or 'this pipeline'} has no text encoder for the negative prompt: pass {missing} "
                    "(with its attention mask) as well"
                )
            null = {**_repeat_rows(self._negative_condition(negatives, n, length), n), **null}
        return null

    # ---- sampling ------------------------------------------------------------------------------------------------

    def _layer_guidance(
        self,
        layers: Any,
        scale: float | None,
        start: float | None,
        stop: float | None,
        steps: int,
        schedule,
        method: str,
        options: dict[str, Any],
    ) -> tuple | None:
        """``(layers, scale, model timesteps where it is on)`` of skip-layer guidance, as ``StableDiffusion3Pipeline``
        (on at steps i with start·n < i < stop·n), or None."""
        if layers is None:
            if any(v is not None for v in (scale, start, stop)):
                raise ValueError("skip_layer_guidance_scale/start/stop need skip_guidance_layers")
            return None
        try:
            layers = tuple(sorted({int(i) for i in layers}))
        except (TypeError, ValueError):
            raise ValueError(f"skip_guidance_layers={layers!r} must be a list of block indices") from None
        if not layers:
            return None
        scale = SKIP_LAYER_GUIDANCE["scale"] if scale is None else float(scale)
        start = SKIP_LAYER_GUIDANCE["start"] if start is None else float(start)
        stop = SKIP_LAYER_GUIDANCE["stop"] if stop is None else float(stop)
        traj = diffusion.make_trajectory(schedule, method, steps, **options)
        if traj.num_model_calls != steps:
            raise ValueError(f"skip-layer guidance needs a sampler with one model call per step; {method!r} makes "
                             f"{traj.num_model_calls} calls for {steps} steps")  # fmt: skip
        model_t = np.asarray(traj.model_t, np.float32)
        active = tuple(float(model_t[i]) for i in range(steps) if start * steps < i < stop * steps)
        return (layers, scale, active) if active else None

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
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
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        prompt_embeds_2: Any = None,
        prompt_attention_mask_2: Any = None,
        negative_prompt_embeds_2: Any = None,
        negative_prompt_attention_mask_2: Any = None,
        clip_skip: int | None = None,
        condition: Mapping[str, Any] | None = None,
        negative_condition: Mapping[str, Any] | None = None,
        use_resolution_binning: bool | None = None,
        original_size: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        null_caption: str = "negative",
        guidance_channels: int | None = None,
        guidance_rescale: float = 0.0,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float | None = None,
        skip_layer_guidance_start: float | None = None,
        skip_layer_guidance_stop: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        **sampler_options: Any,
    ) -> np.ndarray | list:
        """Sample ``num_images_per_prompt`` images per prompt: (B, H, W, 3) floats in [0, 1] (``"np"``), PIL images
        (``"pil"``) or the final latents (B, h, w, C) at the sampled (binned) size (``"latent"``).

        Give ``prompt`` (with ``prompt_2``/``prompt_3`` for the family's second and third text encoders; they default
        to ``prompt``), or precomputed ``prompt_embeds`` (e.g. from ``encode_prompt``) with ``prompt_attention_mask``
        (one-encoder models: PixArt) or with ``pooled_prompt_embeds`` (models with a pooled text vector: SD3, Flux,
        as their diffusers pipelines) or with ``prompt_attention_mask``, ``prompt_embeds_2`` and
        ``prompt_attention_mask_2`` (models with two text sequences: Hunyuan-DiT's CLIP and mT5, as
        ``HunyuanDiTPipeline``), or ``condition`` (the model's text inputs, e.g. from ``text_condition``).
        Guidance: classifier-free at ``guidance_scale > 1`` against ``negative_prompt`` (default ``""``; ``_2``/``_3``
        default to it; with ``prompt_embeds`` it is encoded to their length unless ``max_sequence_length`` is given)
        or ``negative_prompt_embeds`` + mask or + ``negative_pooled_prompt_embeds`` or ``negative_condition`` (two
        sequences: ``negative_prompt_embeds`` and/or ``negative_prompt_embeds_2`` with their masks, a missing one
        encoded from ``negative_prompt``). ``guidance_rescale`` φ > 0 rescales the guided prediction towards the
        conditional one's standard deviation (``φ·g·std(cond)/std(g) + (1 − φ)·g`` over each image, as diffusers'
        ``rescale_noise_cfg``). Models
        and families with embedded guidance (Flux) take ``guidance_scale`` as an input (when the model has one) and run
        classifier-free guidance only at ``true_cfg_scale > 1`` with a negative prompt, as ``FluxPipeline``.
        ``null_caption="learned"`` uses the model's learned null caption with the prompt's mask (original PixArt-α).
        ``skip_guidance_layers`` (SD3.5-medium: [7, 8, 9]) adds skip-layer guidance while guided, with
        ``skip_layer_guidance_scale`` (2.8) between ``skip_layer_guidance_start`` (0.01) and ``_stop`` (0.2) of the
        steps, as ``StableDiffusion3Pipeline``.
        ``clip_skip`` (SD3): the prompts' CLIP features are ``hidden_states[-(clip_skip + 2)]`` of both CLIP encoders
        instead of ``hidden_states[-2]``, as ``StableDiffusion3Pipeline``, which encodes the negative prompts without
        it (no effect on features a family does not read, e.g. Flux's pooled CLIP vector, nor on embeddings).
        ``original_size``, ``target_size``, ``crops_coords_top_left``: the size conditions of models that take them
        (``family.size_condition_options``; Hunyuan-DiT v1.1: (1024, 1024), the sampled size, (0, 0)).
        ``use_resolution_binning`` (None: on where the model has bins or its family a binning rule): see
        ``image_size``.
        ``latents``: initial noise (B, h, w, C) NHWC at the sampled size, else drawn from ``seed``.
        ``sampler_options`` go to ``dit_jax.diffusion.sample`` (e.g. ``variant="dpm_solver"``, ``eta=``); they win
        over the family's per-request options (``request_options``).
        """
        cfg, family = self.model_config, self.family
        if null_caption not in NULL_CAPTIONS:
            raise ValueError(f"null_caption={null_caption!r} is invalid: expected one of {NULL_CAPTIONS}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or guidance_rescale < 0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must be a number ≥ 0")
        micro = {k: v for k, v in (("original_size", original_size), ("target_size", target_size),
                                   ("crops_coords_top_left", crops_coords_top_left)) if v is not None}  # fmt: skip
        takes = family.size_condition_options(cfg)
        unknown = [k for k in micro if k not in takes]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: a {family.display_name} model takes "
                + (f"only the size conditions {', '.join(takes)}" if takes else "no size conditions")
            )
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
        options = self.request_options(num_inference_steps, method, (h, w), sampler_options)
        steps, scale, schedule, method, options = self._call_settings(
            output_type, num_inference_steps, guidance_scale, method, guidance_channels, options
        )
        embedded = family.embedded_guidance(cfg)
        if self.uses_true_cfg:
            cfg_scale = float(true_cfg_scale)
            negatives_given = (negative_prompt, negative_prompt_embeds, negative_prompt_embeds_2, negative_condition)
            has_negative = any(x is not None for x in negatives_given)
            guided = cfg_scale > 1.0 and has_negative
        else:
            if true_cfg_scale != 1.0:
                raise ValueError(
                    f"true_cfg_scale applies to models with embedded guidance; a {family.display_name} model's "
                    "classifier-free guidance is guidance_scale"
                )
            cfg_scale, guided = scale, scale > 1.0
        layer_guidance = self._layer_guidance(
            skip_guidance_layers,
            skip_layer_guidance_scale,
            skip_layer_guidance_start,
            skip_layer_guidance_stop,
            steps,
            schedule,
            method,
            options,
        )
        if layer_guidance is not None and cfg.scan_blocks:
            raise ValueError(
                "skip_guidance_layers needs the loop layout (scan_blocks=False): load the pipeline with "
                "scan_blocks=False"
            )
        if layer_guidance is not None and guidance_rescale:
            raise ValueError("guidance_rescale does not combine with skip_guidance_layers")
        family.size_condition(cfg, h, w, 1, **micro)  # bad size conditions fail before the text encoders run

        with self._encoding():  # offload: the text encoders are on the devices for this block only
            cond, null = self._conditions(
                {1: prompt, 2: prompt_2, 3: prompt_3},
                {1: negative_prompt, 2: negative_prompt_2, 3: negative_prompt_3},
                prompt_embeds,
                prompt_attention_mask,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                condition,
                negative_condition,
                max_sequence_length,
                null_caption if guided else None,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                clip_skip=clip_skip,
                prompt_embeds_2=prompt_embeds_2,
                prompt_attention_mask_2=prompt_attention_mask_2,
                negative_prompt_embeds_2=negative_prompt_embeds_2,
                negative_prompt_attention_mask_2=negative_prompt_attention_mask_2,
            )
        n = _rows(cond)
        if embedded:  # the guidance scale is a model input (guidance distillation)
            cond["guidance"] = np.full((n,), scale, np.float32)
            if guided:
                null["guidance"] = cond["guidance"]
        k = num_images_per_prompt
        cond, null = ({key: np.repeat(v, k, 0) for key, v in d.items()} for d in (cond, null))
        b = n * k
        size_cond = family.size_condition(cfg, h, w, b, **micro)  # the sampled (binned) size
        cond.update(size_cond)
        null.update(size_cond if guided else {})
        # padded rows keep every text token, so no attention row is fully masked
        for d in (cond, null):
            for key in d:
                if key.endswith("mask"):
                    d[key] = np.asarray(self._pad(d[key], 1))

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
            cond,
            null,
            latents,
            key,
            steps,
            cfg_scale,
            guided,
            guidance_channels,
            schedule,
            method,
            options,
            progress,
            layer_guidance,
            guidance_rescale=float(guidance_rescale),
        )
        if output_type == "latent":
            return np.asarray(x0)[:b]
        images = np.asarray(self._decode(x0, out_size if out_size != (h, w) else None))[:b]
        return to_pil(images) if output_type == "pil" else images
