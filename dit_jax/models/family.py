"""The model-family protocol: everything the trainer, the pipelines, the planner and the converters need to know
about one family, implemented once beside its model (DESIGN.md rule 11).

A family is a ``Family`` subclass in its model file (``models/dit.py``: ``DiTFamily``) that calls ``register`` at
import. Shared rooms look it up with ``family_of(config)`` and never name a family: a new family adds its model file,
its conversion module and its presets, and edits nothing else.

Conditions are dicts of batch-leading arrays, one key per model input (DiT: ``{"y"}``; PixArt: ``{"caption",
"caption_mask", "resolution", "aspect_ratio"}`` plus ``"drop"`` for its learned null caption). A training batch is
``{"x": latents, **condition}``; ``apply`` feeds a condition to the Linen module. Diffusion configs also expose
``input_size``, ``patch_size``, ``in_channels``, ``out_channels`` and ``learn_sigma``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

Condition = dict[str, Any]

TASKS = ("class-to-image", "text-to-image", "text-to-video")


@dataclasses.dataclass(frozen=True)
class TextSlot:
    """One text encoder a text-to-image family reads prompts with.

    ``name`` keys its features in ``Family.text_condition``; ``encoder``/``tokenizer`` are its components in a
    diffusers pipeline folder; ``prompt`` says which prompt it reads (1: ``prompt``, 2: ``prompt_2``, 3: ``prompt_3``,
    each falling back to ``prompt``); ``max_length`` is its token count (None: the pipeline's
    ``max_sequence_length``); ``use_mask=False`` encodes without the padding mask (SD3, Flux).
    """

    name: str
    encoder: str = "text_encoder"
    tokenizer: str = "tokenizer"
    prompt: int = 1
    max_length: int | None = None
    use_mask: bool = True


class Family:
    """One model family: its classes, presets and the behaviour the shared rooms call.

    Class attributes: ``name`` (the ``family`` of its configs), ``display_name``, ``config_class``,
    ``module_class``, ``presets`` (name → config), ``conversion`` (the module of its torch rule tables, e.g.
    ``"dit_jax.convert.dit"``, or None), ``task`` (``"class-to-image"``, ``"text-to-image"``, or ``""`` for components
    such as VAEs and text encoders), and for diffusion models the defaults of ``dit_jax.pipelines.load``:
    ``scheduler_config`` (the diffusers scheduler config of its reference pipeline), ``sampling``
    (``num_inference_steps``, ``guidance_scale``) and ``diffusers_pipelines`` (its diffusers pipeline class names →
    extra pipeline settings).
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # for messages, e.g. "PixArt"
    config_class: ClassVar[type] = object
    module_class: ClassVar[type] = object
    presets: ClassVar[Mapping[str, Any]] = {}
    conversion: ClassVar[str | None] = None
    task: ClassVar[str] = ""
    scheduler_config: ClassVar[Mapping[str, Any] | None] = None
    sampling: ClassVar[Mapping[str, Any]] = {}
    diffusers_pipelines: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    # ---- conditioning --------------------------------------------------------------------------------------------

    def condition(self, config: Any, batch: Mapping[str, Any]) -> Condition:
        """The model inputs of a training batch besides ``x`` (a missing key is a ``KeyError`` naming it)."""
        raise NotImplementedError(f"the {self.name!r} family is not a trainable diffusion model")

    def apply(self, module: Any, params: Any, x: jax.Array, t: jax.Array, condition: Condition) -> jax.Array:
        """The model's output for ``x`` at times ``t`` under ``condition``."""
        raise NotImplementedError(f"the {self.name!r} family is not a diffusion model")

    def drop_condition(self, config: Any, condition: Condition, drop: jax.Array) -> Condition:
        """``condition`` with the rows where ``drop`` (B,) is true replaced by the null condition (training)."""
        raise NotImplementedError

    def guidance_conditions(self, config: Any, condition: Condition) -> tuple[Condition, Condition]:
        """``(cond, null)`` of classifier-free guidance for ``condition`` (training grids, evaluation): two
        conditions of the same structure, the second unconditional."""
        raise NotImplementedError

    def dropout_prob(self, config: Any) -> float:
        """The family's default probability of dropping the condition in training (for guidance)."""
        return 0.0

    def label_condition(self, config: Any, labels: Any) -> Condition:
        """Class-to-image families: the condition of integer ``labels`` (B,)."""
        raise ValueError(f"a {self.name!r} model is not class-conditional")

    def num_classes(self, config: Any) -> int:
        """Class-to-image families: how many classes (ids 0 … n − 1)."""
        raise ValueError(f"a {self.name!r} model is not class-conditional")

    def condition_specs(self, config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of the condition of a training batch of ``batch_size`` at the training size (for planning)."""
        raise NotImplementedError

    def grid_condition(
        self, config: Any, sample: Mapping[str, Any], batch: Mapping[str, Any]
    ) -> tuple[Condition, int, int]:
        """``(condition, n, rows)`` of the sample grids written during training: ``n`` images in ``rows`` rows, their
        condition from ``config.sample`` (``sample``) or the first ``n`` rows of the first training ``batch``."""
        raise NotImplementedError

    # ---- sizes and text ------------------------------------------------------------------------------------------

    def grid_multiple(self, config: Any) -> int:
        """Token grids (h, w) must be multiples of this (e.g. PixArt's KV compression ratio); 1 for any grid."""
        return 1

    def grid_constraint(self, config: Any) -> str:
        """What imposes ``grid_multiple`` (for error messages)."""
        return ""

    def size_condition(self, config: Any, height: int, width: int, batch: int) -> Condition:
        """Inputs that encode the sampled image size (micro-conditions), if the model has any."""
        return {}

    def size_condition_options(self, config: Any) -> tuple[str, ...]:
        """The request options (e.g. ``original_size``) that ``size_condition`` also takes as keywords, beside the
        sampled size; none by default."""
        return ()

    def aspect_ratio_bins(self, config: Any) -> tuple[tuple[int, int], ...] | None:
        """Text-to-image families: the (height, width) pixel sizes of resolution binning, if any."""
        return None

    def binned_size(self, config: Any, height: int, width: int) -> tuple[int, int] | None:
        """Text-to-image families whose reference pipeline bins sizes by a rule of its own: the (height, width) in
        pixels at which a request of ``height × width`` is sampled and returned (no resize back to the request).
        None (default): binning, if any, takes the closest of ``aspect_ratio_bins`` and resizes the image back."""
        return None

    def text_width(self, config: Any) -> int:
        """Text-to-image families: the width of the text features the model takes."""
        raise ValueError(f"a {self.name!r} model takes no text")

    def max_sequence_length(self, config: Any) -> int:
        """Text-to-image families: the default number of text tokens."""
        raise ValueError(f"a {self.name!r} model takes no text")

    def text_slots(self, config: Any) -> tuple[TextSlot, ...]:
        """Text-to-image families: the text encoders the model reads prompts with (default: one T5 with masks)."""
        return (TextSlot("t5"),)

    def text_condition(
        self, config: Any, features: Mapping[str, Mapping[str, Any]], max_sequence_length: int | None = None
    ) -> Condition:
        """Text-to-image families: the condition of encoded prompts. ``features[slot.name]`` holds the slot's
        ``dit_jax.pipelines.TextEncoder.features`` (``hidden``, ``mask``; CLIP also ``penultimate``, ``pooled``,
        ``text_embeds``), one row per prompt, for the slots that have an encoder; ``max_sequence_length`` is the
        request's text length (for features a missing encoder leaves as zeros)."""
        raise ValueError(f"a {self.name!r} model takes no text")

    def scheduler_config_for(self, config: Any) -> Mapping[str, Any] | None:
        """The diffusers scheduler config of the family's reference pipeline for this model (default:
        ``scheduler_config``; e.g. Flux-schnell differs from Flux-dev)."""
        return self.scheduler_config

    def sampling_for(self, config: Any) -> Mapping[str, Any]:
        """``num_inference_steps`` and ``guidance_scale`` of the reference pipeline for this model (default:
        ``sampling``)."""
        return self.sampling

    def embedded_guidance(self, config: Any) -> bool:
        """Whether the model takes the guidance scale as an input (guidance-distilled, e.g. Flux-dev) instead of
        classifier-free guidance; the condition then carries ``"guidance"`` (B,)."""
        return False

    def true_cfg(self, config: Any) -> bool:
        """Whether ``guidance_scale`` is never classifier-free guidance for this model (it is the embedded guidance
        of guidance-distilled models, ignored by their undistilled siblings) and CFG runs only with
        ``true_cfg_scale > 1`` and a negative prompt, as diffusers' ``FluxPipeline``."""
        return False

    def sampler_options(self, config: Any, num_steps: int, image_seq_len: int) -> dict[str, Any]:
        """Options of ``dit_jax.diffusion.sample`` the family's reference pipeline sets for a request (e.g. Flux's
        explicit sigmas and resolution-dependent shift); ``image_seq_len`` is the number of image tokens."""
        return {}

    def learned_null_length(self, config: Any) -> int | None:
        """Text-to-image families: the token count of a learned null caption, or None if it has none."""
        return None

    # ---- checkpoints and cost ------------------------------------------------------------------------------------

    def adapt_params(self, source: Any, params: Any, target: Any) -> tuple[Any, Any]:
        """Turn ``(source config, looped params)`` into params for ``target`` when fine-tuning from another
        checkpoint of the family (e.g. PixArt's KV compression is enabled here). Returns ``(config, params)``."""
        return source, params

    def lora_targets(self, config: Any) -> tuple[str, ...]:
        """Regexes (``re.search``) over parameter paths of the Dense kernels ``dit_jax.lora`` adapts by default: the
        attention projections (fused q|k|v, q, k|v and output) of self-, cross- and joint attention."""
        return (r"(^|/)[a-z_]*attn\d*/(qkv|q|kv|proj)/kernel$",)

    def forward_flops(self, config: Any, height: int, width: int, text_length: int | None = None) -> int:
        """Analytic FLOPs of one forward pass for one sample of latent size ``height × width``."""
        raise NotImplementedError

    def batch_flops(self, config: Any, shapes: Mapping[str, Sequence[int]]) -> int:
        """Analytic FLOPs of one forward pass over a training batch whose arrays have these ``shapes`` (key → shape,
        batch axis first). Default: images ``x`` (B, H, W, C), the text length from ``caption`` (B, L, C) if any."""
        x = shapes["x"]
        caption = shapes.get("caption")
        return int(x[0]) * self.forward_flops(config, x[1], x[2], None if caption is None else caption[1])

    # ---- sizes of the model input --------------------------------------------------------------------------------

    def example_shape(self, config: Any) -> tuple[int, ...]:
        """One training example's model input at the config's training size, without the batch axis (planning,
        sample grids): ``(H, W, C)`` by default; video families add the frame axis, ``(F, H, W, C)``."""
        s = config.input_size
        return (s, s, config.in_channels)

    def num_tokens(self, config: Any, shape: Sequence[int]) -> int:
        """Tokens the model makes of one example of shape ``shape`` (no batch axis), e.g. the ``image_seq_len`` of a
        resolution-dependent flow shift. Default: ``(H / p) · (W / p)`` of an image ``(H, W, C)``."""
        p = config.patch_size
        return (shape[0] // p) * (shape[1] // p)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to ``family_of``, ``build``, the presets and ``config_from_dict``."""
    if not family.name:
        raise ValueError(f"{type(family).__name__} has no name")
    for other in _FAMILIES.values():
        clash = set(other.presets) & set(family.presets)
        if other.name != family.name and clash:
            raise ValueError(f"presets {sorted(clash)} of family {family.name!r} are already {other.name!r}'s")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """The registered families by name."""
    return dict(_FAMILIES)


def family_named(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family of a model config (its ``family`` class attribute)."""
    name = getattr(config, "family", None)
    family = _FAMILIES.get(name) if isinstance(name, str) else None
    if family is None or not isinstance(config, family.config_class):
        raise TypeError(f"expected a model config of a registered family {sorted(_FAMILIES)}, got {type(config)}")
    return family
