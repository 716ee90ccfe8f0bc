"""``load(path)``: a class-conditional (e.g. DiT), text-to-image (e.g. PixArt, SD3, Flux) or text-to-video (e.g. Wan
2.1) pipeline from a diffusers pipeline folder, a model directory, a PyTorch checkpoint or a training workdir, with its
VAE, text encoders and default sampler.

The pipeline kind, the default scheduler and settings, and the diffusers pipeline classes come from the model's
family (``dit_jax.models.family``). Defaults per source (what the matching PyTorch tool does), e.g.:
  diffusers pipeline folder  ``model_index.json`` + ``transformer/``, ``vae/``, ``scheduler/``: the scheduler config
                             picks the sampler (``DDIMScheduler`` → ddim, …); 50 steps and guidance 4.0
                             (``DiTPipeline.__call__``'s defaults). ``PixArtSigmaPipeline``/``PixArtAlphaPipeline``
                             folders add ``text_encoder/`` + ``tokenizer/`` (T5): 20 steps, guidance 4.5, 300 (Σ) or
                             120 (α) caption tokens. Other text-to-image folders hold one encoder + tokenizer per
                             text slot of the family (``StableDiffusion3Pipeline``: CLIP-L, CLIP-G, T5 in
                             ``text_encoder{,_2,_3}``/``tokenizer{,_2,_3}``, T5 optional; ``FluxPipeline``: CLIP, T5)
                             with the family's defaults (SD3: 28 steps, CFG 7, 256 T5 tokens; Flux: 28 steps,
                             embedded guidance 3.5, 512 T5 tokens). ``WanPipeline`` folders (text-to-video) hold
                             ``text_encoder/`` (UMT5) + ``tokenizer/`` and a causal video VAE
                             (``AutoencoderKLWan``): UniPC on flow sigmas (shift 3), 50 steps, CFG 5, 512 tokens
  model directory / torch    ``vae=`` is required for a latent model, except for a Stability single file that holds
                             the VAE (``first_stage_model.*``: SD3/SD3.5 files); the sampler is the DDIM scheduler
                             that the diffusers DiT converter writes (linear betas, ε, no clipping): 50 steps,
                             guidance 4.0.
                             A PixArt also needs ``text_encoder=`` (a T5 folder or a pipeline folder) and gets the
                             diffusers PixArt converters' DPM-Solver++ (linear betas): 20 steps, guidance 4.5.
                             Other families get their reference pipeline's scheduler and settings (e.g. Wan:
                             ``vae=`` an ``AutoencoderKLWan`` folder or file, ``text_encoder=`` a UMT5 folder)
  training workdir           the latest checkpoint's EMA params (a LoRA run: its EMA adapters merged into the base
                             it recorded, ``dit_jax.convert.lora.merged_run``); schedule, sampler, steps and guidance
                             from the run's config (``config.diffusion``, ``config.sample``); pixel space unless the
                             run trained on latents (then ``config.sample.vae`` or ``vae=``)
``scheduler=`` (a diffusers scheduler config: dict, ``scheduler_config.json``, or a folder holding one) replaces
the default sampler of any source.
"""

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import logging

from dit_jax import diffusion
from dit_jax.checkpoint import is_model_dir as _is_model_dir
from dit_jax.checkpoint import load_model
from dit_jax.encoders.vae import PRESETS as VAE_PRESETS
from dit_jax.files import read_json as _read_json
from dit_jax.models import ModelConfig, check_params, families, family_of, set_scan
from dit_jax.nn.layers import canonical_dtype
from dit_jax.pipelines.class_conditional import ClassConditionalPipeline
from dit_jax.pipelines.prompts import PromptTable, takes_text, text_sources
from dit_jax.pipelines.text_encoder import TEXT_FAMILIES, TextEncoder
from dit_jax.pipelines.text_to_image import TextToImagePipeline
from dit_jax.pipelines.text_to_video import TextToVideoPipeline
from dit_jax.quantize import quantize_config, quantize_params, text_encoder_config

PIPELINES = {
    "class-to-image": ClassConditionalPipeline,
    "text-to-image": TextToImagePipeline,
    "text-to-video": TextToVideoPipeline,
}


def _is_workdir(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoints").is_dir()


def _is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


# ---- model -----------------------------------------------------------------------------------------------------


def _override(config: ModelConfig, params: Any, overrides: dict[str, Any], source: str) -> tuple[ModelConfig, Any]:
    """Apply config-field overrides (``scan_blocks`` switches the parameter layout)."""
    if not overrides:
        return config, params
    overrides = dict(overrides)
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} override(s) {unknown}; known fields: {sorted(known)}")
    scan = overrides.pop("scan_blocks", None)
    config = config.replace(**overrides)
    check_params(config, params, f"{source}: the model overrides do not fit the params")
    if scan is not None:
        config, params = set_scan(config, params, bool(scan))
    return config, params


def _from_torch(path: Path, overrides: dict[str, Any], quantize: Any = None) -> tuple[ModelConfig, Any]:
    from dit_jax.convert import from_torch

    return from_torch(path, quantize=quantize, **overrides)


# ---- VAE -------------------------------------------------------------------------------------------------------


def _bundled_vae(path: Path) -> Path | None:
    """``path`` itself when it is a single-file checkpoint that also holds the VAE (Stability's
    ``first_stage_model.*``), so that it needs no ``vae=``; else None."""
    from dit_jax.convert import io
    from dit_jax.convert.vae import detect as detect_vae

    if path.is_file() and path.suffix == ".safetensors":
        keys = io.safetensors_keys(path)
        if any(k.startswith("first_stage_model.") for k in keys) and detect_vae(keys) is not None:
            return path
    return None


def _is_vae(config: Any) -> bool:
    """A config of a registered component family (no diffusion task) that is not a text encoder: an
    ``AutoencoderKL`` or another VAE such as a causal video VAE."""
    try:
        family = family_of(config)
    except TypeError:
        return False
    return not family.task and family.name not in TEXT_FAMILIES


def _other_vae(path: Path) -> bool:
    """Whether ``path`` holds a VAE other than an ``AutoencoderKL`` (e.g. a causal video VAE), which the registered
    families' conversions import: a diffusers folder (or a pipeline folder's ``vae/``) whose config.json names another
    class, or a weights file whose keys another conversion module claims."""
    from dit_jax.convert import io
    from dit_jax.convert import vae as autoencoder_kl
    from dit_jax.convert.api import conversion_modules

    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            return False
        name = _read_json(folder / "config.json").get("_class_name", autoencoder_kl.DIFFUSERS_CLASS)
        return name != autoencoder_kl.DIFFUSERS_CLASS
    keys = io.safetensors_keys(path) if path.suffix == ".safetensors" else list(io.read_file(path))
    if autoencoder_kl.detect(keys) is not None:
        return False
    components = [n for n, f in families().items() if not f.task and n not in TEXT_FAMILIES]
    modules = conversion_modules()
    return any(modules[n].detect(keys) for n in components if n in modules)


def load_vae(vae: Any) -> tuple[Any, Any]:
    """``(config, params)`` of a VAE given as a diffusers folder (or a pipeline folder with ``vae/``), a VAE model
    directory, a ``.safetensors``/``.pt``/``.ckpt``/``.pth`` file, or an already loaded ``(config, params)`` pair.

    An ``AutoencoderKL`` is read by ``dit_jax.convert.vae``; another VAE (e.g. diffusers ``AutoencoderKLWan`` or the
    original ``Wan2.1_VAE.pth``) by the conversion of the registered family that recognises it (``from_torch``)."""
    if isinstance(vae, tuple) and len(vae) == 2 and _is_vae(vae[0]):
        return vae
    path = Path(vae)
    if not path.exists():
        if str(vae) in VAE_PRESETS:
            raise ValueError(
                f"vae={vae!r} is a VAE preset: it names an architecture, not weights. Download the weights (e.g. the "
                f"diffusers folder of stabilityai/{vae}) and pass its path"
            )
        raise FileNotFoundError(
            f"vae={str(vae)!r} does not exist: expected a diffusers AutoencoderKL folder, a VAE model directory or a "
            "VAE checkpoint file"
        )
    if _is_model_dir(path):
        config, params = load_model(path)
        if not _is_vae(config):
            raise ValueError(f"vae={str(vae)!r} is a model directory of a {type(config).__name__}, not a VAE")
        return config, params
    if _other_vae(path):
        from dit_jax.convert import from_torch

        folder = path / "vae" if path.is_dir() and not (path / "config.json").is_file() else path
        config, params = from_torch(folder)
        if not _is_vae(config):
            raise ValueError(f"vae={str(vae)!r} holds a {type(config).__name__}, not a VAE")
        return config, params
    from dit_jax.convert.vae import vae_from_torch

    return vae_from_torch(path)


# ---- scheduler -------------------------------------------------------------------------------------------------


def read_scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A diffusers scheduler config from a dict, a ``scheduler_config.json`` or a folder holding one (directly or
    in ``scheduler/``)."""
    if isinstance(scheduler, dict):
        return dict(scheduler)
    path = Path(scheduler)
    if path.is_dir():
        for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return _read_json(candidate)
        raise FileNotFoundError(
            f"scheduler={str(path)!r}: no scheduler_config.json (nor scheduler/scheduler_config.json)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"scheduler={str(path)!r} does not exist")
    return _read_json(path)


def _scheduler(config: dict[str, Any], source: str) -> tuple[Any, str, dict[str, Any]]:
    try:
        return diffusion.from_diffusers_scheduler_config(config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


# ---- sources ---------------------------------------------------------------------------------------------------


def _pipeline_family(index: dict[str, Any]):
    """``(family, its settings for this diffusers pipeline class)`` of a ``model_index.json``, or ``(None, {})``."""
    name = index.get("_class_name")
    for family in families().values():
        if name in family.diffusers_pipelines:
            return family, dict(family.diffusers_pipelines[name])
    return None, {}


def _absent(index: dict[str, Any], part: str) -> bool:
    """A component the pipeline was saved without (``"text_encoder_3": [null, null]``, e.g. SD3 without T5)."""
    entry = index.get(part, ())
    return isinstance(entry, (list, tuple)) and len(entry) > 0 and all(e is None for e in entry)


def _pipeline_folder(path: Path, overrides: dict[str, Any], quantize: Any = None) -> dict[str, Any]:
    index = _read_json(path / "model_index.json")
    name = index.get("_class_name")
    family, settings = _pipeline_family(index)
    text = family is not None and takes_text(family)
    config, params = None, None
    slots: tuple = ()
    if text:
        config, params = (
            _from_torch(path / "transformer", overrides, quantize) if (path / "transformer").is_dir() else (None, None)
        )
        slots = tuple(family.text_slots(config)) if config is not None else ()
    # the text components the folder holds (a slot saved as null is left out: the family decides without it)
    present = [s for s in slots if not (_absent(index, s.encoder) and _absent(index, s.tokenizer))]
    text_parts = tuple(p for s in present for p in (s.encoder, s.tokenizer))
    parts = ("transformer", "vae", *text_parts, "scheduler") if text else ("transformer", "vae", "scheduler")
    for part in parts:
        if part not in index or not (path / part).is_dir():
            known = {n: f.task for f in families().values() for n in f.diffusers_pipelines}
            kinds = (
                f"{name} folders hold {', '.join(parts)}"
                if text
                else "class-conditional pipelines are "
                + " or ".join(n for n, t in known.items() if t == "class-to-image")
                + " folders (transformer, vae, scheduler); text-to-image ones are "
                + " or ".join(n for n, t in known.items() if t == "text-to-image")
                + " folders; text-to-video ones are "
                + " or ".join(n for n, t in known.items() if t == "text-to-video")
                + " folders"
            )
            raise ValueError(f"{path}: model_index.json ({name}) needs a {part!r} component in {path / part}; {kinds}")
    if config is None:
        config, params = _from_torch(path / "transformer", overrides, quantize)
    scheduler_config = read_scheduler_config(path / "scheduler")
    spec = dict(config=config, params=params, vae=path / "vae", scheduler_config=scheduler_config)
    spec.update(family_of(config).sampling)  # the diffusers pipeline class's call defaults, whatever the model
    if text:
        spec.update(settings, text_folders={s.name: (path / s.encoder, path / s.tokenizer) for s in present})
    return spec


def _workdir(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from dit_jax.runs import host_params, is_lora_run, load_ema_params, prompt_table, run_config

    step, model_config, run = run_config(str(path))
    weights = "EMA"
    if is_lora_run(str(path), step):  # the checkpoint holds adapters: merge them into the base the run recorded
        from dit_jax.convert.lora import describe_merge, merged_run

        weights = f"EMA {describe_merge(str(path), step)}"
        try:
            model_config, params = merged_run(str(path), step)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path} (checkpoint {step}) is a LoRA run whose base cannot be read: {e}") from e
        logging.info("%s (checkpoint %d): %s", path, step, weights)
    else:
        _, params = load_ema_params(str(path), step)
        params = host_params(params)
    config, params = _override(model_config, params, overrides, f"{path} (step {step})")
    objective = run.get("objective", "flow")
    sample = run.get("sample", {}) or {}
    schedule = diffusion.make_schedule(objective, run.get("diffusion", {}) or {}, learned_sigma=config.learn_sigma)
    latent = (run.get("data", {}) or {}).get("name") == "latents"
    table = prompt_table(str(path))  # prompts whose text features the run's data gave (no text encoder)
    return dict(
        config=config,
        params=params,
        vae=(sample.get("vae") or None) if latent else None,
        needs_vae=latent,
        schedule=(schedule, diffusion.default_method(objective, sample.get("method") or None), {}),
        num_inference_steps=int(sample.get("num_steps", 50)),
        guidance_scale=float(sample.get("guidance_scale", 1.0)),
        source_name=f"{path} (checkpoint {step}, {weights})",
        prompt_table=table,
        max_sequence_length=None if table is None else next(iter(table.values())).shape[0],
    )


def load_text_encoder(
    text_encoder: Any,
    *,
    max_length: int = 300,
    dtype: str = "float32",
    tokenizer: Any = None,
    quantize: Any = None,
    offload: bool = False,
) -> TextEncoder:
    """A ``TextEncoder`` from a T5 or CLIP folder (transformers, with its tokenizer or ``tokenizer=``), a diffusers
    pipeline folder (``text_encoder/`` + ``tokenizer/``), a text-encoder model directory, or an already built
    ``TextEncoder`` (used as it is; with ``offload`` its host copy). ``quantize``: ``"int8"``, ``"int4"`` or a
    ``QuantizeConfig`` (``dit_jax.quantize``). ``offload``: weights in host memory (``TextEncoder.offloaded``)."""
    if isinstance(text_encoder, TextEncoder):
        return text_encoder.offloaded() if offload else text_encoder
    return TextEncoder.from_pretrained(
        text_encoder, max_length=max_length, dtype=dtype, tokenizer=tokenizer, quantize=quantize, offload=offload
    )


def load(
    path: str | os.PathLike,
    *,
    vae: Any = None,
    scheduler: Any = None,
    dtype: str = "float32",
    text_encoder: Any = None,
    text_encoders: Mapping[str, Any] | None = None,
    text_dtype: str | None = None,
    max_sequence_length: int | None = None,
    sequence_parallel: int = 1,
    sequence_mode: str = "auto",
    quantize: Any = None,
    offload: bool = False,
    **model_overrides: Any,
) -> ClassConditionalPipeline | TextToImagePipeline | TextToVideoPipeline:
    """A ``ClassConditionalPipeline`` (e.g. DiT), ``TextToImagePipeline`` (e.g. PixArt) or ``TextToVideoPipeline``
    (e.g. Wan 2.1) from ``path``: a diffusers pipeline folder (``model_index.json`` of a class the families know, e.g.
    DiTPipeline, PixArtSigmaPipeline, PixArtAlphaPipeline, WanPipeline), a model directory written
    by ``dit_jax.convert``/``save_model``, a PyTorch checkpoint (``.pt``/``.pth``, ``.safetensors``, a diffusers
    transformer folder; read with ``dit_jax.convert.from_torch``) or a training workdir (latest EMA).

    ``vae``: a diffusers VAE folder (``AutoencoderKL``; ``AutoencoderKLWan`` for Wan), a VAE model directory, a VAE
    checkpoint or ``(config, params)``; required for latent models from a model directory or checkpoint, optional
    elsewhere (it replaces the pipeline's own).
    ``scheduler``: a diffusers scheduler config (dict, JSON file or folder) replacing the default sampler.
    ``dtype``: ``"float32"`` or ``"bfloat16"`` compute for the transformer and the VAE (params stay float32).
    ``text_encoder`` (text-to-image, text-to-video): for one-encoder families (PixArt; Wan: UMT5) a T5 folder, a
    pipeline folder or a ``TextEncoder``; for families with several text encoders (SD3: CLIP-L, CLIP-G, T5; Flux:
    CLIP, T5) a pipeline folder holding their components. ``text_encoders``: ``{slot name: folder or TextEncoder}``
    per text slot of the family (``family.text_slots``, e.g. ``{"t5": ...}``), replacing those of the other sources.
    Text encoders are required for a model directory or checkpoint, optional for a pipeline folder (they replace the
    folder's own); a pipeline folder saved without a component (SD3 without T5: ``text_encoder_3`` null) leaves that
    slot empty.
    ``text_dtype``: the text encoders' compute dtype (default ``dtype``). ``max_sequence_length``: text tokens
    (default: the family's, e.g. PixArt-Σ 300, α 120, SD3 256, Flux 512). ``sequence_parallel``: split each image's
    tokens over this many devices (the batch over the rest) with ``sequence_mode`` "auto", "ulysses" or "ring" — for
    2K/4K images (see ``SamplingPipeline``).
    ``quantize``: None (float weights), ``"int8"``, ``"int4"`` or a ``dit_jax.quantize.QuantizeConfig``: int8 weights
    with per-output-channel scales (int4: packed, one scale per 64 input weights) for the transformer's matmul
    kernels, quantised on the host and dequantised per matmul inside the jitted functions; safetensors checkpoints
    (transformer and text encoders) are memory-mapped and each kernel is quantised as it is read, so the float32 model
    is never held whole (BENCHMARKS.md: host memory of loading). The text encoders get the
    same, except that int4 gives them int8 (``dit_jax.quantize.text_encoder_config``; an int4 encoder can be passed
    in ``text_encoders=``). Encoders passed as built ``TextEncoder`` objects are used as they are.
    ``offload``: keep every component's params in host memory and place each on the devices only while it runs (the
    text encoders while the prompts are encoded, the model for the sampler loop, the VAE for the decode; diffusers'
    model CPU offload, ``SamplingPipeline``); built ``TextEncoder`` objects are used through host copies.
    ``model_overrides``: model config fields (e.g. ``attention_backend="xla"``, ``scan_blocks=True``; for torch
    checkpoints anything ``from_torch`` takes, e.g. ``num_heads=16``).
    """
    allowed = ("float32", "bfloat16")
    dtype = canonical_dtype(dtype, allowed=allowed, what="dtype")
    text_dtype = dtype if text_dtype is None else canonical_dtype(text_dtype, allowed=allowed, what="text_dtype")
    quantize = quantize_config(quantize)
    text_quantize = text_encoder_config(quantize)
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be True or False")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: expected a diffusers pipeline folder, a model directory, a PyTorch checkpoint or "
            "a training workdir"
        )
    scheduler_config = None
    if _is_pipeline_folder(path):
        spec = _pipeline_folder(path, model_overrides, quantize)
    elif _is_workdir(path):
        spec = _workdir(path, model_overrides)
    else:
        if _is_model_dir(path):
            config, params = load_model(path)
            config, params = _override(config, params, model_overrides, str(path))
        elif path.is_dir() and not any((path / p).exists() for p in ("config.json", "transformer")):
            raise ValueError(
                f"{path} is not a diffusers pipeline folder (model_index.json), a model directory (config.json + "
                "params/), a diffusers transformer folder (config.json + weights) or a training workdir (checkpoints/)"
            )
        else:
            config, params = _from_torch(path, model_overrides, quantize)
        spec = dict(config=config, params=params, vae=_bundled_vae(path), needs_vae=None)
        if family_of(config).task:
            family = family_of(config)
            spec.update(family.sampling_for(config), scheduler_config=dict(family.scheduler_config_for(config)))

    if quantize is not None:  # before the text encoders load: the float params are not kept beside them
        spec["params"] = quantize_params(spec["params"], quantize)  # (checkpoints come quantised as they are read)
    config = spec["config"]
    family = family_of(config)
    source = spec.get("source_name", str(path))
    if family.task not in PIPELINES:
        raise ValueError(
            f"{source} holds a {type(config).__name__}; dit_jax.pipelines.load builds "
            + " and ".join(
                f"{task} ({', '.join(f.display_name for f in families().values() if f.task == task)})"
                for task in PIPELINES
            )  # fmt: skip
            + " pipelines"
        )
    text = takes_text(family)
    if not text and (text_encoder is not None or text_encoders is not None or max_sequence_length is not None):
        raise ValueError(
            f"{source} is a class-conditional {family.display_name}: text_encoder(s)= and max_sequence_length= do "
            "not apply"
        )

    # VAE: the argument wins over the source's own
    vae_source = vae if vae is not None else spec.get("vae")
    needs_vae = spec.get("needs_vae")
    if needs_vae is None:  # model directory / torch checkpoint: latent unless 1 or 3 channels (pixel space)
        needs_vae = config.in_channels not in (1, 3) or vae is not None
    if needs_vae and vae_source is None:
        raise ValueError(
            f"{source}: the model works on {config.in_channels}-channel latents; pass vae= (a diffusers VAE folder, a "
            "VAE model directory or a VAE checkpoint)"
        )
    if vae_source is not None and spec.get("needs_vae") is False:
        raise ValueError(f"{source} is a pixel-space model (its run did not train on latents); vae= does not apply")

    # text encoders: the arguments win over the pipeline folder's own
    encoders: dict[str, TextEncoder] = {}
    if text:
        max_length = max_sequence_length or spec.get("max_sequence_length") or family.max_sequence_length(config)
        lengths = {s.name: s.max_length or max_length for s in family.text_slots(config)}
        table = spec.get("prompt_table")
        if table is not None and text_encoder is None and not text_encoders:
            slots = family.text_slots(config)  # a run's fixed prompts: looked up, for its one text slot
            encoders = {slots[0].name: PromptTable(table, name=f"the prompts of {source}")}
        for name, (src, tok) in (
            {}
            if encoders
            else text_sources(family, config, spec.get("text_folders"), text_encoder, text_encoders, source)
        ).items():
            encoders[name] = load_text_encoder(
                src, max_length=lengths[name], dtype=text_dtype, tokenizer=tok, quantize=text_quantize, offload=offload
            )

    vae_config = vae_params = None
    if vae_source is not None:
        vae_config, vae_params = load_vae(vae_source)
        vae_config = vae_config.replace(dtype=dtype)

    # sampler
    if scheduler is not None:
        scheduler_config = read_scheduler_config(scheduler)
        schedule, method, options = _scheduler(scheduler_config, f"scheduler={scheduler!r}")
    elif "schedule" in spec:
        schedule, method, options = spec["schedule"]
    else:
        scheduler_config = spec["scheduler_config"]
        schedule, method, options = _scheduler(scheduler_config, f"{source} scheduler config")

    common = dict(
        model_config=config.replace(dtype=dtype),
        params=spec.pop("params"),
        schedule=schedule,
        method=method,
        options=options,
        vae_config=vae_config,
        vae_params=vae_params,
        scheduler_config=scheduler_config,
        num_inference_steps=spec["num_inference_steps"],
        guidance_scale=spec["guidance_scale"],
        source=source,
        sequence_parallel=sequence_parallel,
        sequence_mode=sequence_mode,
        offload=offload,
    )
    if text:
        common.update(max_sequence_length=max_length)
        if len(family.text_slots(config)) == 1:
            common.update(text_encoder=next(iter(encoders.values())))
        else:
            common.update(text_encoders=encoders)
    return PIPELINES[family.task](**common)
