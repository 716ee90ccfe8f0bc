"""Map a diffusers ``scheduler_config.json`` (by ``_class_name``) to ``(schedule, method, options)`` for ``sample``.

Missing keys take the diffusers class defaults (listed here, so diffusers need not be installed); keys that this
library does not model are ignored, as diffusers ignores unexpected keys; values that would change the numerics
in a way ``sample`` does not implement raise one error naming the key.
"""

import math
from typing import Any

from dit_jax.diffusion.schedules import DDPMSchedule, FlowSchedule

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
_NO_THRESHOLDING = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {
        **_BETAS,
        **_NO_THRESHOLDING,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    "DDIMScheduler": {
        **_BETAS,
        **_NO_THRESHOLDING,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
    },
    "DPMSolverMultistepScheduler": {
        **_BETAS,
        **_NO_THRESHOLDING,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
    "FlowMatchHeunDiscreteScheduler": {"num_train_timesteps": 1000, "shift": 1.0},
    "UniPCMultistepScheduler": {
        **_BETAS,
        **_NO_THRESHOLDING,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "shift_terminal": None,
    },
}
_DPM_VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large")
# UniPC reads DPM-Solver's solver types as its bh2 (as diffusers' constructor does)
_UNIPC_SOLVER_ALIASES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
SUPPORTED_SCHEDULERS = tuple(_DEFAULTS)


def _require(cfg: dict, key: str, expected, cls: str) -> None:
    value = cfg[key]
    if value != expected and not (expected is None and value is None):
        raise ValueError(f"{cls} config {key}={value!r} is not supported (only {expected!r})")


def _ddpm_schedule(cfg: dict, cls: str, *, learned_sigma: bool) -> DDPMSchedule:
    for key, expected in _NO_THRESHOLDING.items():
        _require(cfg, key, expected, cls)
    return DDPMSchedule(
        beta_schedule=cfg["beta_schedule"],
        beta_start=float(cfg["beta_start"]),
        beta_end=float(cfg["beta_end"]),
        num_train_timesteps=int(cfg["num_train_timesteps"]),
        prediction=cfg["prediction_type"],
        learned_sigma=learned_sigma,
    )


def from_diffusers_scheduler_config(config: dict) -> tuple[DDPMSchedule | FlowSchedule, str, dict]:
    """``(schedule, method, options)`` reproducing a diffusers scheduler config with ``sample``.

    Supported ``_class_name``: DDPMScheduler → ``ddpm``, DDIMScheduler → ``ddim``, DPMSolverMultistepScheduler →
    ``dpmpp_2m`` (VP or, with ``use_flow_sigmas``, flow), FlowMatchEulerDiscreteScheduler → ``euler``,
    FlowMatchHeunDiscreteScheduler → ``heun``, UniPCMultistepScheduler → ``unipc`` (VP or, with ``use_flow_sigmas``,
    flow, e.g. Wan 2.1; ``solver_type`` midpoint/heun/logrho read as bh2, as diffusers does; ``solver_p``, the
    karras/exponential/beta sigmas and thresholding are rejected). FlowMatchEulerDiscreteScheduler: ``shift``, the
    dynamic shift (``use_dynamic_shifting`` with ``base/max_image_seq_len``, ``base/max_shift``, ``time_shift_type``)
    go to the ``FlowSchedule``; ``shift_terminal``, ``use_karras/exponential/beta_sigmas``, ``invert_sigmas`` and
    ``stochastic_sampling`` become ``euler`` options (only when set); μ (``mu``/``image_seq_len``) and Flux's explicit
    ``sigmas`` are per-call options of ``sample``, as they are arguments of diffusers' ``set_timesteps``.
    ``learned_sigma`` is set where the config says so (``variance_type`` learned_range); DDIM configs do not, so set
    it from the model (``dataclasses.replace(schedule, learned_sigma=True)``) when the model predicts its variance.
    """
    cls = config.get("_class_name")
    if cls not in _DEFAULTS:
        raise ValueError(f"unsupported scheduler _class_name {cls!r}; expected one of {SUPPORTED_SCHEDULERS}")
    cfg = {**_DEFAULTS[cls], **{k: v for k, v in config.items() if k in _DEFAULTS[cls]}}

    if cls == "DDPMScheduler":
        vt = cfg["variance_type"]
        if vt not in ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"):
            raise ValueError(f"{cls} config variance_type={vt!r} is not supported")
        schedule = _ddpm_schedule(cfg, cls, learned_sigma=vt == "learned_range")
        keys = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "variance_type")
        return schedule, "ddpm", {k: cfg[k] for k in keys}

    if cls == "DDIMScheduler":
        schedule = _ddpm_schedule(cfg, cls, learned_sigma=False)
        keys = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range")
        return schedule, "ddim", {k: cfg[k] for k in keys}

    if cls == "DPMSolverMultistepScheduler":
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            _require(cfg, key, False, cls)
        _require(cfg, "algorithm_type", "dpmsolver++", cls)
        if cfg["solver_order"] not in (1, 2):
            raise ValueError(f"{cls} config solver_order={cfg['solver_order']!r} is not supported (only 1 or 2)")
        options = {k: cfg[k] for k in ("solver_order", "solver_type", "lower_order_final", "euler_at_final")}
        if options["solver_type"] in ("logrho", "bh1", "bh2"):  # e.g. a UniPC config: diffusers reads midpoint
            options["solver_type"] = "midpoint"
        options["final_sigmas_type"] = cfg["final_sigmas_type"]
        if cfg["use_flow_sigmas"]:
            _require(cfg, "thresholding", False, cls)
            _require(cfg, "prediction_type", "flow_prediction", cls)
            if cfg["use_dynamic_shifting"]:
                _require(cfg, "time_shift_type", "exponential", cls)
            schedule = FlowSchedule(
                shift=float(cfg["flow_shift"]),
                dynamic_shift=True if cfg["use_dynamic_shifting"] else None,
                num_train_timesteps=int(cfg["num_train_timesteps"]),
            )
            return schedule, "dpmpp_2m", options
        # DDPM's fixed variances (a DDPMScheduler config read by from_config, e.g. Hunyuan-DiT's) mean no learned
        # variance: DPM-Solver uses the mean only and ignores them, as diffusers does
        if cfg["variance_type"] not in _DPM_VARIANCE_TYPES:
            raise ValueError(
                f"{cls} config variance_type={cfg['variance_type']!r} is not supported; expected one of "
                f"{_DPM_VARIANCE_TYPES}"
            )
        schedule = _ddpm_schedule(cfg, cls, learned_sigma=cfg["variance_type"] in ("learned", "learned_range"))
        options.update({k: cfg[k] for k in ("timestep_spacing", "steps_offset", "lambda_min_clipped")})
        return schedule, "dpmpp_2m", options

    if cls == "FlowMatchEulerDiscreteScheduler":
        spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg[k]]
        if len(spacings) > 1:
            raise ValueError(f"{cls} config sets {spacings}: at most one of them can be used")
        dynamic = None
        if cfg["use_dynamic_shifting"]:
            keys = ("base_image_seq_len", "base_shift", "max_image_seq_len", "max_shift")
            missing = [k for k in keys if cfg[k] is None]
            if missing:
                raise ValueError(f"{cls} config use_dynamic_shifting=True needs {missing} (got None)")
            dynamic = tuple(cfg[k] for k in keys)
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"{cls} config time_shift_type={cfg['time_shift_type']!r} is not supported")
        schedule = FlowSchedule(
            shift=float(cfg["shift"]),
            dynamic_shift=dynamic,
            num_train_timesteps=int(cfg["num_train_timesteps"]),
            time_shift_type=cfg["time_shift_type"],
        )
        # sampler options: only those that differ from the defaults (shift_terminal None/0 is off, as in diffusers)
        options = {k: True for k in (*spacings, "invert_sigmas", "stochastic_sampling") if cfg[k]}
        if cfg["shift_terminal"]:
            options["shift_terminal"] = float(cfg["shift_terminal"])
        return schedule, "euler", options

    if cls == "UniPCMultistepScheduler":
        return _unipc(cfg, cls)

    schedule = FlowSchedule(shift=float(cfg["shift"]), num_train_timesteps=int(cfg["num_train_timesteps"]))
    return schedule, "heun", {}


def _unipc(cfg: dict, cls: str) -> tuple[DDPMSchedule | FlowSchedule, str, dict]:
    """UniPCMultistepScheduler → ``unipc`` on a FlowSchedule (``use_flow_sigmas``, Wan 2.1) or a DDPMSchedule."""
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        _require(cfg, key, False, cls)
    _require(cfg, "solver_p", None, cls)  # another scheduler as the predictor: not a config value we can run
    order = cfg["solver_order"]
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"{cls} config solver_order={order!r} is not supported (a positive integer)")
    if cfg["solver_type"] not in _UNIPC_SOLVER_ALIASES:
        raise ValueError(f"{cls} config solver_type={cfg['solver_type']!r} is not supported (bh1 or bh2)")
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(f"{cls} config final_sigmas_type={cfg['final_sigmas_type']!r} is not supported")
    disabled = cfg["disable_corrector"] or []
    if not isinstance(disabled, (list, tuple)) or not all(isinstance(i, int) for i in disabled):
        raise ValueError(f"{cls} config disable_corrector={disabled!r} is not supported (a list of step indices)")
    options = {
        "solver_order": order,
        "solver_type": _UNIPC_SOLVER_ALIASES[cfg["solver_type"]],
        "lower_order_final": bool(cfg["lower_order_final"]),
        "disable_corrector": tuple(disabled),
        "final_sigmas_type": cfg["final_sigmas_type"],
    }
    if cfg["use_flow_sigmas"]:
        _require(cfg, "thresholding", False, cls)
        _require(cfg, "prediction_type", "flow_prediction", cls)
        _require(cfg, "predict_x0", True, cls)
        if cfg["use_dynamic_shifting"]:
            _require(cfg, "time_shift_type", "exponential", cls)
        schedule = FlowSchedule(
            shift=float(cfg["flow_shift"]),
            dynamic_shift=True if cfg["use_dynamic_shifting"] else None,
            num_train_timesteps=int(cfg["num_train_timesteps"]),
        )
        if cfg["shift_terminal"]:
            options["shift_terminal"] = float(cfg["shift_terminal"])
        return schedule, "unipc", options
    if cfg["prediction_type"] == "flow_prediction":
        raise ValueError(f"{cls} config prediction_type='flow_prediction' needs use_flow_sigmas=True")
    if cfg["shift_terminal"] is not None:
        raise ValueError(f"{cls} config shift_terminal={cfg['shift_terminal']!r} needs use_flow_sigmas=True")
    schedule = _ddpm_schedule(cfg, cls, learned_sigma=False)
    options.update({k: cfg[k] for k in ("timestep_spacing", "steps_offset")})
    options["predict_x0"] = bool(cfg["predict_x0"])
    return schedule, "unipc", options
