"""Sampler policy: which schedule a training objective uses, the default sampler of an objective, and the settings of
a sampler method given a pipeline's scheduler config; the trainer, the evaluator and the pipelines share it.

``objective`` is ``"flow"`` or ``"ddpm"``; its ``options`` (``config.diffusion`` of a run) mix the fields of the
schedule (``FlowSchedule`` / ``DDPMSchedule``) with options of the loss (e.g. the flow ``weighting``).
"""

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from dit_jax.diffusion.samplers import DDPM_METHODS, DPM_DIFFUSERS_ONLY, FLOW_DPM_DIFFUSERS_ONLY, FLOW_METHODS
from dit_jax.diffusion.scheduler_config import from_diffusers_scheduler_config
from dit_jax.diffusion.schedules import DDPMSchedule, FlowSchedule

OBJECTIVES = ("flow", "ddpm")
DEFAULT_METHODS = {"flow": "euler", "ddpm": "ddpm"}
# The diffusers scheduler class of each DDPM-family method: a method other than the pipeline's default is configured
# like ``<Class>.from_config(pipe.scheduler.config)`` in diffusers (shared keys carry over, the rest are defaults).
SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def default_method(objective: str, method: str | None = None) -> str:
    """``method``, or the objective's default sampler (flow: Euler; DDPM: ancestral)."""
    return method or DEFAULT_METHODS[objective]


def _schedule_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)


def split_options(objective: str, options: Mapping[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(schedule class, schedule kwargs, loss kwargs)`` for ``objective``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"config.objective={objective!r} is invalid: expected one of {OBJECTIVES}")
    cls = FlowSchedule if objective == "flow" else DDPMSchedule
    fields = _schedule_fields(cls)
    schedule_kw = {k: v for k, v in options.items() if k in fields}
    loss_kw = {k: v for k, v in options.items() if k not in fields}
    return cls, schedule_kw, loss_kw


def make_schedule(objective: str, options: Mapping[str, Any], *, learned_sigma: bool = False) -> Any:
    """The diffusion schedule of a run; for DDPM ``learned_sigma`` follows the model's unless the options give it."""
    cls, kw, _ = split_options(objective, dict(options))
    if objective == "ddpm":
        learned = kw.setdefault("learned_sigma", learned_sigma)
        if bool(learned) != learned_sigma:
            raise ValueError(
                f"config.diffusion.learned_sigma={learned!r} does not match the model's learn_sigma="
                f"{learned_sigma} (the model's output channels depend on it)"
            )
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.diffusion {kw} is invalid for {cls.__name__}: {e}") from e


def sampler_settings(
    schedule: DDPMSchedule | FlowSchedule,
    method: str,
    base: Mapping[str, Any],
    *,
    learned_sigma: bool,
    scheduler_config: Mapping[str, Any] | None = None,
    requested: str | None = None,
    **options: Any,
) -> tuple[DDPMSchedule | FlowSchedule, str, dict[str, Any]]:
    """``(schedule, method, options)`` for ``dit_jax.diffusion.sample``: the default ``(schedule, method, base)`` or
    the ``requested`` method, configured from ``scheduler_config`` as diffusers' ``from_config`` would; explicit
    ``options`` (e.g. ``respacing="250"``, ``eta=``) win over the defaults.

    A learned-sigma model's variance is used by ``ddpm`` (learned-range, as the original DiT) and dropped by the
    other methods; explicit timesteps drop the scheduler's spacing; PixArt's original DPM-Solver
    (``variant="dpm_solver"``) and SD3's reference DPM++ 2M (``variant="k_diffusion"``) drop the diffusers-only
    options.
    """
    base = dict(base)
    allowed = DDPM_METHODS if isinstance(schedule, DDPMSchedule) else FLOW_METHODS
    if requested is not None and requested != method:
        if requested not in allowed:
            raise ValueError(
                f"unknown method {requested!r} for this pipeline's {type(schedule).__name__}; expected one of {allowed}"
            )
        base = {}
        if isinstance(schedule, DDPMSchedule) and scheduler_config is not None:
            config = {**scheduler_config, "_class_name": SCHEDULER_CLASSES[requested]}
            schedule, _, base = from_diffusers_scheduler_config(config)
        method = requested
    elif method not in allowed:
        raise ValueError(f"unknown method {method!r} for a {type(schedule).__name__}; expected one of {allowed}")
    if isinstance(schedule, DDPMSchedule):
        schedule = dataclasses.replace(schedule, learned_sigma=learned_sigma)
        if method == "ddpm" and learned_sigma:
            base["variance_type"] = "learned_range"  # the original DiT sampler; diffusers drops the variance
    if options.get("respacing") is not None or options.get("timesteps") is not None:
        for key in ("timestep_spacing", "steps_offset"):  # fixed by the explicit timesteps
            base.pop(key, None)
    if options.get("variant") == "dpm_solver":  # PixArt's original DPM-Solver has no diffusers-only options
        for key in DPM_DIFFUSERS_ONLY:
            base.pop(key, None)
    if options.get("variant") == "k_diffusion":  # SD3's reference DPM++ 2M neither
        for key in FLOW_DPM_DIFFUSERS_ONLY:
            base.pop(key, None)
    return schedule, method, {**base, **options}
