"""Samplers that reproduce the diffusers schedulers (and the original DiT / PixArt samplers) step for step.

``sample(model_fn, latents, schedule=..., method=..., num_steps=...)`` builds a per-step coefficient table on the
host (static: it depends only on the schedule, method, step count and options), then runs the whole trajectory in
one ``lax.fori_loop`` whose body calls the model once. It is a pure function: jit it, shard the latents over the
batch, and the loop compiles once.

Methods and options (defaults = the diffusers scheduler's, except ``clip_sample=False``):
  DDPMSchedule ``ddpm``      ``DDPMScheduler``: timestep_spacing="leading", steps_offset=0, clip_sample,
                             clip_sample_range=1, variance_type (fixed_small; learned_range when
                             ``schedule.learned_sigma``; fixed_small_log, fixed_large), timesteps=[...] (custom),
                             respacing="250" (ADM ``p_sample_loop`` of DiT: ADM timesteps, float64 coefficients)
               ``ddim``      ``DDIMScheduler``: timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True,
                             clip_sample, clip_sample_range, eta=0, use_clipped_model_output=False,
                             respacing="ddim50" (ADM ``ddim_sample_loop``)
               ``dpmpp_2m``  ``DPMSolverMultistepScheduler`` (DPM-Solver++): solver_order=2, solver_type="midpoint",
                             lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                             timestep_spacing="linspace", steps_offset=0, lambda_min_clipped=-inf;
                             variant="dpm_solver": PixArt's original DPM-Solver++ (continuous ``time_uniform``
                             times from t_start=1 to t_end=1/N, model times (t − 1/N)·1000, no final denoising;
                             lower_order_final=True is PixArt-Σ's rule, False PixArt-α's for ≥ 10 steps),
                             with skip_type ("time_uniform", "time_quadratic"), t_start, t_end, solver_order,
                             solver_type, lower_order_final
               ``unipc``     ``UniPCMultistepScheduler`` (UniP predictor + UniC corrector, B(h) variants):
                             solver_order=2, solver_type="bh2" ("bh1"), lower_order_final=True (the order is at most
                             the number of steps left, at any step count), disable_corrector=() (indices of predictor
                             steps whose result is not corrected), final_sigmas_type="zero" ("sigma_min"),
                             timestep_spacing="linspace", steps_offset=0, predict_x0=True (False: the ε form, with
                             final_sigmas_type="sigma_min"); float32 ᾱ as diffusers
               schedule_dtype (ddpm/ddim/dpmpp_2m): "float32" = diffusers' float32 ᾱ and step arithmetic (the
                             default), "float64" = exact (ADM; the default with ``respacing``)
  FlowSchedule ``euler``     ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps(n, sigmas=, mu=, timesteps=)`` and
                             its config): sigmas=[...] (base sigmas before the shift, e.g. Flux's
                             ``linspace(1, 1/n, n)``), timesteps=[...] (model timesteps as given), image_seq_len or mu
                             (μ of ``dynamic_shift``; ``image_seq_len`` is ignored without it), shift_terminal,
                             use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, invert_sigmas,
                             stochastic_sampling (x₀ = x − σ·v re-noised to σ_next; needs ``key``)
               ``heun``      ``FlowMatchHeunDiscreteScheduler`` (2·n − 1 model calls): sigmas, image_seq_len, mu
               ``dpmpp_2m``  ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``:
                             solver_order, solver_type, lower_order_final, euler_at_final, image_seq_len or mu;
                             variant="k_diffusion": Stability's SD3 reference sampler (``sd3_infer.py``:
                             k-diffusion ``sample_dpmpp_2m`` on ``get_sigmas``, see ``sd3_reference_sigmas``; a
                             constant shift only; the diffusers-only options above are rejected)
               ``unipc``     ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``
                             (Wan 2.1: flow_shift 3 at 480p, 5 at 720p; 50 steps): solver_order, solver_type,
                             lower_order_final, disable_corrector, final_sigmas_type, shift_terminal, image_seq_len
                             or mu (``use_dynamic_shifting``); the model sees int(σ·1000) as in diffusers. The
                             corrector runs after every model call but the first, so n steps take n model calls.
  How the pipelines pass the flow options (reproducing diffusers exactly):
    SD3/SD3.5   ``sample(..., method="euler", num_steps=n)``; nothing else (image_seq_len = (h/p)·(w/p) may be
                passed, it only matters with a dynamic-shift config). ``dpmpp_2m, variant="k_diffusion"`` is SAI's.
    Flux        ``sample(..., method="euler", num_steps=n, sigmas=np.linspace(1, 1/n, n),
                image_seq_len=(h/2)·(w/2))`` (the packed token count; dev's dynamic shift μ is computed from it, as
                ``calculate_shift`` does; schnell's constant shift 1 ignores it).
Every method takes ``progress=callable(i, n)``.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.ddpm import split_learned_sigma
from dit_jax.diffusion.schedules import (
    DDPMSchedule,
    FlowSchedule,
    float32_alphas_cumprod,
    linspace_float32,
    space_timesteps,
    time_shift,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

DDPM_METHODS = ("ddpm", "ddim", "dpmpp_2m", "unipc")
FLOW_METHODS = ("euler", "heun", "dpmpp_2m", "unipc")
_SPACINGS = ("leading", "trailing", "linspace")

# Options per (family, method) with their defaults (= the matching diffusers scheduler's defaults, except
# clip_sample, which is off: every DiT-family latent model samples without it).
_DDPM_OPTIONS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "variance_type": None,
    "respacing": None,
    "timesteps": None,
    "schedule_dtype": None,
}
_DDIM_OPTIONS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "eta": 0.0,
    "use_clipped_model_output": False,
    "respacing": None,
    "schedule_dtype": None,
}
_DPM_OPTIONS = {
    "variant": "diffusers",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "lambda_min_clipped": -math.inf,
    "schedule_dtype": "float32",
    # variant="dpm_solver" only
    "skip_type": "time_uniform",
    "t_start": None,
    "t_end": None,
}
_FLOW_OPTIONS = {
    "sigmas": None,
    "timesteps": None,
    "image_seq_len": None,
    "mu": None,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}
_FLOW_HEUN_OPTIONS = {"sigmas": None, "image_seq_len": None, "mu": None}
FLOW_DPM_VARIANTS = ("diffusers", "k_diffusion")
_FLOW_DPM_OPTIONS = {
    "variant": "diffusers",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "image_seq_len": None,
    "mu": None,
}
_UNIPC_OPTIONS = {
    "solver_order": 2,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": (),
    "final_sigmas_type": "zero",
}
_DDPM_UNIPC_OPTIONS = {**_UNIPC_OPTIONS, "predict_x0": True, "timestep_spacing": "linspace", "steps_offset": 0}
_FLOW_UNIPC_OPTIONS = {**_UNIPC_OPTIONS, "shift_terminal": None, "image_seq_len": None, "mu": None}
_OPTIONS = {
    ("ddpm", "ddpm"): _DDPM_OPTIONS,
    ("ddpm", "ddim"): _DDIM_OPTIONS,
    ("ddpm", "dpmpp_2m"): _DPM_OPTIONS,
    ("flow", "euler"): _FLOW_OPTIONS,
    ("flow", "heun"): _FLOW_HEUN_OPTIONS,
    ("flow", "dpmpp_2m"): _FLOW_DPM_OPTIONS,
    ("ddpm", "unipc"): _DDPM_UNIPC_OPTIONS,
    ("flow", "unipc"): _FLOW_UNIPC_OPTIONS,
}
_DPM_SOLVER_ONLY = ("skip_type", "t_start", "t_end")
DPM_DIFFUSERS_ONLY = (
    "euler_at_final",
    "final_sigmas_type",
    "timestep_spacing",
    "steps_offset",
    "lambda_min_clipped",
    "schedule_dtype",
)
# flow dpmpp_2m options that only the diffusers variant has (variant="k_diffusion" rejects them)
FLOW_DPM_DIFFUSERS_ONLY = (
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "final_sigmas_type",
    "mu",
)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A sampling trajectory resolved on the host: what the loop body does at each of ``len(model_t)`` model calls.

    ``kind`` selects the loop body, ``model_t`` (float32) are the timesteps the model sees, ``tables`` maps
    coefficient names to per-call float32 arrays, ``prediction`` is how the mean output is read (epsilon,
    v_prediction, sample, flow) and ``flags`` holds static switches of the body. Flow trajectories also keep
    ``sigmas``: the n + 1 float32 sigmas of the schedule (the scheduler's ``sigmas``, ending in 0).
    """

    kind: str
    model_t: np.ndarray
    tables: dict
    prediction: str
    flags: tuple = ()
    sigmas: np.ndarray | None = None

    @property
    def num_model_calls(self) -> int:
        """Model evaluations of the trajectory."""
        return int(len(self.model_t))


def _resolve_options(family: str, method: str, options: dict) -> tuple[dict, set]:
    allowed = _OPTIONS[(family, method)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r} with a {family} schedule; allowed: {sorted(allowed)}"
        )
    return {**allowed, **options}, set(options)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


# --------------------------------------------------------------------------------------------------------------------
# DDPM-family trajectories
# --------------------------------------------------------------------------------------------------------------------


def _spaced_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``DDPMScheduler``/``DDIMScheduler.set_timesteps`` (descending int64)."""
    _check_choice("timestep_spacing", spacing, _SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset
    ratio = num_train / n
    return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1


def _alphas_cumprod(schedule: DDPMSchedule, o: dict) -> np.ndarray:
    """ᾱ in the arithmetic of the reference: diffusers' float32 ᾱ and float32 step coefficients (the default), or
    float64 (ADM; the default with ``respacing``). Step tables are computed in the returned array's dtype."""
    dtype = o.get("schedule_dtype") or ("float64" if o.get("respacing") is not None else "float32")
    _check_choice("schedule_dtype", dtype, ("float32", "float64"))
    if dtype == "float64":
        return schedule.alphas_cumprod
    ac = float32_alphas_cumprod(
        schedule.beta_schedule, schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end
    )
    return ac.astype(np.float32)


def _check_steps(num_steps, limit: int | None = None) -> int:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if limit is not None and num_steps > limit:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={limit}")
    return int(num_steps)


def _respaced(schedule: DDPMSchedule, respacing, num_steps) -> np.ndarray:
    ts = np.asarray(space_timesteps(schedule.num_train_timesteps, respacing), np.int64)[::-1]
    if num_steps is not None and num_steps != len(ts):
        raise ValueError(f"respacing {respacing!r} gives {len(ts)} steps but num_steps={num_steps}")
    return ts


def _ddpm_timesteps(schedule: DDPMSchedule, num_steps, o: dict, given: set) -> np.ndarray:
    t_total = schedule.num_train_timesteps
    sources = [k for k in ("respacing", "timesteps") if o.get(k) is not None]
    if len(sources) > 1:
        raise ValueError("give at most one of respacing= and timesteps=")
    if sources and given & {"timestep_spacing", "steps_offset"}:
        raise ValueError(f"{sources[0]}= fixes the timesteps; timestep_spacing/steps_offset cannot be combined with it")
    if o.get("respacing") is not None:
        return _respaced(schedule, o["respacing"], num_steps)
    if o.get("timesteps") is not None:
        ts = np.asarray(o["timesteps"], np.int64)
        if ts.ndim != 1 or len(ts) == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= t_total or ts[-1] < 0:
            raise ValueError(f"timesteps must be strictly descending integers in [0, {t_total}), got {o['timesteps']}")
        if num_steps is not None and num_steps != len(ts):
            raise ValueError(f"{len(ts)} timesteps given but num_steps={num_steps}")
        return ts
    n = _check_steps(num_steps, t_total)
    ts = _spaced_timesteps(t_total, n, o["timestep_spacing"], o["steps_offset"])
    if ts.max() >= t_total or ts.min() < 0:
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {t_total}) (steps_offset={o['steps_offset']})")
    return ts


def _ddpm_trajectory(schedule: DDPMSchedule, num_steps, o: dict, given: set) -> Trajectory:
    ts = _ddpm_timesteps(schedule, num_steps, o, given)
    ac = _alphas_cumprod(schedule, o)
    variance_type = o["variance_type"] or ("learned_range" if schedule.learned_sigma else "fixed_small")
    _check_choice("variance_type", variance_type, ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"))
    if variance_type == "learned_range" and not schedule.learned_sigma:
        raise ValueError("variance_type='learned_range' needs a schedule with learned_sigma=True")
    ab_t = ac[ts]
    ab_prev = np.append(ac[ts[1:]], ac.dtype.type(1.0))  # the next listed step, or ᾱ = 1 past the end (prev_t = −1)
    alpha_t = ab_t / ab_prev
    beta_t = 1.0 - alpha_t
    var = np.maximum((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
    tables = {
        "sa": np.sqrt(ab_t),
        "s1m": np.sqrt(1.0 - ab_t),
        "c_x0": np.sqrt(ab_prev) * beta_t / (1.0 - ab_t),
        "c_xt": np.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t),
        "noise_on": (ts > 0).astype(np.float64),
    }
    if variance_type == "learned_range":
        tables["min_log"], tables["max_log"] = np.log(var), np.log(beta_t)
    else:
        tables["std"] = np.sqrt(beta_t) if variance_type == "fixed_large" else np.sqrt(var)
    flags = (("learned_range", variance_type == "learned_range"), ("clip", o["clip_sample"]))
    tables["clip_range"] = np.full(len(ts), float(o["clip_sample_range"]))
    return Trajectory("ddpm", ts.astype(np.float32), tables, schedule.prediction, flags)


def _ddim_trajectory(schedule: DDPMSchedule, num_steps, o: dict, given: set) -> Trajectory:
    t_total = schedule.num_train_timesteps
    ac = _alphas_cumprod(schedule, o)
    final = ac.dtype.type(1.0) if o["set_alpha_to_one"] else ac[0]
    if o["respacing"] is not None:
        if given & {"timestep_spacing", "steps_offset"}:
            raise ValueError("respacing= fixes the timesteps; timestep_spacing/steps_offset cannot be combined with it")
        ts = _respaced(schedule, o["respacing"], num_steps)
        prev = np.append(ts[1:], -1)  # ADM: the next kept step
    else:
        n = _check_steps(num_steps, t_total)
        ts = _spaced_timesteps(t_total, n, o["timestep_spacing"], o["steps_offset"])
        if ts.max() >= t_total or ts.min() < 0:
            raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {t_total}) (steps_offset={o['steps_offset']})")
        prev = ts - t_total // n  # diffusers: always t − T // n
    ab_t = ac[ts]
    ab_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    eta = float(o["eta"])
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    std = ac.dtype.type(eta) * np.sqrt(variance)
    tables = {
        "sa": np.sqrt(ab_t),
        "s1m": np.sqrt(1.0 - ab_t),
        "sa_prev": np.sqrt(ab_prev),
        "dir": np.sqrt(np.maximum(1.0 - ab_prev - std**2, ac.dtype.type(0.0))),
        "std": std,
        "clip_range": np.full(len(ts), float(o["clip_sample_range"])),
    }
    flags = (
        ("clip", o["clip_sample"]),
        ("clipped_eps", o["use_clipped_model_output"]),
        ("stochastic", eta > 0),
    )
    return Trajectory("ddim", ts.astype(np.float32), tables, schedule.prediction, flags)


def _multistep_tables(alpha, sigma, orders: list[int], solver_type: str) -> dict:
    """DPM-Solver++ update x_{i+1} = a·x + b·D_i + c·(D_i − D_{i−1}) from α, σ at the n + 1 points."""
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    alpha = np.asarray(alpha, np.float64)
    sigma = np.asarray(sigma, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        n = len(orders)
        a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
        for i, order in enumerate(orders):
            h = lam[i + 1] - lam[i]
            phi = np.expm1(-h)  # e^{−h} − 1
            a[i] = sigma[i + 1] / sigma[i]
            b[i] = -alpha[i + 1] * phi
            if order == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                if solver_type == "midpoint":
                    c[i] = -0.5 * alpha[i + 1] * phi / r0
                else:
                    c[i] = alpha[i + 1] * (phi / h + 1.0) / r0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(c))):
        raise ValueError("the DPM-Solver coefficients are not finite for this schedule (check the sigmas)")
    return {"a": a, "b": b, "c": c}


def _diffusers_orders(n: int, o: dict) -> list[int]:
    """The order ``DPMSolverMultistepScheduler.step`` uses at each step."""
    solver_order = o["solver_order"]
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order {solver_order!r} is not supported; expected 1 or 2")
    orders = []
    for i in range(n):
        final_low = i == n - 1 and (
            o["euler_at_final"] or (o["lower_order_final"] and n < 15) or o["final_sigmas_type"] == "zero"
        )
        orders.append(1 if solver_order == 1 or i == 0 or final_low else 2)
    return orders


def _dpm_timesteps(schedule: DDPMSchedule, n: int, o: dict) -> np.ndarray:
    """``DPMSolverMultistepScheduler.set_timesteps`` (descending int64), with ``lambda_min_clipped``."""
    t_total = schedule.num_train_timesteps
    ac = _alphas_cumprod(schedule, o)
    lam = 0.5 * np.log(ac) - 0.5 * np.log(1.0 - ac)
    clipped = int(np.searchsorted(lam[::-1], o["lambda_min_clipped"]))
    last = t_total - clipped
    spacing = o["timestep_spacing"]
    _check_choice("timestep_spacing", spacing, _SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + o["steps_offset"]
    return np.arange(last, 0, -t_total / n).round().astype(np.int64) - 1


def _dpm_trajectory(schedule: DDPMSchedule, num_steps, o: dict, given: set) -> Trajectory:
    _check_choice("variant", o["variant"], ("diffusers", "dpm_solver"))
    if o["variant"] == "dpm_solver":
        bad = sorted(given & set(DPM_DIFFUSERS_ONLY))
        if bad:
            raise ValueError(f"option(s) {bad} apply to variant='diffusers' only")
        return _dpm_solver_trajectory(schedule, num_steps, o)
    bad = sorted(given & set(_DPM_SOLVER_ONLY))
    if bad:
        raise ValueError(f"option(s) {bad} apply to variant='dpm_solver' only")
    n = _check_steps(num_steps, schedule.num_train_timesteps)
    _check_choice("final_sigmas_type", o["final_sigmas_type"], ("zero", "sigma_min"))
    ac = _alphas_cumprod(schedule, o)
    ts = _dpm_timesteps(schedule, n, o)
    vp_sigmas = np.sqrt((1.0 - ac) / ac)
    last = 0.0 if o["final_sigmas_type"] == "zero" else vp_sigmas[0]
    sig = np.append(vp_sigmas[ts], last)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    tables = _multistep_tables(alpha, sigma, _diffusers_orders(len(ts), o), o["solver_type"])
    tables["sa"], tables["s1m"] = alpha[:-1], sigma[:-1]
    return Trajectory("dpm", ts.astype(np.float32), tables, schedule.prediction)


def _dpm_solver_trajectory(schedule: DDPMSchedule, num_steps, o: dict) -> Trajectory:
    """PixArt's original DPM-Solver++ (``NoiseScheduleVP('discrete')``, multistep, continuous times)."""
    n = _check_steps(num_steps)
    if o["solver_order"] not in (1, 2):
        raise ValueError(f"solver_order {o['solver_order']!r} is not supported; expected 1 or 2")
    log_alpha = 0.5 * np.cumsum(np.log(1.0 - schedule.betas))
    # numerical_clip_alpha: drop the tail where λ < −5.1 (cosine schedules); a no-op for the linear schedule
    lam = log_alpha - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha))
    idx = int(np.searchsorted(lam[::-1], -5.1))
    if idx > 0:
        log_alpha = log_alpha[:-idx]
    total_n = len(log_alpha)
    t_grid = np.linspace(0.0, 1.0, total_n + 1)[1:]
    t_start = 1.0 if o["t_start"] is None else float(o["t_start"])
    t_end = 1.0 / total_n if o["t_end"] is None else float(o["t_end"])
    if not 0 < t_end < t_start <= 1.0:
        raise ValueError(f"need 0 < t_end < t_start ≤ 1, got t_start={t_start}, t_end={t_end}")
    _check_choice("skip_type", o["skip_type"], ("time_uniform", "time_quadratic"))
    if o["skip_type"] == "time_uniform":
        t = np.linspace(t_start, t_end, n + 1)
    else:
        t = np.linspace(t_start**0.5, t_end**0.5, n + 1) ** 2
    la = _interp_extrapolate(t, t_grid, log_alpha)
    alpha, sigma = np.exp(la), np.sqrt(1.0 - np.exp(2.0 * la))
    if o["solver_order"] == 1:
        orders = [1] * n
    else:  # first step order 1, then 2; the final step order 1 with lower_order_final (PixArt-Σ's copy)
        orders = [1] + [min(2, n + 1 - j) if o["lower_order_final"] else 2 for j in range(2, n + 1)]
    tables = _multistep_tables(alpha, sigma, orders, o["solver_type"])
    tables["sa"], tables["s1m"] = alpha[:-1], sigma[:-1]
    model_t = (t[:-1] - 1.0 / total_n) * 1000.0
    return Trajectory("dpm", model_t.astype(np.float32), tables, schedule.prediction)


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation that extrapolates with the outermost segments (DPM-Solver's interpolate_fn)."""
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    return fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


# --------------------------------------------------------------------------------------------------------------------
# Flow trajectories
# --------------------------------------------------------------------------------------------------------------------


def _flow_shift_fn(schedule: FlowSchedule, o: dict):
    """σ ↦ shifted σ for sampling: the constant shift, or the time shift with μ from ``mu``/``image_seq_len``.

    ``image_seq_len`` describes the latents, so a pipeline may always pass it: without ``dynamic_shift`` it is ignored
    (diffusers' Flux pipeline passes μ to the schnell scheduler, which ignores it). ``mu`` asks for the time shift
    and needs ``dynamic_shift``.
    """
    if schedule.dynamic_shift is None:
        if o.get("mu") is not None:
            raise ValueError("mu= given but the FlowSchedule has no dynamic_shift (its shift is the constant `shift`)")
        return lambda s: schedule.shift_sigmas(s)
    if o.get("mu") is not None and o.get("image_seq_len") is not None:
        raise ValueError("give one of mu= and image_seq_len=")
    if o.get("mu") is None and o.get("image_seq_len") is None:
        raise ValueError("a FlowSchedule with dynamic_shift needs image_seq_len= (or mu=) to sample")
    mu = float(o["mu"]) if o.get("mu") is not None else schedule.mu(o["image_seq_len"])
    return lambda s: time_shift(mu, s, schedule.time_shift_type)


def _shift_float32(shift: float, t: np.ndarray) -> np.ndarray:
    """The constant shift s·t / (1 + (s − 1)·t) in float32 arithmetic (as torch evaluates it on float32 tensors)."""
    f32 = np.float32
    t = np.asarray(t, np.float32)
    return f32(shift) * t / (f32(1.0) + f32(shift - 1.0) * t)


def _train_sigma_ends(schedule: FlowSchedule) -> tuple[float, float]:
    """(σ_max, σ_min) of ``FlowMatchEulerDiscreteScheduler``'s training table: σ = t/T for t = T … 1 in float32,
    shifted in float32 by the constant shift (not by a dynamic one). For shifts such as 0.1 σ_max is not exactly 1."""
    t_total = schedule.num_train_timesteps
    ends = np.array([t_total, 1], np.float32) / np.float32(t_total)
    if schedule.dynamic_shift is None:
        ends = _shift_float32(schedule.shift, ends)
    return float(ends[0]), float(ends[1])


_SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _respace_sigmas(sig: np.ndarray, o: dict) -> np.ndarray:
    """diffusers' ``use_karras_sigmas``/``use_exponential_sigmas``/``use_beta_sigmas``: n new sigmas (float64)
    between the shifted schedule's first and last values (σ_max, σ_min).

    Karras et al. 2022 (ρ = 7): (σ_max^{1/ρ} + r·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, r = 0 … 1; exponential:
    exp(linspace(log σ_max, log σ_min)); beta (Lee et al. 2024, α = β = 0.6): σ_min + F⁻¹(1 − r)·(σ_max − σ_min)
    with F the Beta(0.6, 0.6) CDF.
    """
    chosen = [k for k in _SIGMA_SPACINGS if o.get(k)]
    if len(chosen) > 1:
        raise ValueError(f"give at most one of {_SIGMA_SPACINGS}, got {chosen}")
    if not chosen:
        return sig
    n = len(sig)
    s_max, s_min = float(sig[0]), float(sig[-1])
    ramp = np.linspace(0.0, 1.0, n)
    if chosen[0] == "use_karras_sigmas":
        rho = 7.0
        hi, lo = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    if chosen[0] == "use_exponential_sigmas":
        return np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
    import scipy.stats  # noqa: PLC0415 - only this option needs scipy

    ppf = np.array([scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1.0 - ramp], np.float64)
    return np.array([s_min + p * (s_max - s_min) for p in ppf], np.float64)


def _stretch_to_terminal(sig: np.ndarray, shift_terminal) -> np.ndarray:
    """diffusers' ``shift_terminal``: 1 − σ scaled so that the last σ becomes ``shift_terminal``."""
    terminal = float(shift_terminal)
    if not 0.0 <= terminal < 1.0:
        raise ValueError(f"shift_terminal must be in [0, 1), got {terminal!r}")
    one_minus = 1.0 - sig
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def _flow_sigmas(schedule: FlowSchedule, num_steps, o: dict) -> tuple[np.ndarray, np.ndarray]:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps``: (n + 1 sigmas (float32, the last 0, or 1 with
    ``invert_sigmas``), n model timesteps (float32)).

    Without ``sigmas``/``timesteps`` the base sigmas are linspace(T·σ_max, T·σ_min, n)/T in float64 from the ends of
    the (constantly shifted) training table, and they are shifted again (SD3's double shift). Given ``sigmas`` (Flux:
    ``linspace(1, 1/n, n)``) are rounded to float32 and shifted in float32; given ``timesteps`` (without ``sigmas``)
    become the model timesteps as they are and sigmas timesteps/T (float32), shifted. Then ``shift_terminal``
    stretches 1 − σ so that the last σ is ``shift_terminal``, and one of the sigma spacings may replace the sigmas.
    """
    t_total = schedule.num_train_timesteps
    shift = _flow_shift_fn(schedule, o)
    given_t = None
    if o.get("timesteps") is not None:
        given_t = np.asarray(o["timesteps"], np.float64).astype(np.float32)
        if given_t.ndim != 1 or len(given_t) == 0 or (num_steps is not None and len(given_t) != num_steps):
            raise ValueError(f"timesteps must be 1-D with num_steps={num_steps} entries, got shape {given_t.shape}")
    if o.get("sigmas") is not None:  # shifted in float32, as diffusers does with given sigmas
        base = np.asarray(o["sigmas"], np.float64).astype(np.float32)
        if base.ndim != 1 or len(base) == 0 or (num_steps is not None and len(base) != num_steps):
            raise ValueError(f"sigmas must be 1-D with num_steps={num_steps} entries, got shape {base.shape}")
        if given_t is not None and len(given_t) != len(base):
            raise ValueError(f"{len(base)} sigmas but {len(given_t)} timesteps given")
    elif given_t is not None:
        base = given_t / np.float32(t_total)
    else:
        n = _check_steps(num_steps)
        s_max, s_min = _train_sigma_ends(schedule)
        base = np.linspace(s_max * t_total, s_min * t_total, n) / t_total
    with np.errstate(divide="ignore"):
        sig = shift(base)
    if o.get("shift_terminal"):
        sig = _stretch_to_terminal(sig, o["shift_terminal"])
    sig = np.asarray(_respace_sigmas(np.asarray(sig), o), np.float64).astype(np.float32)
    if not np.all(np.isfinite(sig)):
        raise ValueError(f"the flow sigmas are not finite: {sig.tolist()} (check sigmas/timesteps/mu)")
    model_t = sig * np.float32(t_total) if given_t is None else given_t
    if o.get("invert_sigmas"):
        sig = np.float32(1.0) - sig
        return np.append(sig, np.float32(1.0)), sig * np.float32(t_total)
    return np.append(sig, np.float32(0.0)), model_t


def _euler_trajectory(schedule: FlowSchedule, num_steps, o: dict) -> Trajectory:
    sig, model_t = _flow_sigmas(schedule, num_steps, o)
    tables = {"dt": sig[1:] - sig[:-1]}
    if o["stochastic_sampling"]:  # x₀ = x − σ·v re-noised to σ_next with fresh noise
        tables.update(sigma=sig[:-1], sigma_next=sig[1:])
    flags = (("stochastic", bool(o["stochastic_sampling"])),)
    return Trajectory("euler", model_t, tables, "flow", flags, sigmas=sig)


def _heun_trajectory(schedule: FlowSchedule, num_steps, o: dict) -> Trajectory:
    sig, _ = _flow_sigmas(schedule, num_steps, o)  # n + 1 values, last 0
    n = len(sig) - 1
    model_t, dt, second = [], [], []
    for k in range(2 * n - 1):
        j = (k + 1) // 2  # first-order calls at σ_j (k even), corrector calls at σ_j (k odd)
        model_t.append(sig[j] * np.float32(schedule.num_train_timesteps))
        step = k // 2  # the step this call belongs to: from σ_step to σ_{step+1}
        dt.append(sig[step + 1] - sig[step])
        second.append(float(k % 2))
    tables = {"dt": np.asarray(dt, np.float32), "second": np.asarray(second)}
    return Trajectory("heun", np.asarray(model_t, np.float32), tables, "flow", sigmas=sig)


def _flow_dpm_trajectory(schedule: FlowSchedule, num_steps, o: dict, given: set) -> Trajectory:
    """``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``, or with
    ``variant="k_diffusion"`` the DPM++ 2M of k-diffusion on SD3's sigmas (Stability's ``sd3_infer.py``)."""
    _check_choice("variant", o["variant"], FLOW_DPM_VARIANTS)
    if o["variant"] == "k_diffusion":
        bad = sorted(given & set(FLOW_DPM_DIFFUSERS_ONLY))
        if bad:
            raise ValueError(f"option(s) {bad} apply to variant='diffusers' only")
        return _k_diffusion_dpm_trajectory(schedule, num_steps)
    n = _check_steps(num_steps)
    t_total = schedule.num_train_timesteps
    if o["final_sigmas_type"] != "zero":
        raise ValueError(f"final_sigmas_type {o['final_sigmas_type']!r} is not supported with a FlowSchedule")
    shift = _flow_shift_fn(schedule, o)
    s = 1.0 - np.linspace(1.0, 1.0 / t_total, n + 1)
    with np.errstate(divide="ignore"):  # σ = 0 at the (dropped) last point: the time shift maps it to 0
        s = np.flip(shift(s))[:-1].copy()
    model_t = (s * t_total).astype(np.int64)  # diffusers keeps these as int64 (truncated)
    sig = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    alpha, sigma = 1.0 - sig, sig
    tables = _multistep_tables(alpha, sigma, _diffusers_orders(n, o), o["solver_type"])
    tables["sa"], tables["s1m"] = alpha[:-1], sigma[:-1]
    return Trajectory("dpm", model_t.astype(np.float32), tables, "flow", sigmas=sig.astype(np.float32))


def sd3_reference_sigmas(shift: float, num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The sigmas of Stability's ``sd3_infer.py`` (``get_sigmas``), n + 1 float32 values ending in 0.

    The training table is σ(t) = s·(t/T) / (1 + (s − 1)·t/T) for t = 1 … T; the sampling timesteps are
    ``torch.linspace(T·σ(T), T·σ(1), n)`` in float32 and each goes through σ(·) again (the same double shift as
    diffusers' ``FlowMatchEulerDiscreteScheduler``, in float32 instead of float64: they differ by ≤ 2 float32 ulps).
    """
    n = _check_steps(num_steps)
    f32 = np.float32
    t_total = f32(num_train_timesteps)
    table_ends = np.array([num_train_timesteps, 1], np.float32) / t_total
    if shift != 1.0:
        table_ends = _shift_float32(shift, table_ends)
    t = linspace_float32(table_ends[0] * t_total, table_ends[1] * t_total, n) / t_total
    sig = t if shift == 1.0 else _shift_float32(shift, t)
    return np.append(sig.astype(np.float32), f32(0.0))


def _k_diffusion_dpm_trajectory(schedule: FlowSchedule, num_steps) -> Trajectory:
    """k-diffusion's ``sample_dpmpp_2m`` with SD3's ``ModelSamplingDiscreteFlow``: D = x − σ·v, t = −log σ,
    h = t_{i+1} − t_i; x ← (σ_{i+1}/σ_i)·x − expm1(−h)·D', where D' = D on the first step and
    D' = (1 + 1/(2r))·D − 1/(2r)·D_prev with r = h_{i−1}/h_i otherwise; the last step (σ = 0) returns D. The model
    sees σ·T (float, not truncated). The coefficients are exact (float64, from the float32 sigmas); the reference
    evaluates them on float32 tensors, which is within float32 noise of these."""
    if schedule.dynamic_shift is not None:
        raise ValueError("variant='k_diffusion' follows SD3's constant shift; the FlowSchedule has a dynamic_shift")
    sig = sd3_reference_sigmas(schedule.shift, num_steps, schedule.num_train_timesteps)
    s = sig.astype(np.float64)
    n = len(s) - 1
    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        if s[i + 1] == 0.0:  # the final step: x = D
            b[i] = 1.0
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        a[i] = s[i + 1] / s[i]
        b[i] = -math.expm1(-h)
        if i > 0:
            r = (math.log(s[i - 1]) - math.log(s[i])) / h
            c[i] = b[i] / (2.0 * r)  # b·D' = b·D + (b/(2r))·(D − D_prev)
    tables = {"a": a, "b": b, "c": c, "sa": 1.0 - s[:-1], "s1m": s[:-1]}
    model_t = sig[:-1] * np.float32(schedule.num_train_timesteps)
    return Trajectory("dpm", model_t, tables, "flow", sigmas=sig)


# --------------------------------------------------------------------------------------------------------------------
# UniPC trajectories (DDPM and flow)
# --------------------------------------------------------------------------------------------------------------------

UNIPC_SOLVER_TYPES = ("bh1", "bh2")


def _unipc_orders(n: int, o: dict) -> list[int]:
    """The predictor order of each step as ``UniPCMultistepScheduler.step`` picks it: warm-up 1, 2, … up to
    ``solver_order``; with ``lower_order_final`` at most the number of steps left (at any n, unlike DPM-Solver)."""
    k = o["solver_order"]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"solver_order must be a positive integer, got {k!r}")
    return [min(int(k), i + 1, n - i if o["lower_order_final"] else int(k)) for i in range(n)]


def _unipc_disabled(value) -> frozenset[int]:
    """``disable_corrector``: the predictor steps whose result is not corrected (diffusers' list of step indices)."""
    try:
        steps = list(value)
    except TypeError:
        raise ValueError(f"disable_corrector must be a list of step indices, got {value!r}") from None
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps):
        raise ValueError(f"disable_corrector must be a list of step indices, got {value!r}")
    return frozenset(int(s) for s in steps)


def _unipc_interval(lam, s: int, t: int, x0_pred: bool, solver_type: str, order: int):
    """(h, h·φ₁, B(h), b) of a UniPC update from point s to point t (λ = log α − log σ, h = λ_t − λ_s).

    The data-prediction form (``predict_x0``) integrates in hh = −h, the noise form in hh = h; h·φ₁ = e^hh − 1;
    B(h) = hh (bh1) or e^hh − 1 (bh2); b_k = k!·φ_{k+1}(hh)·hh / B(h) (k = 1 … order) are the right-hand sides of
    the order conditions (computed only when ``order`` > 0 asks for them)."""
    h = lam[t] - lam[s]
    hh = -h if x0_pred else h
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h, h_phi_1, b_h, np.asarray(b)


def _unipc_tables(alpha, sigma, orders: list[int], o: dict, x0_pred: bool) -> dict:
    """Per model call i, the UniC corrector and the UniP predictor as linear combinations of the model outputs
    m_{i−j} (x₀ with ``predict_x0``, else ε), j = 0 … depth − 1:

      x_i ← c_x·x_{i−1} + Σ_j c_m[j]·m_{i−j}   (when corr: x_{i−1} is the previous corrected sample)
      x_{i+1} = p_x·x_i + Σ_j p_m[j]·m_{i−j}

    Predictor of order p from point i: x_{i+1} = scale·x_i − lead·hφ₁·m_i − lead·B(h)·Σ_k ρ_k·(m_{i−k} − m_i)/r_k,
    r_k = (λ_{i−k} − λ_i)/h, ρ = (½) for p = 2, else the solution of Σ_k ρ_k·r_k^{j−1} = b_j (j < p). The corrector at
    call i redoes step i − 1 (its order q) with the new output m_i: the same form from point i − 1 plus
    −lead·B(h)·ρ_q·(m_i − m_{i−1}), where ρ = (½) for q = 1, else the solution of the q conditions with r_q = 1.
    ``scale``/``lead`` are σ_t/σ_s and α_t (data prediction) or α_t/α_s and σ_t (noise prediction).
    """
    _check_choice("solver_type", o["solver_type"], UNIPC_SOLVER_TYPES)
    disabled = _unipc_disabled(o["disable_corrector"])
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    n, depth = len(orders), max(orders) + 1
    if sigma[-1] == 0.0 and not x0_pred:
        raise ValueError(
            "predict_x0=False needs final_sigmas_type='sigma_min': with a final sigma of 0 the noise-prediction "
            "update is 0·inf (diffusers' UniPCMultistepScheduler returns NaN)"
        )
    if sigma[-1] == 0.0 and o["solver_type"] == "bh1":
        raise ValueError(
            "solver_type='bh1' needs final_sigmas_type='sigma_min': onto a final sigma of 0 its B(h) is infinite "
            "(diffusers' UniPCMultistepScheduler returns NaN)"
        )
    if sigma[-1] == 0.0 and orders[-1] > 1:
        raise ValueError(
            "lower_order_final=False with final_sigmas_type='zero' is not supported: a last step of order > 1 onto "
            "sigma = 0 divides by 0 (diffusers' UniPCMultistepScheduler returns inf/NaN)"
        )
    tables = {
        "p_x": np.zeros(n),
        "p_m": np.zeros((n, depth)),
        "corr": np.zeros(n),
        "c_x": np.zeros(n),
        "c_m": np.zeros((n, depth)),
    }
    solver = o["solver_type"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(alpha) - np.log(sigma)

        def base(s: int, t: int, order: int):  # scale, lead, hφ₁, B(h), b of the step from s to t
            h, h_phi_1, b_h, b = _unipc_interval(lam, s, t, x0_pred, solver, order)
            scale = sigma[t] / sigma[s] if x0_pred else alpha[t] / alpha[s]
            lead = alpha[t] if x0_pred else sigma[t]
            return h, scale, lead, h_phi_1, b_h, b

        for i, p in enumerate(orders):
            # UniP from point i (m_i is m_{i−0}, m_{i−k} is history slot k)
            h, scale, lead, h_phi_1, b_h, b = base(i, i + 1, p if p > 2 else 0)
            tables["p_x"][i] = scale
            tables["p_m"][i, 0] = -lead * h_phi_1
            if p >= 2:
                r = np.array([(lam[i - k] - lam[i]) / h for k in range(1, p)])
                rho = np.array([0.5]) if p == 2 else np.linalg.solve(np.vander(r, p - 1, increasing=True).T, b[:-1])
                for k in range(1, p):
                    w = -lead * b_h * rho[k - 1] / r[k - 1]
                    tables["p_m"][i, k] += w
                    tables["p_m"][i, 0] -= w
            # UniC at call i: redo step i − 1 (order q) from the corrected x_{i−1} with the new output m_i
            if i == 0 or (i - 1) in disabled:
                continue
            q = orders[i - 1]
            h, scale, lead, h_phi_1, b_h, b = base(i - 1, i, q if q > 1 else 0)
            r = np.array([(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, q)] + [1.0])
            rho = np.array([0.5]) if q == 1 else np.linalg.solve(np.vander(r, q, increasing=True).T, b)
            tables["corr"][i] = 1.0
            tables["c_x"][i] = scale
            tables["c_m"][i, 1] = -lead * h_phi_1
            for k in range(1, q):  # the older outputs m_{i−1−k}, slot k + 1
                w = -lead * b_h * rho[k - 1] / r[k - 1]
                tables["c_m"][i, k + 1] += w
                tables["c_m"][i, 1] -= w
            w = -lead * b_h * rho[-1]  # the new output: ρ_q·(m_i − m_{i−1})
            tables["c_m"][i, 0] += w
            tables["c_m"][i, 1] -= w
    bad = sorted(k for k, v in tables.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(
            f"the UniPC coefficients {bad} are not finite for this schedule (check the sigmas and options)"
        )
    return tables


def _ddpm_unipc_trajectory(schedule: DDPMSchedule, num_steps, o: dict) -> Trajectory:
    """``UniPCMultistepScheduler`` on a VP schedule: diffusers' float32 ᾱ and sigmas √((1 − ᾱ)/ᾱ) at the spaced
    integer timesteps (as ``DPMSolverMultistepScheduler``), α = 1/√(σ² + 1), σ·α; final sigma 0 or σ(t = 0)."""
    n = _check_steps(num_steps, schedule.num_train_timesteps)
    _check_choice("final_sigmas_type", o["final_sigmas_type"], ("zero", "sigma_min"))
    f32 = {"schedule_dtype": "float32"}
    ts = _dpm_timesteps(schedule, n, {**o, **f32, "lambda_min_clipped": -math.inf})
    if ts.max() >= schedule.num_train_timesteps or ts.min() < 0:
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {schedule.num_train_timesteps}) ({o})")
    ac = _alphas_cumprod(schedule, f32).astype(np.float32)
    vp = np.sqrt((np.float32(1.0) - ac) / ac)  # float32, as the scheduler holds its sigmas
    last = np.float32(0.0) if o["final_sigmas_type"] == "zero" else vp[0]
    sig = np.append(vp[ts], last).astype(np.float32)
    # α_t, σ_t in float32 as the scheduler computes them: x₀ = (x − σ_t·ε)/α_t amplifies their rounding by 1/α_t
    alpha = np.float32(1.0) / np.sqrt(sig * sig + np.float32(1.0))
    alpha, sigma = alpha.astype(np.float64), (sig * alpha).astype(np.float64)
    x0_pred = bool(o["predict_x0"])
    tables = _unipc_tables(alpha, sigma, _unipc_orders(n, o), o, x0_pred)
    tables["sa"], tables["s1m"] = alpha[:-1], sigma[:-1]
    return Trajectory("unipc", ts.astype(np.float32), tables, schedule.prediction, (("predict_x0", x0_pred),))


def _flow_unipc_trajectory(schedule: FlowSchedule, num_steps, o: dict) -> Trajectory:
    """``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`` (Wan 2.1): sigmas
    linspace(1, 1/T, n + 1)[:-1] shifted (float64), stretched to ``shift_terminal`` if set, the first lowered by 1e-6
    when it is 1 (so that log α stays finite), model timesteps int(σ·T); final sigma 0 or the last sigma again
    (``sigma_min``: the last step then returns its input). α = 1 − σ, σ from the float32 sigmas."""
    n = _check_steps(num_steps)
    t_total = schedule.num_train_timesteps
    _check_choice("final_sigmas_type", o["final_sigmas_type"], ("zero", "sigma_min"))
    shift = _flow_shift_fn(schedule, o)
    s = np.asarray(shift(np.linspace(1.0, 1.0 / t_total, n + 1)[:-1]), np.float64)
    if o["shift_terminal"]:
        s = _stretch_to_terminal(s, o["shift_terminal"])
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    model_t = (s * t_total).astype(np.int64)  # diffusers keeps these as int64 (truncated)
    last = 0.0 if o["final_sigmas_type"] == "zero" else s[-1]
    sig = np.append(s, last).astype(np.float32)
    sigma = sig.astype(np.float64)
    tables = _unipc_tables(1.0 - sigma, sigma, _unipc_orders(n, o), o, x0_pred=True)
    tables["sa"], tables["s1m"] = 1.0 - sigma[:-1], sigma[:-1]
    flags = (("predict_x0", True),)
    return Trajectory("unipc", model_t.astype(np.float32), tables, "flow", flags, sigmas=sig)


def make_trajectory(schedule: DDPMSchedule | FlowSchedule, method: str, num_steps: int | None, **options) -> Trajectory:
    """Resolve the trajectory (timesteps and per-call coefficients) of ``sample`` on the host."""
    options = {k: v for k, v in options.items() if k != "progress"}
    if isinstance(schedule, DDPMSchedule):
        _check_choice("method for a DDPMSchedule", method, DDPM_METHODS)
        o, given = _resolve_options("ddpm", method, options)
        if method == "unipc":
            return _ddpm_unipc_trajectory(schedule, num_steps, o)
        builder = {"ddpm": _ddpm_trajectory, "ddim": _ddim_trajectory, "dpmpp_2m": _dpm_trajectory}[method]
        return builder(schedule, num_steps, o, given)
    if isinstance(schedule, FlowSchedule):
        _check_choice("method for a FlowSchedule", method, FLOW_METHODS)
        o, given = _resolve_options("flow", method, options)
        if method == "dpmpp_2m":
            return _flow_dpm_trajectory(schedule, num_steps, o, given)
        if method == "unipc":
            return _flow_unipc_trajectory(schedule, num_steps, o)
        return {"euler": _euler_trajectory, "heun": _heun_trajectory}[method](schedule, num_steps, o)
    raise TypeError(f"schedule must be a DDPMSchedule or FlowSchedule, got {type(schedule).__name__}")


def model_timesteps(schedule: DDPMSchedule | FlowSchedule, method: str, num_steps: int | None, **options) -> np.ndarray:
    """The timesteps ``sample`` passes to the model, one per model call (float32)."""
    return make_trajectory(schedule, method, num_steps, **options).model_t


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


def _to_x0_eps(prediction: str, x, out, sa, s1m, need_eps: bool):
    """x₀ (and ε) from the model's mean output; ``sa``, ``s1m`` are √ᾱ, √(1 − ᾱ) (flow: 1 − σ, σ)."""
    eps = None
    if prediction == "epsilon":
        x0 = (x - s1m * out) / sa
        eps = out
    elif prediction == "v_prediction":
        x0 = sa * x - s1m * out
        if need_eps:
            eps = sa * out + s1m * x
    elif prediction == "sample":
        x0 = out
        if need_eps:
            eps = (x - sa * x0) / s1m
    else:  # flow: velocity ε − x₀
        x0 = x - s1m * out
    return x0, eps


def step_noise(key: jax.Array, step, shape: tuple[int, ...]) -> jax.Array:
    """The noise a stochastic sampler adds at ``step``: example j gets ``normal(fold_in(fold_in(key, step), j))``.

    Per-example keys make each sample independent of the batch it is drawn in (padding to the device count,
    ``--batch-size``), so the same seed and label give the same image everywhere.
    """
    step_key = jax.random.fold_in(key, step)
    draw = lambda j: jax.random.normal(jax.random.fold_in(step_key, j), shape[1:], jnp.float32)  # noqa: E731
    return jax.vmap(draw)(jnp.arange(shape[0]))


def sample(
    model_fn: ModelFn,
    latents: jax.Array,
    *,
    schedule: DDPMSchedule | FlowSchedule,
    method: str,
    num_steps: int | None,
    key: jax.Array | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> jax.Array:
    """Run a sampler from ``latents`` (pure noise at the first timestep) to x₀, in one ``lax.fori_loop``.

    ``model_fn(x, t)`` gets ``t`` of shape (B,) float32 with the values diffusers passes to the model (DDPM family:
    the scheduler's integer timesteps; flow: σ·1000; flow ``dpmpp_2m``/``unipc``: int(σ·1000) as diffusers, σ·1000 with
    ``variant="k_diffusion"``) and returns the
    model output; with ``schedule.learned_sigma`` it has 2·C channels (last axis) and only ``ddpm`` uses the
    variance half. ``key`` is needed by the stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``, ``euler``
    with ``stochastic_sampling``): the noise
    of step i is ``step_noise(key, i, shape)``, drawn per example, so a sample does not depend on the batch size.
    ``progress(i, n)`` (optional) is called on the host after each model
    call through ``jax.debug.callback``. ``options`` are the diffusers scheduler config fields of the method
    (listed in this module's docstring), plus ``respacing=`` (ADM) for ``ddpm``/``ddim``, ``variant="dpm_solver"``
    (PixArt's original DPM-Solver) for ``dpmpp_2m``, ``variant="k_diffusion"`` (SD3's reference DPM++ 2M) for flow
    ``dpmpp_2m`` and ``schedule_dtype``. The flow options ``sigmas``/``timesteps``/``mu``/``image_seq_len`` are the
    arguments of diffusers' ``set_timesteps`` (see the module docstring for what the SD3 and Flux pipelines pass).
    The loop carries float32; the result
    has the latents' dtype.
    """
    traj = make_trajectory(schedule, method, num_steps, **options)
    flags = dict(traj.flags)
    stochastic = traj.kind == "ddpm" or (traj.kind in ("ddim", "euler") and flags.get("stochastic"))
    if stochastic and key is None:
        raise ValueError(f"method {method!r} is stochastic here; pass key=")
    learned = isinstance(schedule, DDPMSchedule) and schedule.learned_sigma
    b, c = latents.shape[0], latents.shape[-1]
    n = traj.num_model_calls
    model_t = jnp.asarray(traj.model_t, jnp.float32)
    tables = {k: jnp.asarray(np.asarray(v, np.float64).astype(np.float32)) for k, v in traj.tables.items()}
    in_dtype = latents.dtype

    def call_model(i, x):
        t = jnp.broadcast_to(model_t[i], (b,))
        out = model_fn(x.astype(in_dtype), t)
        if learned:
            mean, var = split_learned_sigma(out, c)
        else:
            if out.shape != x.shape:
                raise ValueError(
                    f"model output shape {out.shape} != latents shape {x.shape}; set learned_sigma=True on the "
                    "schedule if the model predicts its variance"
                )
            mean, var = out, None
        if progress is not None:
            jax.debug.callback(lambda step: progress(int(step) + 1, n), i)
        return mean.astype(jnp.float32), None if var is None else var.astype(jnp.float32)

    def at(name, i):
        return tables[name][i]

    def noise(i, x):
        return step_noise(key, i, x.shape)

    if traj.kind == "ddpm":

        def body(i, x):
            out, var = call_model(i, x)
            x0, _ = _to_x0_eps(traj.prediction, x, out, at("sa", i), at("s1m", i), need_eps=False)
            if flags["clip"]:
                x0 = jnp.clip(x0, -at("clip_range", i), at("clip_range", i))
            mean = at("c_x0", i) * x0 + at("c_xt", i) * x
            if flags["learned_range"]:
                frac = (var + 1.0) / 2.0
                std = jnp.exp(0.5 * (frac * at("max_log", i) + (1.0 - frac) * at("min_log", i)))
            else:
                std = at("std", i)
            return mean + at("noise_on", i) * std * noise(i, x)

        carry = latents.astype(jnp.float32)
    elif traj.kind == "ddim":

        def body(i, x):
            out, _ = call_model(i, x)
            x0, eps = _to_x0_eps(traj.prediction, x, out, at("sa", i), at("s1m", i), need_eps=True)
            if flags["clip"]:
                x0 = jnp.clip(x0, -at("clip_range", i), at("clip_range", i))
            if flags["clipped_eps"]:
                eps = (x - at("sa", i) * x0) / at("s1m", i)
            x = at("sa_prev", i) * x0 + at("dir", i) * eps
            if flags["stochastic"]:
                x = x + at("std", i) * noise(i, x)
            return x

        carry = latents.astype(jnp.float32)
    elif traj.kind == "dpm":

        def body(i, state):
            x, d_prev = state
            out, _ = call_model(i, x)
            d, _ = _to_x0_eps(traj.prediction, x, out, at("sa", i), at("s1m", i), need_eps=False)
            x = at("a", i) * x + at("b", i) * d + at("c", i) * (d - d_prev)
            return x, d

        x32 = latents.astype(jnp.float32)
        carry = (x32, jnp.zeros_like(x32))
    elif traj.kind == "euler":

        def body(i, x):
            v, _ = call_model(i, x)
            if flags["stochastic"]:
                x0 = x - at("sigma", i) * v
                return (1.0 - at("sigma_next", i)) * x0 + at("sigma_next", i) * noise(i, x)
            return x + at("dt", i) * v

        carry = latents.astype(jnp.float32)
    elif traj.kind == "heun":

        def body(i, state):
            x, x_saved, v_saved = state
            v, _ = call_model(i, x)
            second = at("second", i) > 0
            dt = at("dt", i)
            x_pred = x + dt * v  # Euler predictor (first-order calls)
            x_corr = x_saved + dt * (0.5 * (v_saved + v))  # trapezoidal corrector (second-order calls)
            x_new = jnp.where(second, x_corr, x_pred)
            return x_new, jnp.where(second, x_saved, x), jnp.where(second, v_saved, v)

        x32 = latents.astype(jnp.float32)
        carry = (x32, x32, jnp.zeros_like(x32))
    elif traj.kind == "unipc":
        x0_pred = flags["predict_x0"]
        depth = traj.tables["p_m"].shape[1]

        def combine(name, i, history):  # Σ_j w[j]·m_{i−j}
            w = tables[name][i]
            return sum(w[j] * history[j] for j in range(depth))

        def body(i, state):
            x, x_prev, history = state
            out, _ = call_model(i, x)
            x0, eps = _to_x0_eps(traj.prediction, x, out, at("sa", i), at("s1m", i), need_eps=not x0_pred)
            history = ((x0 if x0_pred else eps), *history[:-1])  # m_i, m_{i−1}, …
            corrected = at("c_x", i) * x_prev + combine("c_m", i, history)  # UniC: step i − 1 redone with m_i
            x = jnp.where(at("corr", i) > 0, corrected, x)
            return at("p_x", i) * x + combine("p_m", i, history), x, history  # UniP: to step i + 1

        x32 = latents.astype(jnp.float32)
        carry = (x32, jnp.zeros_like(x32), tuple(jnp.zeros_like(x32) for _ in range(depth)))
    else:  # pragma: no cover - make_trajectory only builds the kinds above
        raise AssertionError(traj.kind)

    out = jax.lax.fori_loop(0, n, body, carry)
    x = out[0] if isinstance(out, tuple) else out
    return x.astype(in_dtype)


# earlier names (a trajectory was called a plan, which ``python -m dit_jax.plan`` also is)
Plan = Trajectory
make_plan = make_trajectory
