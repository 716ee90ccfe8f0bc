"""Training config: every key with its default (``base_config``), merging an experiment over it (``with_defaults``),
validation, and what it names (the model config, the logical-axis rules).

Experiment files in ``configs/`` start from ``base_config()`` and change what differs, so a key is spelled once.
"""

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from dit_jax.models import ModelConfig, preset


def base_config() -> ml_collections.ConfigDict:
    """All training keys with their defaults (a small class-conditional DiT with flow matching)."""
    c = ml_collections.ConfigDict()
    # model: a preset name plus any config-field overrides (dtype, scan_blocks, remat, depth, …)
    c.model = ml_collections.ConfigDict(dict(name="DiT-S/2"))
    c.objective = "flow"  # flow | ddpm
    c.diffusion = ml_collections.ConfigDict()  # schedule fields + loss options of the objective
    c.data = ml_collections.ConfigDict(dict(name="digits"))
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | came
            lr=1e-4,
            b1=0.9,
            b2=0.999,
            b3=0.9999,  # CAME only
            eps=1e-8,  # AdamW
            eps1=1e-30,  # CAME
            eps2=1e-16,  # CAME
            weight_decay=0.0,
            warmup_steps=0,
            decay="constant",  # constant | cosine | linear
            end_lr_ratio=0.0,
            grad_clip=0.0,  # global norm; 0 disables
        )
    )
    c.batch_size = 256  # global, over all processes
    c.grad_accum_steps = 1
    c.total_steps = 1000
    c.seed = 0
    c.ema_decay = 0.9999
    c.ema_warmup = False  # decay min(ema_decay, (1+s)/(10+s)): useful for short runs
    c.cfg_dropout_prob = ml_collections.config_dict.placeholder(float)  # None: the model's class/caption dropout
    # constant model inputs of every training example that the data does not carry, e.g. FLUX.1-dev's embedded
    # guidance: dict(guidance=3.5) (a batch's own values win)
    c.condition_inputs = ml_collections.ConfigDict()
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.sample_every = 0  # 0: only at the end when sample.enabled
    c.nan_guard_limit = 20  # consecutive non-finite steps before saving and stopping
    # device mesh over all processes; −1 takes the remaining devices. dcn_mesh: across-slice factors (multi-slice).
    # sequence > 1 splits tokens for sequence-parallel attention (dit_jax.parallel.sequence)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))
    c.dcn_mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
    c.logical_axis_rules = ()  # overrides of dit_jax.parallel.DEFAULT_RULES, e.g. (("embed", None),)
    # attention over a mesh with sequence > 1: "auto" (Ulysses when the heads divide, else ring), "ulysses", "ring"
    c.sequence_mode = "auto"
    # start from another run or a model directory (fine-tuning stages); the model may add KV compression
    c.init_from = ml_collections.ConfigDict(dict(workdir="", model_dir="", step=-1, use_ema=True))
    # LoRA fine-tuning (dit_jax.lora): rank > 0 trains only adapters over the frozen base (init_from, else a fresh
    # init); alpha None: = rank (scale 1); targets: regexes over parameter paths, () = the family's defaults
    c.lora = ml_collections.ConfigDict(
        dict(rank=0, alpha=ml_collections.config_dict.placeholder(float), targets=(), dropout=0.0, init="kaiming")
    )
    # sample grids (and the defaults of python -m dit_jax.evaluate)
    c.sample = ml_collections.ConfigDict(
        dict(
            enabled=True,
            method="",  # "": the objective's default sampler
            num_steps=50,
            guidance_scale=1.0,
            per_class=1,  # DiT: images per class in a grid row
            num_classes=10,  # DiT: how many classes (0 … n−1) the grid shows, unless labels are given
            labels=(),  # DiT: the classes of the grid rows, e.g. (207, 360, 387, 974)
            seed=0,
            vae="",  # latent runs: a VAE model directory to decode grids with (else .npy latents)
            options=ml_collections.ConfigDict(),  # extra dit_jax.diffusion.sample options (e.g. respacing)
        )
    )
    c.export_torch_format = ""  # e.g. "original": torch export by python -m dit_jax.train.export by default
    return c


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base config updated with ``config`` (so an experiment file may leave keys out)."""
    merged = base_config()
    with merged.unlocked():
        _merge(merged, config)
    return merged


# sections an experiment replaces as a whole: their keys depend on the choice (model preset, data source, objective)
_REPLACED_WHOLE = ("model", "data", "diffusion", "condition_inputs")


def _merge(base: ml_collections.ConfigDict, update: ml_collections.ConfigDict) -> None:
    for key, value in update.items():
        if isinstance(value, ml_collections.ConfigDict) and isinstance(base.get(key), ml_collections.ConfigDict):
            if key in _REPLACED_WHOLE:
                base[key] = value
            else:
                _merge(base[key], value)
        else:
            base[key] = value


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (what checkpoints and TensorBoard store)."""
    return json.loads(config.to_json_best_effort())


def _axis_rule(rule: Any) -> tuple[str, str | tuple[str, ...] | None]:
    """A logical-axis rule from a config (JSON/CLI give lists): ``(name, mesh axes or None)``."""
    if len(rule) != 2:
        raise ValueError(f"config.logical_axis_rules entry {rule!r} is invalid: expected (logical name, mesh axes)")
    name, axes = rule
    return str(name), tuple(axes) if isinstance(axes, list | tuple) else axes


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """The logical-axis rules of a run: the defaults with ``config.logical_axis_rules`` applied."""
    from dit_jax.parallel.rules import logical_rules

    return logical_rules([_axis_rule(r) for r in config.logical_axis_rules])


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"config.{key}={value!r} is invalid: expected {expected}")


def validate(config: ml_collections.ConfigDict) -> None:
    """One clear error for the first bad value (mesh sizes are checked against the devices when the mesh is made)."""
    for key in ("batch_size", "total_steps", "log_every", "grad_accum_steps", "keep_checkpoints"):
        v = config.get(key)
        if not isinstance(v, int) or v < 1:
            raise _bad(key, v, "a positive integer")
    for key in ("checkpoint_every", "sample_every", "nan_guard_limit"):
        v = config.get(key)
        if not isinstance(v, int) or v < 0:
            raise _bad(key, v, "an integer >= 0 (0 disables)")
    if config.objective not in ("flow", "ddpm"):
        raise _bad("objective", config.objective, "'flow' or 'ddpm'")
    if not 0.0 <= float(config.ema_decay) <= 1.0:
        raise _bad("ema_decay", config.ema_decay, "a value in [0, 1]")
    if config.batch_size % config.grad_accum_steps:
        raise _bad("grad_accum_steps", config.grad_accum_steps, f"a divisor of batch_size={config.batch_size}")
    if "name" not in config.model:
        raise _bad("model", dict(config.model), "a 'name' key naming a preset (see dit_jax.models.list_presets())")
    if "name" not in config.data:
        raise _bad("data", dict(config.data), "a 'name' key naming a data source")
    for key, value in dict(config.get("condition_inputs") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(f"condition_inputs.{key}", value, "a number (one value for every training example)")
    from dit_jax.parallel.sequence import SEQUENCE_MODES

    if config.get("sequence_mode", "auto") not in SEQUENCE_MODES:
        raise _bad("sequence_mode", config.sequence_mode, f"one of {SEQUENCE_MODES}")
    if config.init_from.get("workdir") and config.init_from.get("model_dir"):
        raise _bad("init_from", dict(config.init_from), "at most one of workdir and model_dir")


def _as_field(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


def model_config_from(model: Mapping[str, Any]) -> ModelConfig:
    """``config.model`` (a preset ``name`` plus field overrides) → the model config dataclass."""
    fields = {k: _as_field(v) for k, v in dict(model).items() if k != "name"}
    try:
        return preset(model["name"], **fields)
    except TypeError as e:
        raise ValueError(f"config.model has an unknown field: {e}") from e


def lora_config_from(config: ml_collections.ConfigDict, model_config: ModelConfig) -> Any:
    """``config.lora`` → a ``dit_jax.lora.LoraConfig`` with the family's default targets filled in, or None when
    ``rank`` is 0 (full fine-tuning)."""
    settings = dict(config.get("lora") or {})
    if not settings.get("rank"):
        return None
    from dit_jax.lora import LoraConfig, resolve

    targets = settings.get("targets") or ()
    try:
        lora = LoraConfig(
            rank=settings["rank"],
            alpha=settings.get("alpha"),
            targets=(targets,) if isinstance(targets, str) else tuple(targets),
            dropout=float(settings.get("dropout", 0.0)),
            init=settings.get("init", "kaiming"),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.lora: {e}") from e
    lora = resolve(lora, model_config)
    from dit_jax.lora import target_paths
    from dit_jax.models import abstract_params
    from dit_jax.runs import unbox_abstract

    if not target_paths(unbox_abstract(abstract_params(model_config)), lora):
        raise ValueError(f"config.lora.targets={list(lora.targets)} match no Dense kernel of {config.model.name}")
    return lora


def load_config_file(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file; a bare name is looked up beside ``relative_to`` (for configs that
    build on another experiment's config)."""
    import importlib.util
    import os

    if relative_to is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if not path.endswith(".py"):
        path += ".py"
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
