"""Noise schedules: DDPM betas (linear, scaled-linear, squaredcos_cap_v2), ADM timestep respacing, and the
rectified-flow sigma schedule with SD3's constant shift and Flux's resolution-dependent shift.

Everything here runs on the host in float64 numpy (as ADM does) and is cast to float32 where it meets arrays.
The schedule dataclasses are frozen and hashable, so they can be static arguments of ``jax.jit``.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TIME_SHIFT_TYPES = ("exponential", "linear")
# Flux's line for the shift exponent mu in the image token count: (256 tokens, 0.5) to (4096 tokens, 1.15).
FLUX_DYNAMIC_SHIFT = (256, 0.5, 4096, 1.15)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=64)
def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas (float64, length ``num_train_timesteps``) of a named schedule, with diffusers' argument semantics.

    ``linear``: ``linspace(beta_start, beta_end, T)``; ``scaled_linear``: ``linspace(√start, √end, T)²`` (LDM/SD);
    ``squaredcos_cap_v2``: the Improved-DDPM cosine ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2), β capped at 0.999.
    (ADM's ``get_named_beta_schedule("linear", T)`` additionally scales 1e-4..0.02 by 1000/T; pass those values.)
    """
    t = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)], np.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")
    return _readonly(betas)


def linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` bit for bit: a float32 step, the first half fused-multiply-
    added from ``start`` and the second half from ``end`` (one rounding each, emulated in float64)."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n)
    lo = (np.float64(start) + step * i).astype(np.float32)
    hi = (np.float64(end) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, lo, hi)


@functools.lru_cache(maxsize=64)
def float32_alphas_cumprod(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float):
    """ᾱ as the diffusers schedulers hold it (float32, returned as float64): float32 betas (``torch.linspace`` in
    float32; the cosine betas rounded to float32), α = 1 − β in float32, a cumulative product rounded to float32.

    It differs from the float64 ᾱ by up to ~1e-5 relative (cosine betas near the 0.999 cap, and 1 − ᾱ₀); using it
    makes the diffusers-parity samplers agree with the diffusers loops to float32 rounding.
    """
    if beta_schedule == "linear":
        betas = linspace_float32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    else:
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end).astype(np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return _readonly(np.cumprod(alphas).astype(np.float32).astype(np.float64))


def space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    """ADM ``respace.space_timesteps``: the sorted original timesteps kept by a respacing string.

    ``"250"`` keeps 250 evenly strided steps (``[0, 4, 8, …, 995, 999]``, i.e. round(i·999/249)); ``"10,15,20"``
    splits [0, T) into 3 equal sections and takes 10, 15, 20 steps in them; ``"ddim50"`` uses the integer stride
    that yields exactly 50 steps (``range(0, T, stride)``).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps with an integer stride for respacing "
                f"{section_counts!r} of {num_timesteps} timesteps"
            )
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}; expected e.g. '250', '10,15,20' or 'ddim50'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot divide a section of {size} steps into {count} (respacing {section_counts!r})")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python round (half to even), as ADM
            cur += frac_stride
        start += size
    return sorted(set(steps))


def spaced_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> np.ndarray:
    """ADM ``SpacedDiffusion``: betas recomputed so that the kept steps have the original ᾱ (float64)."""
    keep = set(use_timesteps)
    last, betas = 1.0, []
    for i, ac in enumerate(alphas_cumprod):
        if i in keep:
            betas.append(1.0 - ac / last)
            last = ac
    return np.asarray(betas, np.float64)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """A discrete DDPM (VP) process: betas, the model's prediction target and whether it predicts its variance.

    Hashable (a static ``jax.jit`` argument). Derived arrays are float64 numpy properties; losses and samplers
    cast them to float32 when they gather them (as ADM's ``_extract_into_tensor``).
    """

    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    prediction: str = "epsilon"
    learned_sigma: bool = False

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer ≥ 2, got {self.num_train_timesteps!r}")

    @property
    def betas(self) -> np.ndarray:
        """β_t, t = 0 … T−1 (float64)."""
        return make_betas(self.beta_schedule, int(self.num_train_timesteps), self.beta_start, self.beta_end)

    @property
    def alphas(self) -> np.ndarray:
        """α_t = 1 − β_t."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = Π_{s≤t} α_s."""
        return _alphas_cumprod(self)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """ᾱ_{t−1} with ᾱ_{−1} = 1."""
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        """β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), the variance of q(x_{t−1} | x_t, x_0)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log β̃_t with β̃_0 (= 0) replaced by β̃_1, as ADM."""
        pv = self.posterior_variance
        return np.log(np.append(pv[1], pv[1:]))

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x_0 in the posterior mean: β_t √ᾱ_{t−1} / (1 − ᾱ_t)."""
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_t in the posterior mean: (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)


@functools.lru_cache(maxsize=64)
def _alphas_cumprod(schedule: DDPMSchedule) -> np.ndarray:
    return _readonly(np.cumprod(1.0 - schedule.betas))


def _normalize_dynamic_shift(value) -> tuple[float, float, float, float] | None:
    if value is None or value is False:
        return None
    if value is True:
        return FLUX_DYNAMIC_SHIFT
    if isinstance(value, Mapping):
        keys = ("base_image_seq_len", "base_shift", "max_image_seq_len", "max_shift")
        unknown = set(value) - set(keys)
        if unknown:
            raise ValueError(f"unknown dynamic_shift keys {sorted(unknown)}; expected {keys}")
        defaults = dict(zip(keys, FLUX_DYNAMIC_SHIFT))
        return tuple(float(value.get(k, defaults[k])) for k in keys)
    flat = []
    for v in value:
        flat.extend(v if isinstance(v, (tuple, list)) else [v])
    if len(flat) != 4:
        raise ValueError(
            f"bad dynamic_shift {value!r}; expected ((seq_len_0, mu_0), (seq_len_1, mu_1)), a 4-tuple, a dict with "
            "base_image_seq_len/base_shift/max_image_seq_len/max_shift, or True for Flux's (256, 0.5)-(4096, 1.15)"
        )
    return tuple(float(v) for v in flat)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow x_σ = (1 − σ)·x₀ + σ·ε with a velocity (ε − x₀) model, and the σ shift.

    ``shift`` is SD3's constant shift σ' = s·σ / (1 + (s − 1)·σ). ``dynamic_shift`` (Flux) replaces it with the
    time shift σ' = e^μ / (e^μ + (1/σ − 1)) where μ is linear in the image token count; give it as
    ``((256, 0.5), (4096, 1.15))``, a dict with diffusers' ``base_image_seq_len``/``base_shift``/
    ``max_image_seq_len``/``max_shift``, or ``True`` for Flux's values. ``time_shift_type="linear"`` uses
    μ / (μ + (1/σ − 1)) instead (diffusers' option). The model sees timesteps σ·``num_train_timesteps``.
    """

    shift: float = 1.0
    dynamic_shift: tuple | None = None
    num_train_timesteps: int = 1000
    time_shift_type: str = "exponential"

    def __post_init__(self):
        object.__setattr__(self, "dynamic_shift", _normalize_dynamic_shift(self.dynamic_shift))
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"unknown time_shift_type {self.time_shift_type!r}; expected one of {TIME_SHIFT_TYPES}")

    def mu(self, image_seq_len: int) -> float:
        """Flux's μ for an image of ``image_seq_len`` tokens (linear through the two ``dynamic_shift`` points)."""
        if self.dynamic_shift is None:
            raise ValueError("mu() needs a FlowSchedule with dynamic_shift set")
        x0, y0, x1, y1 = self.dynamic_shift
        m = (y1 - y0) / (x1 - x0)
        return image_seq_len * m + (y0 - m * x0)

    def shift_sigmas(self, sigmas, *, image_seq_len: int | None = None, mu: float | None = None):
        """Apply the constant or (with ``dynamic_shift``) the resolution-dependent shift to σ ∈ [0, 1].

        Works on numpy and jax arrays alike (elementwise arithmetic only).
        """
        if self.dynamic_shift is None:
            if mu is not None or image_seq_len is not None:
                raise ValueError("image_seq_len/mu given but the FlowSchedule has no dynamic_shift")
            s = self.shift
            return s * sigmas / (1 + (s - 1) * sigmas)
        if mu is None:
            if image_seq_len is None:
                raise ValueError("a FlowSchedule with dynamic_shift needs image_seq_len (or mu)")
            mu = self.mu(image_seq_len)
        return time_shift(mu, sigmas, self.time_shift_type)


def time_shift(mu: float, sigmas, kind: str = "exponential"):
    """Flux time shift e^μ / (e^μ + (1/σ − 1)) (``kind="linear"``: μ / (μ + (1/σ − 1)))."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"unknown time_shift_type {kind!r}; expected one of {TIME_SHIFT_TYPES}")
