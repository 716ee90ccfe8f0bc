"""``TextEncoder``: prompts → text features (T5/mT5/UMT5, CLIP or BERT), with the tokenizer, the weights sharded over
the local devices, and loading from transformers folders, diffusers pipeline folders or model directories.

The architectures are ``dit_jax.encoders.t5``, ``dit_jax.encoders.clip`` and ``dit_jax.encoders.bert``; conversion of
transformers weights is ``dit_jax.convert.t5`` / ``dit_jax.convert.clip`` / ``dit_jax.convert.bert``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dit_jax.models import build
from dit_jax.nn.layers import compute_dtype
from dit_jax.pipelines.offload import HostParams
from dit_jax.quantize import quantize_params, quantized_shardings

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "vocab.txt")


TEXT_FAMILIES = ("t5", "clip", "bert")


def _model_type(folder: Path) -> str:
    """The ``model_type`` of a transformers folder's config.json, lower case ("" when there is none)."""
    from dit_jax.files import read_json

    config = folder / "config.json"
    return str(read_json(config).get("model_type", "")).lower() if config.is_file() else ""


def _is_clip_folder(folder: Path) -> bool:
    """A transformers CLIP text folder (its config.json says so), rather than a T5 one."""
    return "clip" in _model_type(folder)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in _TOKENIZER_FILES)


def _locate(path: Path, tokenizer: str | os.PathLike | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a T5 folder, a pipeline folder (text_encoder/ + tokenizer/), or a
    dit_jax model directory with the tokenizer beside it (``tokenizer/``) or given."""
    if not path.exists():
        raise FileNotFoundError(f"text encoder {path} does not exist")
    model = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.exists():
            raise FileNotFoundError(f"tokenizer {tok} does not exist")
        return model, tok
    for candidate in (path / "tokenizer", model, model.parent / "tokenizer", path):
        if candidate.is_dir() and _has_tokenizer(candidate):
            return model, candidate
    raise FileNotFoundError(
        f"{path}: no tokenizer found: expected one of {list(_TOKENIZER_FILES)} in {path}, {path / 'tokenizer'} "
        f"or {model}; pass tokenizer=PATH"
    )


def _local_mesh():
    from jax.sharding import AxisType

    devices = np.array(jax.local_devices()).reshape(1, -1, 1)
    return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _param_shardings(config: Any, params: Any, mesh, rules) -> Any:
    """Per-parameter ``NamedSharding`` from the logical names; an axis whose size the mesh does not divide stays
    replicated (e.g. a vocabulary of 32100)."""
    from jax.sharding import NamedSharding, PartitionSpec

    abstract = jax.eval_shape(lambda k: build(config).init(k, *config.dummy_inputs(1))["params"], jax.random.key(0))
    specs = nn.get_partition_spec(abstract)
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), specs,
                              is_leaf=lambda s: isinstance(s, PartitionSpec))  # fmt: skip

    def fit(spec: PartitionSpec, x: Any) -> NamedSharding:
        axes = []
        for dim, ax in zip(np.shape(x), tuple(spec) + (None,) * (np.ndim(x) - len(spec))):
            names = (ax,) if isinstance(ax, str) else tuple(ax or ())
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            axes.append(ax if dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree.map(fit, mesh_specs, params, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _width(config: Any) -> int:
    return getattr(config, "d_model", None) or config.hidden_size


class TextEncoder:
    """Captions → text features of a T5 (mT5, UMT5), CLIP or BERT encoder, tokenized with the folder's tokenizer.

    ``__call__(captions)`` gives ``(embeddings float32 (b, max_length, width), mask int32 (b, max_length))``, PixArt's
    T5 features: captions truncated and padded to ``max_length`` (120 for PixArt-α, 300 for Σ) with the tokenizer's
    special tokens (T5: ``</s>`` at the end) and its attention mask; padded positions keep the encoder's output (the
    ``text_encoder`` hook of ``dit_jax.data.precompute``). ``features(captions)`` gives every output by name
    (``hidden``, ``mask``; CLIP also ``penultimate``, ``pooled``, ``text_embeds``), with or without the padding mask
    (SD3 and Flux encode without one). ``clip_skip`` (CLIP; default None: the encoder's ``clip_skip``, see
    ``with_clip_skip``) makes ``penultimate`` transformers' ``hidden_states[-(clip_skip + 2)]``, as diffusers'
    ``clip_skip``. The encoder is jitted once per ``(batch_size, length, clip_skip)`` (calls are cut into and padded
    to that batch), with the batch and the weights sharded over the local devices. ``quantize`` (``"int8"``,
    ``"int4"`` or a ``dit_jax.quantize.QuantizeConfig``) stores the matmul kernels as int8 or packed int4,
    dequantised per matmul. ``offload=True`` keeps the weights in host memory (``params`` is a NumPy tree) and places
    them on the devices only while the encoder runs (``dit_jax.pipelines.offload``; ``hold`` keeps them placed
    across several calls).
    """

    clip_skip: int | None = None  # the default of features(clip_skip=None) (CLIP only)
    _host: HostParams | None = None  # the weights in host memory (offload), else None

    def __init__(
        self,
        config: Any,
        params: Any,
        tokenizer: Any,
        *,
        max_length: int = 300,
        batch_size: int = 16,
        param_dtype: str | None = None,
        name: str = "",
        quantize: Any = None,
        offload: bool = False,
    ):
        from dit_jax.parallel.rules import DEFAULT_RULES

        if max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {max_length!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.config, self.tokenizer, self.max_length, self.name = config, tokenizer, max_length, name
        self.mesh = _local_mesh()
        n = self.mesh.size
        self.batch_size = math.ceil(batch_size / n) * n
        store = compute_dtype(param_dtype or config.dtype)
        if quantize is not None:  # int8/int4 kernels from the float ones, on the host (dit_jax.quantize)
            params = quantize_params(params, quantize)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: np.asarray(x).astype(store, copy=False) if path[-1].key == "kernel" else np.asarray(x),
            params,
        )  # matmul kernels are cast to the compute dtype before use anyway: storing them so changes nothing
        self.rules = DEFAULT_RULES
        shardings = _param_shardings(config, params, self.mesh, self.rules)
        if quantize is not None:
            shardings = quantized_shardings(params, shardings)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        if offload:
            self._host = HostParams(params, shardings)
        self.params = self._host.params if offload else jax.device_put(params, shardings)
        self._model = model = build(config)
        self._shardings = (shardings, self.batch_sharding, self.batch_sharding)
        self._encode = self._jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
        self._skip_encoders: dict[int, Any] = {}  # clip_skip → jitted CLIP encoder

    def _jit(self, fn):
        return jax.jit(fn, in_shardings=self._shardings, out_shardings=self.batch_sharding)

    def _encoder(self, clip_skip: int | None):
        """The jitted encoder; with ``clip_skip`` (CLIP) its ``penultimate`` is ``hidden_states[-(clip_skip + 2)]``
        (the other hidden states stay inside the compiled function)."""
        if not clip_skip:  # None or 0: hidden_states[-2], the model's own penultimate
            return self._encode
        if clip_skip not in self._skip_encoders:
            model, k = self._model, clip_skip

            def encode(p, ids, mask):
                out = model.apply({"params": p}, ids, mask, output_hidden_states=True)
                return out.replace(penultimate=out.hidden_states[-(k + 2)], hidden_states=None)

            self._skip_encoders[k] = self._jit(encode)
        return self._skip_encoders[clip_skip]

    @property
    def is_clip(self) -> bool:
        """Whether this is a CLIP encoder (``features`` has ``penultimate`` and honours ``clip_skip``)."""
        return getattr(self.config, "family", "") == "clip"

    def check_clip_skip(self, clip_skip: Any) -> int | None:
        """``clip_skip`` checked: None, or an integer 0 ≤ k ≤ num_hidden_layers − 1 (``hidden_states`` holds the
        embeddings and every layer's output: ``hidden_states[-(k + 2)]`` must exist)."""
        if clip_skip is None:
            return None
        if not isinstance(clip_skip, (int, np.integer)) or isinstance(clip_skip, bool) or clip_skip < 0:
            raise ValueError(f"clip_skip={clip_skip!r} must be None or a non-negative integer")
        layers = getattr(self.config, "num_hidden_layers", None)
        if layers is not None and clip_skip > layers - 1:
            raise ValueError(
                f"clip_skip={clip_skip} skips more layers than the {layers}-layer CLIP encoder has "
                f"(hidden_states[-{clip_skip + 2}] of {layers + 1}): use at most {layers - 1}"
            )
        return int(clip_skip)

    def with_clip_skip(self, clip_skip: int | None) -> TextEncoder:
        """This encoder with ``clip_skip`` as the default of ``features`` (a shallow copy: the weights, tokenizer
        and compiled encoders are shared). T5 encoders ignore it."""
        out = copy.copy(self)
        out.clip_skip = self.check_clip_skip(clip_skip) if self.is_clip else None
        return out

    @property
    def offload(self) -> bool:
        """Whether the weights live in host memory and are placed on the devices only while the encoder runs."""
        return self._host is not None

    def offloaded(self) -> TextEncoder:
        """This encoder with its weights copied to host memory (``offload``; a shallow copy: tokenizer and compiled
        encoders shared); itself when it is offloaded already or has no weights."""
        if self._host is not None or getattr(self, "params", None) is None:
            return self
        out = copy.copy(self)
        out._host = HostParams(self.params, self._shardings[0])
        out.params = out._host.params
        return out

    def hold(self) -> contextlib.AbstractContextManager:
        """A block in which an offloaded encoder's weights, once placed, stay on the devices (released at its end)."""
        return self._host.hold() if self._host is not None else contextlib.nullcontext()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        max_length: int = 300,
        dtype: str = "bfloat16",
        batch_size: int = 16,
        param_dtype: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        quantize: Any = None,
        offload: bool = False,
    ) -> TextEncoder:
        """Load a transformers T5 / mT5 / UMT5, CLIP or BERT text folder (by its config.json ``model_type``), a
        diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``) or a dit_jax model directory; the tokenizer
        comes from ``tokenizer`` or the folder (``AutoTokenizer``; BERT's ``vocab.txt`` with its config)."""
        from transformers import AutoTokenizer

        path = Path(path)
        model_dir, tok_dir = _locate(path, tokenizer)
        # checkpoints are converted kernel by kernel into what __init__ keeps: quantised, or in the storage dtype
        as_read = dict(quantize=quantize, kernel_dtype=compute_dtype(param_dtype or dtype))
        if (model_dir / "params").is_dir():
            from dit_jax.checkpoint import load_model

            config, params = load_model(model_dir)
            if config.family not in TEXT_FAMILIES:
                raise ValueError(f"{model_dir} holds a {config.family!r} model, not a text encoder {TEXT_FAMILIES}")
        elif _is_clip_folder(model_dir):
            from dit_jax.convert.clip import clip_from_torch

            config, params = clip_from_torch(model_dir, **as_read)
        elif _model_type(model_dir) == "bert":
            from dit_jax.convert.bert import bert_from_torch

            config, params = bert_from_torch(model_dir, **as_read)
        else:
            from dit_jax.convert.t5 import t5_from_torch

            config, params = t5_from_torch(model_dir, **as_read)
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as e:  # missing sentencepiece, corrupt tokenizer.json, …
            hint = (
                " (a folder with only spiece.model needs `pip install sentencepiece`)"
                if not (tok_dir / "tokenizer.json").exists()
                else ""
            )
            raise ValueError(f"{tok_dir}: cannot load the tokenizer{hint}: {e}") from e
        if len(tok) > config.vocab_size:
            raise ValueError(f"{tok_dir}: the tokenizer has {len(tok)} tokens, the encoder only {config.vocab_size}")
        name = f"{path.absolute()} (max_length={max_length}, dtype={dtype})"
        return cls(config.replace(dtype=dtype), params, tok, max_length=max_length, batch_size=batch_size,
                   param_dtype=param_dtype, name=name, quantize=quantize, offload=offload)  # fmt: skip

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` int32 (b, max_length): truncated, padded to max_length."""
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string")
        out = self.tokenizer(list(captions), max_length=self.max_length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="np")  # fmt: skip
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray, clip_skip: int | None = None) -> Any:
        """Token ids and mask (b, L) → the encoder's output in float32, in fixed-size sharded batches: T5 features
        (b, L, d_model); CLIP a ``CLIPTextOutput`` (with ``clip_skip``: ``penultimate`` is ``hidden_states[-(clip_skip
        + 2)]``; T5 ignores it)."""
        from dit_jax.parallel.rules import logical_rules

        encode = self._encoder(self.check_clip_skip(clip_skip) if self.is_clip else None)
        ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
        outs = []
        placed = self._host.placed() if self._host is not None else contextlib.nullcontext(self.params)
        with placed as params:
            for start in range(0, len(ids), self.batch_size):
                chunk_ids, chunk_mask = ids[start : start + self.batch_size], mask[start : start + self.batch_size]
                pad = self.batch_size - len(chunk_ids)
                if pad:  # padded rows: one token, so no row is fully masked
                    chunk_ids = np.concatenate([chunk_ids, np.zeros((pad, ids.shape[1]), np.int32)])
                    chunk_mask = np.concatenate([chunk_mask, np.ones((pad, ids.shape[1]), np.int32)])
                with jax.set_mesh(self.mesh), nn.logical_axis_rules(logical_rules(self.rules)):
                    out = encode(params, jax.device_put(chunk_ids, self.batch_sharding),
                                 jax.device_put(chunk_mask, self.batch_sharding))  # fmt: skip
                keep = self.batch_size - pad
                outs.append(jax.tree.map(lambda a, keep=keep: np.asarray(a)[:keep], out))
        if not outs:
            length = ids.shape[1] if ids.ndim == 2 else self.max_length
            return np.zeros((0, length, _width(self.config)), np.float32)
        return jax.tree.map(lambda *a: np.concatenate(a), *outs)

    def features(
        self,
        captions: Sequence[str],
        *,
        max_length: int | None = None,
        use_mask: bool = True,
        clip_skip: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Captions → ``{"hidden", "mask"}`` (T5, mT5, UMT5, BERT) or ``{"hidden", "mask", "penultimate", "pooled",
        "text_embeds"}`` (CLIP; ``text_embeds`` with a projection), tokenized to ``max_length`` (default: the
        encoder's).
        ``use_mask=False`` encodes without the padding mask (the pad tokens attend and are attended to), as SD3
        and Flux do; ``mask`` is the tokenizer's either way. ``clip_skip`` (CLIP; default: the encoder's
        ``clip_skip``): ``penultimate`` is transformers' ``hidden_states[-(clip_skip + 2)]`` instead of
        ``hidden_states[-2]``, as diffusers' ``clip_skip``; ``hidden``, ``pooled`` and ``text_embeds`` are the final
        layer's either way. T5 encoders ignore it (diffusers applies it to the CLIP encoders only)."""
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string")
        length = self.max_length if max_length is None else int(max_length)
        out = self.tokenizer(list(captions), max_length=length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="np")  # fmt: skip
        ids, mask = out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)
        skip = self.clip_skip if clip_skip is None else clip_skip
        enc = self.encode_ids(ids, mask if use_mask else np.ones_like(mask), clip_skip=skip)
        if isinstance(enc, np.ndarray):
            return {"hidden": enc, "mask": mask}
        feats = {"hidden": enc.last_hidden_state, "mask": mask, "penultimate": enc.penultimate}
        feats["pooled"] = enc.pooler_output
        if enc.text_embeds is not None:
            feats["text_embeds"] = enc.text_embeds
        return feats

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions → ``(embeddings float32 (b, max_length, d_model), mask int32 (b, max_length))``."""
        if not len(captions):
            return np.zeros((0, self.max_length, _width(self.config)), np.float32), np.zeros(
                (0, self.max_length), np.int32
            )
        ids, mask = self.tokenize(captions)
        enc = self.encode_ids(ids, mask)
        return (enc if isinstance(enc, np.ndarray) else enc.last_hidden_state), mask
