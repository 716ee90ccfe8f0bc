"""Samplers vs the diffusers scheduler loops, the ADM p_sample_loop and PixArt's original DPM-Solver, with fixed
analytic model functions; jit-once, sharded == unsharded, progress callback, config mapping and errors."""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from parity import nhwc, torch_nchw

import dit_jax.diffusion as D

TOL = 1e-5
B, H, W, C = 2, 4, 4, 4


# --------------------------------------------------------------------------------------------------------------------
# Analytic models (the same formula in JAX, NHWC, and torch, NCHW). ᾱ(t) is interpolated from a table so that the
# ε model stays close to the Gaussian-data optimum √(1 − ᾱ)·x and x₀ stays bounded (realistic magnitudes).
# --------------------------------------------------------------------------------------------------------------------


def _ab_jax(table, t):
    n = table.shape[0]
    i0 = jnp.clip(jnp.floor(t), 0, n - 1)
    w = t - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, n - 1)
    return table[i0] * (1 - w) + table[i1] * w


def _ab_torch(table, t):
    n = table.shape[0]
    i0 = torch.clamp(torch.floor(t), 0, n - 1)
    w = t - i0
    i0 = i0.long()
    i1 = torch.clamp(i0 + 1, max=n - 1)
    return table[i0] * (1 - w) + table[i1] * w


def make_models(kind: str, schedule=None, learned_sigma: bool = False):
    """(jax_model(x NHWC, t), torch_model(x NCHW, t)) for a prediction kind: epsilon, v_prediction, sample, flow."""
    table = None if schedule is None else np.asarray(schedule.alphas_cumprod, np.float32)

    def mean(xp, x, t, ab, roll, tanh, sin, cos, sqrt):
        g = sin(roll(x) + t / 250.0)
        if kind == "epsilon":
            return sqrt(1 - ab) * x + 0.3 * sqrt(ab) * g
        if kind == "v_prediction":
            return 0.5 * tanh(x) + 0.2 * g
        if kind == "sample":
            return 1.5 * tanh(x) + 0.2 * g
        return 0.7 * x + 0.3 * g * cos(t / 400.0)

    def jax_model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == jnp.float32
        tt = t[:, None, None, None]
        ab = None if table is None else _ab_jax(jnp.asarray(table), tt)
        out = mean(jnp, x, tt, ab, lambda a: jnp.roll(a, 1, axis=-1), jnp.tanh, jnp.sin, jnp.cos, jnp.sqrt)
        if learned_sigma:
            out = jnp.concatenate([out, jnp.tanh(0.5 * x - 0.3 + tt / 2000.0)], axis=-1)
        return out

    def torch_model(x, t):
        tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        ab = None if table is None else _ab_torch(torch.from_numpy(table), tt)
        out = mean(torch, x, tt, ab, lambda a: torch.roll(a, 1, dims=1), torch.tanh, torch.sin, torch.cos, torch.sqrt)
        if learned_sigma:
            out = torch.cat([out, torch.tanh(0.5 * x - 0.3 + tt / 2000.0)], dim=1)
        return out

    return jax_model, torch_model


def latents(seed: int = 0, batch: int = B) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, H, W, C)).astype(np.float32)


def jax_noise(key, i, shape=(B, H, W, C)) -> np.ndarray:
    """The noise ``sample`` draws at step i."""
    return np.asarray(D.step_noise(key, i, shape))


def run_diffusers(scheduler, torch_model, x0, *, set_kwargs=None, step_kwargs=None, noise_fn=None, monkeypatch=None):
    """The diffusers loop ``for t in timesteps: x = step(model(x, t), t, x)``; noise_fn(i) injects step noise."""
    scheduler.set_timesteps(**(set_kwargs or {}))
    x = torch_nchw(x0)
    calls = {"i": 0}
    if noise_fn is not None:
        module = type(scheduler).__module__

        def fake_randn(shape, **_):
            return torch_nchw(noise_fn(calls["i"]))

        monkeypatch.setattr(f"{module}.randn_tensor", fake_randn)
    for t in scheduler.timesteps:
        kwargs = dict(step_kwargs or {})
        if callable(kwargs.get("variance_noise")):
            kwargs["variance_noise"] = torch_nchw(kwargs["variance_noise"](calls["i"]))
        out = torch_model(x, t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        calls["i"] += 1
    return nhwc(x), scheduler.timesteps.numpy()


def config_of(scheduler) -> dict:
    return dict(scheduler.config, _class_name=type(scheduler).__name__)


# --------------------------------------------------------------------------------------------------------------------
# Every method vs its diffusers scheduler
# --------------------------------------------------------------------------------------------------------------------

CASES = {
    # name: (scheduler factory, steps, set_timesteps kwargs, sample options, prediction kind, stochastic)
    "ddpm_eps_leading": (lambda: diffusers.DDPMScheduler(clip_sample=False), 20, {}, {}, "epsilon", True),
    "ddpm_v_trailing": (
        lambda: diffusers.DDPMScheduler(
            clip_sample=False,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            beta_schedule="scaled_linear",
        ),
        10,
        {},
        {},
        "v_prediction",
        True,
    ),
    "ddpm_learned_offset1": (
        lambda: diffusers.DDPMScheduler(
            clip_sample=False, variance_type="learned_range", steps_offset=1, beta_start=0.00085, beta_end=0.03
        ),
        25,
        {},
        {},
        "epsilon",
        True,
    ),
    "ddpm_fixed_large_clip_x0": (
        lambda: diffusers.DDPMScheduler(variance_type="fixed_large", prediction_type="sample", clip_sample_range=0.9),
        10,
        {},
        {},
        "sample",
        True,
    ),
    "ddim_eps_leading50": (lambda: diffusers.DDIMScheduler(clip_sample=False), 50, {}, {}, "epsilon", False),
    "ddim_v_trailing_no_alpha_one": (
        lambda: diffusers.DDIMScheduler(
            clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False
        ),
        10,
        {},
        {},
        "v_prediction",
        False,
    ),
    "ddim_eta1_linspace_cosine": (
        lambda: diffusers.DDIMScheduler(
            clip_sample=False, timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"
        ),
        20,
        {},
        {"eta": 1.0},
        "epsilon",
        True,
    ),
    "ddim_clip_sample": (
        lambda: diffusers.DDIMScheduler(prediction_type="sample", clip_sample_range=0.8),
        10,
        {},
        {"use_clipped_model_output": True},
        "sample",
        False,
    ),
    "dpm_default20": (lambda: diffusers.DPMSolverMultistepScheduler(), 20, {}, {}, "epsilon", False),
    "dpm_v_leading_offset_lowfinal": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            timestep_spacing="leading",
            steps_offset=1,
            final_sigmas_type="sigma_min",
        ),
        10,
        {},
        {},
        "v_prediction",
        False,
    ),
    "dpm_heun_cosine_clipped_trailing_sigma_min": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            beta_schedule="squaredcos_cap_v2",
            solver_type="heun",
            lambda_min_clipped=-5.1,
            timestep_spacing="trailing",
            final_sigmas_type="sigma_min",
        ),
        16,
        {},
        {},
        "epsilon",
        False,
    ),
    "dpm_order1_sample": (
        lambda: diffusers.DPMSolverMultistepScheduler(solver_order=1, prediction_type="sample"),
        8,
        {},
        {},
        "sample",
        False,
    ),
    "euler_sd3_shift3": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 28, {}, {}, "flow", False),
    "euler_flux_dynamic": (
        lambda: diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        8,
        {"sigmas": np.linspace(1.0, 1 / 8, 8), "mu": 4096 * (0.65 / 3840) + (0.5 - 256 * 0.65 / 3840)},
        {"sigmas": np.linspace(1.0, 1 / 8, 8), "image_seq_len": 4096},
        "flow",
        False,
    ),
    "euler_dynamic_default_sigmas_terminal": (
        lambda: diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1),
        10,
        {"mu": 0.8},
        {"mu": 0.8},
        "flow",
        False,
    ),
    "heun_shift3": (lambda: diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0), 10, {}, {}, "flow", False),
    "flow_dpm_shift3": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
        ),
        20,
        {},
        {},
        "flow",
        False,
    ),
    "flow_dpm_dynamic_mu": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True
        ),
        10,
        {"mu": 1.1},
        {"mu": 1.1},
        "flow",
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_loop(name, monkeypatch):
    factory, steps, set_kwargs, options, kind, stochastic = CASES[name]
    scheduler = factory()
    schedule, method, mapped = D.from_diffusers_scheduler_config(config_of(scheduler))
    jmodel, tmodel = make_models(
        kind,
        schedule if isinstance(schedule, D.DDPMSchedule) else None,
        learned_sigma=getattr(schedule, "learned_sigma", False),
    )
    x_init = latents()
    key = jax.random.key(7)
    opts = {**mapped, **options}
    ours = np.asarray(
        D.sample(jmodel, jnp.asarray(x_init), schedule=schedule, method=method, num_steps=steps, key=key, **opts)
    )

    step_kwargs, noise_fn = {}, None
    if stochastic and method == "ddpm":
        noise_fn = lambda i: jax_noise(key, i)  # noqa: E731
    if "eta" in options:
        step_kwargs = {"eta": options["eta"], "variance_noise": lambda i: jax_noise(key, i)}
    if options.get("use_clipped_model_output"):
        step_kwargs["use_clipped_model_output"] = True
    set_kwargs = {"num_inference_steps": None if "sigmas" in set_kwargs else steps, **set_kwargs}
    ref, ref_t = run_diffusers(
        scheduler,
        tmodel,
        x_init,
        set_kwargs=set_kwargs,
        step_kwargs=step_kwargs,
        noise_fn=noise_fn,
        monkeypatch=monkeypatch,
    )

    our_t = D.model_timesteps(schedule, method, steps, **opts)
    err = float(np.abs(ours - ref).max())
    print(
        f"{name}: {method} {len(our_t)} model calls, max|ours − diffusers| = {err:.2e} (max|x| = "
        f"{np.abs(ref).max():.2f}), timesteps max diff {np.abs(our_t - ref_t).max():.1e}"
    )
    np.testing.assert_allclose(our_t, ref_t.astype(np.float32), rtol=0, atol=1e-4)
    assert np.all(np.isfinite(ours))
    assert err <= TOL, err
    # the comparison is sensitive: one step fewer is far off
    assert np.abs(ours - x_init).max() > 100 * TOL


@pytest.mark.parametrize(
    "kw",
    [
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02),
    ],
)
def test_float32_alphas_cumprod_is_diffusers_bit_for_bit(kw):
    ours = D.schedules.float32_alphas_cumprod(kw["beta_schedule"], 1000, kw["beta_start"], kw["beta_end"])
    theirs = diffusers.DDPMScheduler(**kw).alphas_cumprod.numpy()
    exact = D.DDPMSchedule(**kw).alphas_cumprod
    assert np.array_equal(ours.astype(np.float32), theirs)
    print(f"{kw['beta_schedule']}: diffusers' float32 ᾱ vs float64 ᾱ: max rel {np.abs(theirs / exact - 1).max():.1e}")


def test_dpm_schedule_dtype():
    """diffusers holds ᾱ in float32: ᾱ₀ = float32(0.9999) puts σ_min = √((1 − ᾱ₀)/ᾱ₀) 8e-5 (relative) off, and the
    cosine betas near the 0.999 cap lose 1e-5. schedule_dtype="float32" (default) reproduces that to ≤ 1e-5;
    "float64" (exact, as ADM) ends ~2e-5 away from diffusers."""
    kw = dict(lambda_min_clipped=-5.1, timestep_spacing="trailing", final_sigmas_type="sigma_min", solver_type="heun")
    schedule = D.DDPMSchedule(beta_schedule="squaredcos_cap_v2")
    jmodel, tmodel = make_models("epsilon", schedule)
    x_init = latents()
    ref, ref_t = run_diffusers(
        diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", **kw),
        tmodel,
        x_init,
        set_kwargs={"num_inference_steps": 16},
    )
    assert ref_t[0] == 995  # clipped: the last 4 training steps have λ < −5.1
    errs = {}
    for dtype in ("float32", "float64"):
        ours = np.asarray(
            D.sample(
                jmodel,
                jnp.asarray(x_init),
                schedule=schedule,
                method="dpmpp_2m",
                num_steps=16,
                schedule_dtype=dtype,
                **kw,
            )
        )
        errs[dtype] = float(np.abs(ours - ref).max())
    print(
        f"dpm cosine, σ_min final, vs diffusers: schedule_dtype float32 {errs['float32']:.2e}, float64 "
        f"{errs['float64']:.2e}"
    )
    assert errs["float32"] <= TOL and errs["float32"] < errs["float64"] <= 1e-4


# --------------------------------------------------------------------------------------------------------------------
# ADM (DiT) DDPM with learned sigma and respacing, from the equations
# --------------------------------------------------------------------------------------------------------------------


def adm_p_sample_loop(model, x, betas, respacing, noise_fn):
    """ADM SpacedDiffusion.p_sample_loop, LEARNED_RANGE + EPSILON, clip_denoised=False, float64 numpy."""
    base_ac = np.cumprod(1.0 - betas)
    use = D.space_timesteps(len(betas), respacing)
    last, new_betas = 1.0, []
    for i, ac in enumerate(base_ac):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
    betas = np.array(new_betas)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1 - ac)
    coef2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    x = x.astype(np.float64)
    for step, i in enumerate(reversed(range(len(betas)))):
        out = np.asarray(model(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), use[i], jnp.float32)), np.float64)
        eps, v = out[..., : x.shape[-1]], out[..., x.shape[-1] :]
        min_log, max_log = post_log_var[i], np.log(betas[i])
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = np.sqrt(1 / ac[i]) * x - np.sqrt(1 / ac[i] - 1) * eps
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + (i != 0) * np.exp(0.5 * log_var) * noise_fn(step)
    return x


def test_ddpm_learned_sigma_adm_respacing_250(monkeypatch):
    schedule = D.DDPMSchedule(learned_sigma=True)
    jmodel, tmodel = make_models("epsilon", schedule, learned_sigma=True)
    x_init, key = latents(1), jax.random.key(3)
    ours = np.asarray(
        D.sample(jmodel, jnp.asarray(x_init), schedule=schedule, method="ddpm", num_steps=250, key=key, respacing="250")
    )
    ts = D.model_timesteps(schedule, "ddpm", 250, respacing="250")
    assert ts[:3].tolist() == [999, 995, 991] and ts[-3:].tolist() == [8, 4, 0]
    ref = adm_p_sample_loop(jmodel, x_init, schedule.betas, "250", lambda i: jax_noise(key, i))
    err_adm = float(np.abs(ours - ref).max())
    # the same trajectory through diffusers' DDPMScheduler with the ADM timesteps (and diffusers' float32 ᾱ)
    sch = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    ref_d, _ = run_diffusers(
        sch,
        tmodel,
        x_init,
        set_kwargs={"timesteps": ts.astype(int).tolist()},
        noise_fn=lambda i: jax_noise(key, i),
        monkeypatch=monkeypatch,
    )
    ours32 = np.asarray(
        D.sample(
            jmodel,
            jnp.asarray(x_init),
            schedule=schedule,
            method="ddpm",
            num_steps=250,
            key=key,
            respacing="250",
            schedule_dtype="float32",
        )
    )
    err_d = float(np.abs(ours32 - ref_d).max())
    print(f"ddpm learned sigma, ADM respacing 250: max err vs ADM reference {err_adm:.2e}, vs diffusers {err_d:.2e}")
    assert err_adm <= TOL and err_d <= TOL
    # respacing= is the same as passing its timesteps (with ADM's float64 arithmetic)
    custom = D.sample(
        jmodel,
        jnp.asarray(x_init),
        schedule=schedule,
        method="ddpm",
        num_steps=250,
        key=key,
        timesteps=ts.astype(int).tolist(),
        schedule_dtype="float64",
    )
    np.testing.assert_array_equal(np.asarray(custom), ours)
    # the learned variance matters: fixed-small variance gives another sample
    fixed = np.asarray(
        D.sample(
            jmodel,
            jnp.asarray(x_init),
            schedule=schedule,
            method="ddpm",
            num_steps=250,
            key=key,
            respacing="250",
            variance_type="fixed_small",
        )
    )
    assert np.abs(fixed - ours).max() > 1e-3


def test_ddim_adm_respacing_equals_diffusers_leading():
    schedule = D.DDPMSchedule()
    jmodel, tmodel = make_models("epsilon", schedule)
    x_init = latents(2)
    ours = np.asarray(
        D.sample(jmodel, jnp.asarray(x_init), schedule=schedule, method="ddim", num_steps=None, respacing="ddim50")
    )
    ref, _ = run_diffusers(
        diffusers.DDIMScheduler(clip_sample=False), tmodel, x_init, set_kwargs={"num_inference_steps": 50}
    )
    err = float(np.abs(ours - ref).max())
    print(f"ddim respacing='ddim50' vs DDIMScheduler(50, leading): {err:.2e}")
    assert err <= TOL


# --------------------------------------------------------------------------------------------------------------------
# PixArt's original DPM-Solver++ (continuous time_uniform times), from the DPM-Solver++ equations
# --------------------------------------------------------------------------------------------------------------------


def dpm_solver_pp_reference(model, x, betas, steps, lower_order_final=True):
    """Multistep DPM-Solver++(2M), NoiseScheduleVP('discrete'), t: 1 → 1/N uniform, float64 numpy."""
    n_train = len(betas)
    log_alpha_grid = 0.5 * np.cumsum(np.log(1.0 - betas))
    t_grid = np.arange(1, n_train + 1) / n_train

    def log_alpha(t):
        return np.interp(t, t_grid, log_alpha_grid)

    def lam(t):
        la = log_alpha(t)
        return la - 0.5 * np.log(1 - np.exp(2 * la))

    def data_pred(x, t):
        t_in = np.full((x.shape[0],), (t - 1.0 / n_train) * 1000.0, np.float32)
        eps = np.asarray(model(jnp.asarray(x, jnp.float32), jnp.asarray(t_in)), np.float64)
        la = log_alpha(t)
        return (x - np.sqrt(1 - np.exp(2 * la)) * eps) / np.exp(la)

    ts = np.linspace(1.0, 1.0 / n_train, steps + 1)
    x = x.astype(np.float64)
    models, times = [data_pred(x, ts[0])], [ts[0]]
    for step in range(1, steps + 1):
        t = ts[step]
        order = 1 if step == 1 else (min(2, steps + 1 - step) if lower_order_final else 2)
        s0 = times[-1]
        h = lam(t) - lam(s0)
        alpha_t = np.exp(log_alpha(t))
        sig = lambda u: np.sqrt(1 - np.exp(2 * log_alpha(u)))  # noqa: E731
        phi1 = np.expm1(-h)
        x_new = sig(t) / sig(s0) * x - alpha_t * phi1 * models[-1]
        if order == 2:
            r0 = (lam(s0) - lam(times[-2])) / h
            x_new = x_new - 0.5 * alpha_t * phi1 * (models[-1] - models[-2]) / r0
        x = x_new
        times.append(t)
        if step < steps:
            models.append(data_pred(x, t))
    return x


def test_pixart_original_dpm_solver():
    schedule = D.DDPMSchedule()
    jmodel, _ = make_models("epsilon", schedule)
    x_init = latents(3)
    ts = D.model_timesteps(schedule, "dpmpp_2m", 20, variant="dpm_solver")
    np.testing.assert_allclose(ts[:3], [999.0, 949.05, 899.1], atol=1e-3)
    assert len(ts) == 20 and abs(ts[-1] - 49.95) < 1e-3  # the last model call is at t = 0.051; it ends at 1e-3
    ours = np.asarray(
        D.sample(jmodel, jnp.asarray(x_init), schedule=schedule, method="dpmpp_2m", num_steps=20, variant="dpm_solver")
    )
    ref = dpm_solver_pp_reference(jmodel, x_init, schedule.betas, 20)
    err = float(np.abs(ours - ref).max())
    # PixArt-α's copy keeps order 2 at the final step for ≥ 10 steps
    ours_a = np.asarray(
        D.sample(
            jmodel,
            jnp.asarray(x_init),
            schedule=schedule,
            method="dpmpp_2m",
            num_steps=20,
            variant="dpm_solver",
            lower_order_final=False,
        )
    )
    ref_a = dpm_solver_pp_reference(jmodel, x_init, schedule.betas, 20, lower_order_final=False)
    err_a = float(np.abs(ours_a - ref_a).max())
    diffusers_variant = np.asarray(
        D.sample(jmodel, jnp.asarray(x_init), schedule=schedule, method="dpmpp_2m", num_steps=20)
    )
    print(
        f"PixArt DPM-Solver++ (Σ final order 1): {err:.2e}; (α, order 2): {err_a:.2e}; "
        f"original vs diffusers variant: {np.abs(ours - diffusers_variant).max():.2e}"
    )
    assert err <= TOL and err_a <= TOL
    assert np.abs(ours - ours_a).max() > 1e-4
    assert np.abs(ours - diffusers_variant).max() > 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Compilation, sharding, progress
# --------------------------------------------------------------------------------------------------------------------

JIT_CASES = [
    (D.DDPMSchedule(learned_sigma=True), "ddpm", {}),
    (D.DDPMSchedule(), "ddim", {"eta": 0.5}),
    (D.DDPMSchedule(), "dpmpp_2m", {}),
    (D.FlowSchedule(shift=3.0), "euler", {}),
    (D.FlowSchedule(shift=3.0), "heun", {}),
    (D.FlowSchedule(shift=3.0), "dpmpp_2m", {}),
]


@pytest.mark.parametrize("schedule,method,options", JIT_CASES, ids=[c[1] + str(i) for i, c in enumerate(JIT_CASES)])
def test_jit_traces_model_once_and_runs_sharded(schedule, method, options):
    kind = "flow" if isinstance(schedule, D.FlowSchedule) else "epsilon"
    base, _ = make_models(
        kind, schedule if kind != "flow" else None, learned_sigma=getattr(schedule, "learned_sigma", False)
    )
    traces = {"n": 0}

    def model(x, t):
        traces["n"] += 1
        return base(x, t)

    run = jax.jit(lambda x, k: D.sample(model, x, schedule=schedule, method=method, num_steps=12, key=k, **options))
    key = jax.random.key(0)
    x8 = latents(4, batch=8)
    single = np.asarray(run(jnp.asarray(x8), key))
    run(jnp.asarray(latents(5, batch=8)), key)
    assert traces["n"] == 1, f"model traced {traces['n']} times: the loop is not a single compiled loop"

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    xs = jax.device_put(jnp.asarray(x8), sharding)
    with jax.set_mesh(mesh):
        sharded = run(xs, key)
    assert sharded.sharding.is_equivalent_to(sharding, 4) or len(sharded.sharding.device_set) == 8
    err = float(np.abs(np.asarray(sharded) - single).max())
    print(f"{method}: sharded (8 devices) vs unsharded max diff {err:.1e}")
    assert err <= 1e-6


def test_progress_callback():
    calls = []
    schedule = D.FlowSchedule(shift=3.0)
    jmodel, _ = make_models("flow")
    out = D.sample(
        jmodel,
        jnp.asarray(latents()),
        schedule=schedule,
        method="heun",
        num_steps=4,
        progress=lambda i, n: calls.append((i, n)),
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(calls) == [(i, 7) for i in range(1, 8)]


# --------------------------------------------------------------------------------------------------------------------
# Config mapping and errors
# --------------------------------------------------------------------------------------------------------------------


def test_from_diffusers_scheduler_config_defaults():
    s, m, o = D.from_diffusers_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": False})
    assert (s, m) == (D.DDPMSchedule(), "ddim") and o["timestep_spacing"] == "leading" and o["clip_sample"] is False
    s, m, o = D.from_diffusers_scheduler_config({"_class_name": "DDPMScheduler"})
    assert o["clip_sample"] is True  # diffusers' class default
    s, m, o = D.from_diffusers_scheduler_config(config_of(diffusers.DDPMScheduler(variance_type="learned_range")))
    assert s.learned_sigma and m == "ddpm"
    flux = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    }
    s, m, o = D.from_diffusers_scheduler_config(flux)
    assert m == "euler" and s.dynamic_shift == D.FLUX_DYNAMIC_SHIFT and abs(s.mu(4096) - 1.15) < 1e-12
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        D.from_diffusers_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="PNDMScheduler"):
        D.from_diffusers_scheduler_config({"_class_name": "PNDMScheduler"})


def test_errors_name_the_bad_value():
    x = jnp.zeros((B, H, W, C))
    model = lambda x, t: x  # noqa: E731
    ddpm, flow = D.DDPMSchedule(), D.FlowSchedule(dynamic_shift=True)
    with pytest.raises(ValueError, match="'euler'"):
        D.sample(model, x, schedule=ddpm, method="euler", num_steps=4)
    with pytest.raises(ValueError, match="bogus"):
        D.sample(model, x, schedule=ddpm, method="ddim", num_steps=4, bogus=1)
    with pytest.raises(ValueError, match="key="):
        D.sample(model, x, schedule=ddpm, method="ddpm", num_steps=4)
    with pytest.raises(ValueError, match="image_seq_len"):
        D.sample(model, x, schedule=flow, method="euler", num_steps=4)
    with pytest.raises(ValueError, match="250 steps"):
        D.sample(model, x, schedule=ddpm, method="ddpm", num_steps=100, respacing="250", key=jax.random.key(0))
    with pytest.raises(ValueError, match="learned_sigma"):
        D.sample(lambda x, t: jnp.concatenate([x, x], -1), x, schedule=ddpm, method="ddim", num_steps=4)
    with pytest.raises(ValueError, match="variant='dpm_solver' only"):
        D.sample(model, x, schedule=ddpm, method="dpmpp_2m", num_steps=4, t_end=1e-3)
    with pytest.raises(ValueError, match="beta_schedule 'cosine'"):
        D.DDPMSchedule(beta_schedule="cosine")
    assert math.isfinite(float(D.sample(model, x, schedule=ddpm, method="ddim", num_steps=4).sum()))


def test_ddpm_sample_does_not_depend_on_the_batch_it_is_drawn_in():
    """Per-example step noise: the first 3 samples of a batch of 5 equal a batch of 3 (device padding is safe)."""
    schedule = D.DDPMSchedule()
    model_fn = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000.0)  # noqa: E731
    latents = jax.random.normal(jax.random.key(1), (5, 4, 4, 2))
    key = jax.random.key(7)
    five = D.sample(model_fn, latents, schedule=schedule, method="ddpm", num_steps=6, key=key)
    three = D.sample(model_fn, latents[:3], schedule=schedule, method="ddpm", num_steps=6, key=key)
    np.testing.assert_array_equal(np.asarray(five[:3]), np.asarray(three))
