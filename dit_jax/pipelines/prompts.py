"""``PromptEncoder``: prompts → a text-conditioned (text-to-image or text-to-video) model's text condition, through the
text encoders of its family's text slots (``Family.text_slots``) joined by ``Family.text_condition``.

The pipelines encode prompts with it, and ``python -m dit_jax.data.precompute`` stores its output beside the latents,
so training and sampling see the same condition (e.g. SD3: 77 CLIP-L ⊕ CLIP-G tokens then the T5 tokens, and the
pooled CLIP vector; Flux: T5 tokens and the CLIP pooled vector; PixArt: T5 tokens and their mask).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.models import family_of
from dit_jax.pipelines.text_encoder import TextEncoder

PROMPT_NAMES = {1: "prompt", 2: "prompt_2", 3: "prompt_3"}


def takes_text(family: Any) -> bool:
    """Whether a family's models are conditioned on text, i.e. have text slots (its task is ``text-to-…``)."""
    return str(family.task).startswith("text-to-")


def as_prompt_list(prompt: Any, name: str) -> list[str]:
    """A prompt argument (one string or a non-empty list of strings) as a list."""
    items = [prompt] if isinstance(prompt, str) else list(prompt)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return items


def text_sources(
    family: Any,
    config: Any,
    folders: Mapping[str, tuple[Any, Any]] | None,
    text_encoder: Any,
    text_encoders: Mapping[str, Any] | None,
    source: str,
) -> dict[str, tuple[Any, Any]]:
    """``{slot name: (encoder source, tokenizer folder or None)}``: a pipeline folder's own components (``folders``),
    replaced by ``text_encoder`` (one-slot families: a text-encoder folder or pipeline folder; others: a pipeline
    folder holding the slots' components) and then by ``text_encoders`` (per slot)."""
    slots = tuple(family.text_slots(config))
    names = [s.name for s in slots]
    sources: dict[str, tuple[Any, Any]] = dict(folders or {})
    if text_encoder is not None:
        if len(slots) == 1:
            sources = {slots[0].name: (text_encoder, None)}
        else:
            folder = Path(text_encoder) if not isinstance(text_encoder, TextEncoder) else None
            if folder is None or not folder.is_dir():
                raise ValueError(
                    f"text_encoder={text_encoder!r}: a {family.display_name} model reads prompts with {len(slots)} "
                    f"text encoders {names}; pass a {family.display_name} pipeline folder or text_encoders="
                    "{slot name: folder or TextEncoder}"
                )
            sources = {}
            for slot in slots:
                model_dir, tok_dir = folder / slot.encoder, folder / slot.tokenizer
                if model_dir.is_dir() != tok_dir.is_dir():
                    missing = tok_dir if model_dir.is_dir() else model_dir
                    raise FileNotFoundError(f"text_encoder={str(folder)!r}: {missing} does not exist")
                if model_dir.is_dir():
                    sources[slot.name] = (model_dir, tok_dir)
            if not sources:
                parts = ", ".join(f"{s.encoder}/ + {s.tokenizer}/" for s in slots)
                raise ValueError(f"text_encoder={str(folder)!r} holds none of the text components {parts}")
    for name, value in (text_encoders or {}).items():
        if name not in names:
            raise ValueError(f"text_encoders: {name!r} is not a text slot of a {family.display_name} model: {names}")
        sources[name] = (value, None)
    if not sources:
        if len(slots) == 1:
            hint = (
                f"pass text_encoder= (a T5/UMT5 folder with its tokenizer, e.g. t5-v1_1-xxl, or a "
                f"{family.display_name} pipeline folder with {slots[0].encoder}/ and {slots[0].tokenizer}/)"
            )
        else:
            parts = ", ".join(f"{s.encoder}/ + {s.tokenizer}/" for s in slots)
            hint = (
                f"pass text_encoder= (a {family.display_name} pipeline folder with {parts}) or text_encoders="
                f"{{slot: folder}} for the slots {names}"
            )
        raise ValueError(f"{source} is a {family.task} {family.display_name}: {hint}")
    return sources


class PromptTable(TextEncoder):
    """The text encoder of a model trained on a fixed set of prompts whose text features its data gave directly (no
    tokenizer, no encoder network; e.g. a moving-digits run: "digit 3 moving left" → its one-hot tokens): each
    caption is looked up in ``table`` (``{prompt: features (tokens, width)}``). The empty caption is the null
    prompt, all zeros, as classifier-free guidance dropped the prompts in training. An unknown caption is one error
    naming it and some known ones."""

    def __init__(self, table: Mapping[str, Any], *, name: str = "prompt table"):
        rows = {str(k): np.asarray(v, np.float32) for k, v in table.items() if k != ""}
        shapes = {v.shape for v in rows.values()}
        if not rows or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{name}: expected prompts with features of one (tokens, width) shape, got {shapes}")
        tokens, width = next(iter(shapes))
        self.table, self.name, self.max_length, self.tokenizer = rows, name, int(tokens), None
        self.config = type("PromptTableConfig", (), {"d_model": int(width), "hidden_size": int(width)})()

    @property
    def prompts(self) -> list[str]:
        """The known prompts, in the table's order."""
        return list(self.table)

    def features(
        self, captions: Sequence[str], *, max_length: int | None = None, use_mask: bool = True, clip_skip: Any = None
    ) -> dict[str, np.ndarray]:
        """Captions → ``{"hidden" (b, max_length, width), "mask" (b, max_length)}``: the table's rows, zero-padded
        past its tokens (mask 0 there; the null prompt's mask is 0 everywhere)."""
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string")
        unknown = [c for c in captions if c != "" and c not in self.table]
        if unknown:
            some = ", ".join(repr(p) for p in self.prompts[:3])
            raise ValueError(
                f"prompt {unknown[0]!r} is not one of the {len(self.table)} prompts this model was trained on "
                f"({self.name}; e.g. {some})"
            )
        length = self.max_length if max_length is None else int(max_length)
        if length < self.max_length:
            raise ValueError(f"max_sequence_length={length}: the prompts of {self.name} are {self.max_length} tokens")
        hidden = np.zeros((len(captions), length, self.config.d_model), np.float32)
        mask = np.zeros((len(captions), length), np.int32)
        for i, c in enumerate(captions):
            if c != "":
                hidden[i, : self.max_length], mask[i, : self.max_length] = self.table[c], 1
        return {"hidden": hidden, "mask": mask}

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(captions)
        return f["hidden"], f["mask"]


class PromptEncoder:
    """The text encoders of a text-conditioned model, by text slot, and how their features become its condition.

    ``encoders`` maps slot names (``family.text_slots(model_config)``) to ``TextEncoder``s; a slot without one is left
    to the family (SD3 without T5: zero T5 features). ``max_sequence_length`` is the token count of slots without
    their own length (default: the family's, e.g. PixArt-Σ 300, SD3 256, Flux 512).
    """

    def __init__(
        self,
        model_config: Any,
        encoders: Mapping[str, TextEncoder],
        *,
        max_sequence_length: int | None = None,
        source: str = "",
    ):
        self.model_config = model_config
        self.family = family_of(model_config)
        self.slots = tuple(self.family.text_slots(model_config))
        self.source = source
        names = [s.name for s in self.slots]
        unknown = sorted(set(encoders) - set(names))
        if unknown:
            raise ValueError(
                f"text_encoders {unknown} are not text slots of a {self.family.display_name} model: {names}"
            )
        for name, enc in encoders.items():
            if not isinstance(enc, TextEncoder):
                raise TypeError(f"text_encoders[{name!r}] must be a TextEncoder, got {type(enc).__name__}")
        if len(self.slots) == 1 and self.slots[0].name in encoders:
            enc_config = encoders[self.slots[0].name].config
            got = getattr(enc_config, "d_model", None) or enc_config.hidden_size
            width = self.family.text_width(model_config)
            if got != width:
                raise ValueError(
                    f"the text encoder gives {got}-wide features but the model takes {width}-wide captions ({source})"
                )
        self.encoders = dict(encoders)
        length = self.family.max_sequence_length(model_config) if max_sequence_length is None else max_sequence_length
        self.max_sequence_length = self.check_length(length)

    @staticmethod
    def check_length(length: Any) -> int:
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise ValueError(f"max_sequence_length={length!r} must be a positive integer")
        return int(length)

    @property
    def name(self) -> str:
        """What encodes the prompts (for manifests and messages): the model family and each slot's encoder."""
        parts = ", ".join(f"{n}: {e.name}" for n, e in self.encoders.items())
        return f"{self.family.display_name} text condition ({parts}; {self.max_sequence_length} tokens)"

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Captions → the model's text condition, one row per caption (every slot reads the same caption)."""
        return self.text_condition(list(prompts))

    def text_condition(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompts → the model's text condition, one row per prompt (e.g. SD3 ``{"context", "pooled"}``): each slot
        encodes its prompt (``prompt_2``/``prompt_3`` default to ``prompt``; a single string or one-entry list is
        used for every prompt) and ``family.text_condition`` joins the features."""
        given = {1: as_prompt_list(prompt, "prompt")}
        n = len(given[1])
        for k, p in ((2, prompt_2), (3, prompt_3)):
            items = given[1] if p is None else as_prompt_list(p, PROMPT_NAMES[k])
            if len(items) not in (1, n):
                raise ValueError(f"{PROMPT_NAMES[k]} has {len(items)} entries for {n} prompts")
            given[k] = items * n if len(items) == 1 and n > 1 else items
        if not self.encoders:
            hint = (
                "pass prompt_embeds= and prompt_attention_mask= (or load it with text_encoder=)"
                if len(self.slots) == 1
                else "pass condition= (or load it with text_encoders=)"
            )
            raise ValueError(f"{self.source or 'this pipeline'} has no text encoder: {hint}")
        length = self.max_sequence_length if max_sequence_length is None else self.check_length(max_sequence_length)
        features = {}
        for slot in self.slots:
            encoder = self.encoders.get(slot.name)
            if encoder is not None:
                features[slot.name] = encoder.features(
                    given.get(slot.prompt, given[1]), max_length=slot.max_length or length, use_mask=slot.use_mask
                )
        return self.join(features, length)

    def join(self, features: Mapping[str, Mapping[str, Any]], length: int) -> dict[str, np.ndarray]:
        """``family.text_condition`` of the slots' features, as numpy arrays (a missing feature is one clear error)."""
        try:
            cond = self.family.text_condition(self.model_config, features, max_sequence_length=length)
        except KeyError as e:
            missing = [s for s in self.slots if s.name not in features]
            raise ValueError(
                f"{self.source or 'this pipeline'}: the {self.family.display_name} model needs text features {e} "
                f"that no text encoder gives (slots without an encoder: "
                f"{[f'{s.name} ({s.encoder})' for s in missing]})"
            ) from None
        return {k: np.asarray(v) for k, v in cond.items()}

    @classmethod
    def from_pretrained(
        cls,
        model_config: Any,
        text_encoder: str | os.PathLike | None = None,
        *,
        text_encoders: Mapping[str, Any] | None = None,
        max_sequence_length: int | None = None,
        dtype: str = "bfloat16",
        batch_size: int = 16,
    ) -> PromptEncoder:
        """The prompt encoder of ``model_config`` (a text-conditioned model config) from ``text_encoder`` (a pipeline
        folder with the slots' ``text_encoder*/`` + ``tokenizer*/`` components; for one-slot families also a T5
        folder) and/or ``text_encoders`` (``{slot name: folder or TextEncoder}``, replacing the folder's)."""
        family = family_of(model_config)
        if not takes_text(family):
            raise ValueError(f"a {type(model_config).__name__} takes no text: no prompt encoder")
        length = family.max_sequence_length(model_config) if max_sequence_length is None else max_sequence_length
        length = cls.check_length(length)
        source = str(text_encoder) if text_encoder is not None else "text_encoders"
        sources = text_sources(family, model_config, None, text_encoder, text_encoders, source)
        lengths = {s.name: s.max_length or length for s in family.text_slots(model_config)}
        encoders = {}
        for name, (src, tok) in sources.items():
            if isinstance(src, TextEncoder):
                encoders[name] = src
            else:
                encoders[name] = TextEncoder.from_pretrained(
                    Path(src), max_length=lengths[name], dtype=dtype, batch_size=batch_size, tokenizer=tok
                )
        return cls(model_config, encoders, max_sequence_length=length, source=source)
