"""Flow-matching samplers for SD3/SD3.5 and Flux: the sigmas and timesteps of ``FlowMatchEulerDiscreteScheduler``
(every config option, as the SD3 and Flux pipelines call ``set_timesteps``), the Euler loop vs the diffusers loop,
and SD3's reference sampler (Stability's ``sd3_infer.py``: k-diffusion's DPM++ 2M on ``get_sigmas``) vs a torch
transcription of the published algorithm, with analytic model functions."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import nhwc, torch_nchw

import dit_jax.diffusion as D
from dit_jax.diffusion.samplers import make_trajectory, sd3_reference_sigmas

TOL = 1e-6
B, H, W, C = 2, 4, 4, 4
EULER_MODULE = "diffusers.schedulers.scheduling_flow_match_euler_discrete"

# Hub scheduler configs (MODELS.md §3.4, §4.4; FAMILIES.md): SD3/SD3.5 write every key with its default but shift.
SD35_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
FLUX_DEV_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_CONFIG = {**FLUX_DEV_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}


def calculate_shift(image_seq_len, cfg) -> float:
    """The pipelines' μ: the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def config_of(scheduler) -> dict:
    return dict(scheduler.config, _class_name=type(scheduler).__name__)


def pipeline_calls(pipeline: str, scheduler, n: int, image_seq_len: int) -> tuple[dict, dict]:
    """(diffusers ``set_timesteps`` kwargs, our ``sample`` options) as each pipeline passes them.

    SD3: no sigmas, μ only with a dynamic-shift config (image_seq_len = (h/p)·(w/p)); we always pass image_seq_len.
    Flux: sigmas = linspace(1, 1/n, n) and μ from the packed token count, always (schnell's scheduler ignores μ).
    """
    cfg = scheduler.config
    if pipeline == "sd3":
        theirs = {"num_inference_steps": n}
        if cfg.use_dynamic_shifting:
            theirs["mu"] = calculate_shift(image_seq_len, cfg)
        return theirs, {"image_seq_len": image_seq_len}
    sigmas = np.linspace(1.0, 1 / n, n)
    theirs = {"num_inference_steps": n, "sigmas": sigmas, "mu": calculate_shift(image_seq_len, cfg)}
    return theirs, {"sigmas": sigmas, "image_seq_len": image_seq_len}


# --------------------------------------------------------------------------------------------------------------------
# 1. The exact sigma and timestep lists
# --------------------------------------------------------------------------------------------------------------------

SIGMA_CASES = {
    # name: (scheduler config, pipeline, image_seq_len (SD3: latent tokens (h/2)·(w/2); Flux: packed tokens))
    "sd3_medium_shift3": ({"shift": 3.0}, "sd3", 4096),
    "sd3_shift1": ({"shift": 1.0}, "sd3", 4096),
    "sd35_hub_config": (SD35_CONFIG, "sd3", 4096),
    "sd3_shift_0.1": ({"shift": 0.1}, "sd3", 4096),  # float32 training table: σ_max = 0.99999976, not 1
    "sd3_shift_10.9": ({"shift": 10.9}, "sd3", 1024),
    "sd3_dynamic_config": ({**SD35_CONFIG, "use_dynamic_shifting": True}, "sd3", 1024),
    "flux_dev_1024px": (FLUX_DEV_CONFIG, "flux", 4096),
    "flux_dev_512px": (FLUX_DEV_CONFIG, "flux", 1024),
    "flux_dev_1360x768": (FLUX_DEV_CONFIG, "flux", 48 * 85),
    "flux_schnell": (FLUX_SCHNELL_CONFIG, "flux", 4096),
    "flux_linear_time_shift": ({**FLUX_DEV_CONFIG, "time_shift_type": "linear"}, "flux", 2048),
    "flux_shift_terminal": ({**FLUX_DEV_CONFIG, "shift_terminal": 0.1}, "flux", 4096),
    "sd3_shift_terminal": ({"shift": 3.0, "shift_terminal": 0.02}, "sd3", 4096),
    "sd3_karras": ({"shift": 3.0, "use_karras_sigmas": True}, "sd3", 4096),
    "sd3_exponential": ({"shift": 3.0, "use_exponential_sigmas": True}, "sd3", 4096),
    "sd3_beta": ({"shift": 3.0, "use_beta_sigmas": True}, "sd3", 4096),
    "flux_karras": ({**FLUX_DEV_CONFIG, "use_karras_sigmas": True}, "flux", 4096),
    "flux_exponential": ({**FLUX_DEV_CONFIG, "use_exponential_sigmas": True}, "flux", 1024),
    "sd3_invert_sigmas": ({"shift": 3.0, "invert_sigmas": True}, "sd3", 4096),
    "flux_invert_sigmas": ({**FLUX_DEV_CONFIG, "invert_sigmas": True}, "flux", 4096),
}


@pytest.mark.parametrize("name", list(SIGMA_CASES))
def test_sigmas_and_timesteps_match_diffusers(name):
    config, pipeline, seq_len = SIGMA_CASES[name]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    schedule, method, options = D.from_diffusers_scheduler_config(config_of(scheduler))
    assert method == "euler"
    worst_s = worst_t = 0.0
    for n in (1, 4, 28, 50):
        theirs, ours = pipeline_calls(pipeline, scheduler, n, seq_len)
        if n == 1 and config.get("shift_terminal"):  # σ = 1 cannot be stretched (diffusers: NaN)
            with pytest.raises(ValueError, match="not finite"):
                make_trajectory(schedule, method, n, **options, **ours)
            continue
        scheduler.set_timesteps(**theirs)
        traj = make_trajectory(schedule, method, n, **options, **ours)
        ref_s, ref_t = scheduler.sigmas.numpy(), scheduler.timesteps.numpy()
        assert traj.sigmas.dtype == np.float32 and traj.sigmas.shape == ref_s.shape == (n + 1,)
        assert traj.model_t.shape == ref_t.shape == (n,)
        worst_s = max(worst_s, float(np.abs(traj.sigmas - ref_s).max()))
        worst_t = max(worst_t, float(np.abs(traj.model_t - ref_t).max()))
        assert np.array_equal(traj.sigmas, ref_s) and np.array_equal(traj.model_t, ref_t), (n, traj.sigmas, ref_s)
    print(f"{name}: n ∈ (1, 4, 28, 50): max |σ − diffusers| = {worst_s:.1e}, max |t − diffusers| = {worst_t:.1e}")
    assert worst_s <= TOL and worst_t <= TOL


def test_sd3_28_steps_last_sigma():
    """FAMILIES.md: SD3 (shift 3, 28 steps) ends at σ = 0.00893 before 0: linspace from an already shifted σ_min,
    shifted again."""
    traj = make_trajectory(D.FlowSchedule(shift=3.0), "euler", 28)
    assert traj.sigmas[0] == 1.0 and traj.sigmas[-1] == 0.0
    assert abs(float(traj.sigmas[-2]) - 0.00893) < 5e-6 and abs(float(traj.sigmas[1]) - 0.98738) < 5e-6


@pytest.mark.parametrize(
    "config,kwargs",
    [
        ({"shift": 3.0}, {"timesteps": [1000.0, 750.5, 500.0, 120.25]}),
        ({"shift": 3.0}, {"timesteps": [999.0, 700.0, 300.0, 20.0], "sigmas": [1.0, 0.8, 0.4, 0.05]}),
        (FLUX_DEV_CONFIG, {"timesteps": [1000.0, 800.0, 600.0, 400.0, 200.0], "mu": 0.93}),
        ({"shift": 3.0, "invert_sigmas": True}, {"timesteps": [1000.0, 750.0, 500.0, 250.0]}),
    ],
)
def test_explicit_timesteps_match_diffusers(config, kwargs):
    """``set_timesteps(timesteps=...)``: the model timesteps as given, sigmas from them (or from ``sigmas``)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    schedule, method, options = D.from_diffusers_scheduler_config(config_of(scheduler))
    scheduler.set_timesteps(**kwargs)
    traj = make_trajectory(schedule, method, len(kwargs["timesteps"]), **options, **kwargs)
    assert np.array_equal(traj.sigmas, scheduler.sigmas.numpy())
    assert np.array_equal(traj.model_t, scheduler.timesteps.numpy())


# --------------------------------------------------------------------------------------------------------------------
# 2. The Euler loop vs the diffusers loop (analytic velocity model, the same formula in JAX/NHWC and torch/NCHW)
# --------------------------------------------------------------------------------------------------------------------


def velocity(xp, x, t, roll):
    return 0.7 * x + 0.3 * xp.sin(roll(x) + t / 250.0) * xp.cos(t / 400.0)


def jax_model(x, t):
    assert t.shape == (x.shape[0],) and t.dtype == jnp.float32
    return velocity(jnp, x, t[:, None, None, None], lambda a: jnp.roll(a, 1, axis=-1))


def torch_model(x, t):
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return velocity(torch, x, tt, lambda a: torch.roll(a, 1, dims=1))


def latents(seed: int = 0, batch: int = B) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, H, W, C)).astype(np.float32)


LOOP_CASES = {
    # name: (scheduler config, pipeline, steps, image_seq_len)
    "sd3_medium_28": ({"shift": 3.0}, "sd3", 28, 4096),
    "sd3_shift1_50": ({"shift": 1.0}, "sd3", 50, 4096),
    "sd35_large_turbo_4": (SD35_CONFIG, "sd3", 4, 4096),
    "flux_dev_28": (FLUX_DEV_CONFIG, "flux", 28, 4096),
    "flux_dev_50_512px": (FLUX_DEV_CONFIG, "flux", 50, 1024),
    "flux_schnell_4": (FLUX_SCHNELL_CONFIG, "flux", 4, 4096),
    "sd3_karras_10": ({"shift": 3.0, "use_karras_sigmas": True}, "sd3", 10, 4096),
    "sd3_invert_sigmas_6": ({"shift": 3.0, "invert_sigmas": True}, "sd3", 6, 4096),
    "sd3_stochastic_8": ({"shift": 3.0, "stochastic_sampling": True}, "sd3", 8, 4096),
}


@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_euler_loop_matches_diffusers(name, monkeypatch):
    config, pipeline, n, seq_len = LOOP_CASES[name]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    schedule, method, options = D.from_diffusers_scheduler_config(config_of(scheduler))
    theirs, ours_opts = pipeline_calls(pipeline, scheduler, n, seq_len)
    x_init = latents()
    key = jax.random.key(3)
    ours = np.asarray(
        D.sample(jax_model, jnp.asarray(x_init), schedule=schedule, method=method, num_steps=n, key=key,
                 **options, **ours_opts)
    )  # fmt: skip

    calls = {"i": 0}
    if options.get("stochastic_sampling"):  # diffusers draws the noise our sampler draws at step i
        noise = np.asarray(jax.jit(jax.vmap(lambda i: D.step_noise(key, i, (B, H, W, C))))(jnp.arange(n)))
        monkeypatch.setattr(f"{EULER_MODULE}.randn_tensor", lambda shape, **_: torch_nchw(noise[calls["i"]]))
    scheduler.set_timesteps(**theirs)
    x = torch_nchw(x_init)
    for t in scheduler.timesteps:
        x = scheduler.step(torch_model(x, t.expand(B)), t, x).prev_sample
        calls["i"] += 1
    ref = nhwc(x)

    err = float(np.abs(ours - ref).max())
    print(f"{name}: euler {n} steps, max|ours − diffusers| = {err:.2e} (max|x| = {np.abs(ref).max():.2f})")
    assert np.all(np.isfinite(ours)) and err <= TOL, err
    assert np.abs(ours - x_init).max() > 1e-2  # the comparison is not trivial


# --------------------------------------------------------------------------------------------------------------------
# 3. SD3's reference sampler: k-diffusion's DPM++ 2M (and Euler) on sd3_infer.py's get_sigmas
# --------------------------------------------------------------------------------------------------------------------


def sai_sigmas(shift: float, steps: int) -> torch.Tensor:
    """``sd3_infer.get_sigmas`` with ``sd3_impls.ModelSamplingDiscreteFlow(shift)``, all in torch float32: the
    training table σ(t) = shift·(t/1000) / (1 + (shift − 1)·t/1000), t = 1 … 1000 (unshifted when shift = 1);
    timesteps linspace(1000·σ_max, 1000·σ_min, steps); σ(t) of each; 0 appended."""

    def sigma(t):
        t = t / 1000.0
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)

    table = sigma(torch.arange(1, 1001, 1))
    ts = torch.linspace(table[-1] * 1000, table[0] * 1000, steps)
    return torch.tensor([float(sigma(t)) for t in ts] + [0.0], dtype=torch.float32)


def sai_denoiser(x, sigma):
    """SD3's flow denoiser: the model sees 1000·σ, D = x − σ·v."""
    s = sigma.reshape(-1, 1, 1, 1)
    return x - torch_model(x, sigma * 1000.0) * s


def k_dpmpp_2m(x, sigmas):
    """k-diffusion ``sample_dpmpp_2m`` (DPM-Solver++(2M), Lu et al. 2022) in torch float32: t = −log σ; the first
    step and the step to σ = 0 are first order, x ← (σ_next/σ)·x − expm1(−h)·D; the others use
    D' = (1 + 1/(2r))·D − D_prev/(2r), r = h_prev/h."""
    ones = x.new_ones([x.shape[0]])
    d_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = sai_denoiser(x, s * ones)
        t, t_next = -torch.log(s), -torch.log(s_next)
        h = t_next - t
        ratio = torch.exp(-t_next) / torch.exp(-t)
        if d_prev is None or s_next == 0:
            x = ratio * x - torch.expm1(-h) * d
        else:
            r = h_prev / h
            x = ratio * x - torch.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev)
        d_prev, h_prev = d, h
    return x


def k_euler(x, sigmas):
    """k-diffusion ``sample_euler`` (no churn): d = (x − D)/σ, x ← x + d·(σ_next − σ)."""
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        d = (x - sai_denoiser(x, sigmas[i] * ones)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0, 2.5])
@pytest.mark.parametrize("n", [4, 28, 40, 50])
def test_sd3_reference_sigmas_are_get_sigmas(shift, n):
    ours, ref = sd3_reference_sigmas(shift, n), sai_sigmas(shift, n).numpy()
    assert np.array_equal(ours, ref)
    diffusers_sig = make_trajectory(D.FlowSchedule(shift=shift), "euler", n).sigmas
    ulp = np.spacing(np.maximum(np.abs(ref), np.float32(1e-30)).astype(np.float32))
    rel = float((np.abs(diffusers_sig - ref) / ulp).max())
    print(f"shift {shift}, {n} steps: SAI (float32) vs diffusers (float64) sigmas differ by ≤ {rel:.0f} ulp")
    assert np.abs(diffusers_sig - ref).max() <= 1e-6


@pytest.mark.parametrize(
    "name,shift,n",
    [("sd3_medium", 1.0, 50), ("sd3.5_medium", 3.0, 50), ("sd3.5_large", 3.0, 40), ("short", 3.0, 4)],
)
def test_k_diffusion_dpmpp_2m_matches_sd3_reference(name, shift, n):
    """Tolerance 1e-6 × max(1, max|x|): the second-order extrapolation amplifies float32 noise in D by up to
    1 + 1/r (≈ 5.5 at the last second-order step of short schedules), so the float32 reference is itself ~1e-6 from
    its float64 evaluation; both comparisons are printed."""
    schedule = D.FlowSchedule(shift=shift)
    x_init = latents(1)
    ours = np.asarray(
        D.sample(jax_model, jnp.asarray(x_init), schedule=schedule, method="dpmpp_2m", num_steps=n,
                 variant="k_diffusion", image_seq_len=4096)
    )  # fmt: skip
    sigmas = sai_sigmas(shift, n)
    ref = nhwc(k_dpmpp_2m(torch_nchw(x_init), sigmas))
    ref64 = k_dpmpp_2m(torch_nchw(x_init).double(), sigmas.double()).numpy().transpose(0, 2, 3, 1)
    traj = make_trajectory(schedule, "dpmpp_2m", n, variant="k_diffusion")
    assert np.array_equal(traj.sigmas, sigmas.numpy())
    assert np.array_equal(traj.model_t, sigmas.numpy()[:-1] * np.float32(1000))
    err, err64, ref_err64 = (float(np.abs(a - b).max()) for a, b in ((ours, ref), (ours, ref64), (ref, ref64)))
    # our diffusers-style flow DPM-Solver++ (λ = log((1 − σ)/σ), int timesteps) is a different sampler
    diffusers_dpm = np.asarray(
        D.sample(jax_model, jnp.asarray(x_init), schedule=schedule, method="dpmpp_2m", num_steps=n)
    )
    other = float(np.abs(diffusers_dpm - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    print(
        f"{name} (shift {shift}, {n} steps): k-diffusion DPM++ 2M max|ours − reference| = {err:.2e} "
        f"(max|x| = {scale:.2f}); vs its float64 evaluation: ours {err64:.2e}, reference {ref_err64:.2e}; "
        f"the diffusers-variant dpmpp_2m is {other:.2e} away"
    )
    assert np.all(np.isfinite(ours)) and err <= TOL * scale and err64 <= TOL * scale, (err, err64)
    assert other > 1e-3


def test_euler_matches_sd3_reference_euler():
    """SD3.5-large-turbo's ``sample_euler`` (shift 3, 4 steps) on SAI's float32 sigmas = our diffusers Euler."""
    x_init = latents(2)
    ours = np.asarray(
        D.sample(jax_model, jnp.asarray(x_init), schedule=D.FlowSchedule(shift=3.0), method="euler", num_steps=4)
    )
    ref = nhwc(k_euler(torch_nchw(x_init), sai_sigmas(3.0, 4)))
    err = float(np.abs(ours - ref).max())
    print(f"sd3.5 large turbo: euler vs SAI sample_euler max diff {err:.2e}")
    assert err <= TOL


def test_k_diffusion_variant_compiles_once():
    traces = {"n": 0}

    def model(x, t):
        traces["n"] += 1
        return jax_model(x, t)

    run = jax.jit(
        lambda x: D.sample(model, x, schedule=D.FlowSchedule(shift=3.0), method="dpmpp_2m", num_steps=12,
                           variant="k_diffusion")
    )  # fmt: skip
    run(jnp.asarray(latents(4)))
    run(jnp.asarray(latents(5)))
    assert traces["n"] == 1


# --------------------------------------------------------------------------------------------------------------------
# 4. Config reader and errors
# --------------------------------------------------------------------------------------------------------------------


def test_config_reader_maps_every_flow_match_euler_option():
    s, m, o = D.from_diffusers_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **SD35_CONFIG})
    assert (s, m, o) == (D.FlowSchedule(shift=3.0), "euler", {})
    config = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        **FLUX_DEV_CONFIG,
        "time_shift_type": "linear",
        "shift_terminal": 0.1,
        "use_beta_sigmas": True,
        "invert_sigmas": True,
        "stochastic_sampling": True,
    }
    s, m, o = D.from_diffusers_scheduler_config(config)
    assert s == D.FlowSchedule(shift=3.0, dynamic_shift=True, time_shift_type="linear")
    assert o == {"shift_terminal": 0.1, "use_beta_sigmas": True, "invert_sigmas": True, "stochastic_sampling": True}
    with pytest.raises(ValueError, match="use_karras_sigmas.*use_exponential_sigmas"):
        D.from_diffusers_scheduler_config(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True, "use_exponential_sigmas": 1}
        )
    with pytest.raises(ValueError, match="base_shift"):
        D.from_diffusers_scheduler_config(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": None}
        )
    with pytest.raises(ValueError, match="time_shift_type='cubic'"):
        D.from_diffusers_scheduler_config(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "cubic"}
        )


def test_flow_option_errors():
    x = jnp.zeros((B, H, W, C))
    model = lambda x, t: x  # noqa: E731
    const, flux = D.FlowSchedule(shift=3.0), D.FlowSchedule(dynamic_shift=True)
    with pytest.raises(ValueError, match="key="):
        D.sample(model, x, schedule=const, method="euler", num_steps=4, stochastic_sampling=True)
    with pytest.raises(ValueError, match="mu= given"):
        make_trajectory(const, "euler", 4, mu=0.8)
    with pytest.raises(ValueError, match="image_seq_len"):
        make_trajectory(flux, "euler", 4, sigmas=np.linspace(1, 0.25, 4))
    with pytest.raises(ValueError, match="one of mu= and image_seq_len="):
        make_trajectory(flux, "euler", 4, mu=0.8, image_seq_len=4096)
    with pytest.raises(ValueError, match="num_steps=4 entries"):
        make_trajectory(flux, "euler", 4, sigmas=np.linspace(1, 0.2, 5), mu=1.0)
    with pytest.raises(ValueError, match="5 sigmas but 4 timesteps"):
        make_trajectory(const, "euler", None, sigmas=np.linspace(1, 0.2, 5), timesteps=[900, 600, 300, 100])
    with pytest.raises(ValueError, match="at most one of"):
        make_trajectory(const, "euler", 4, use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="shift_terminal"):
        make_trajectory(const, "euler", 4, shift_terminal=1.5)
    with pytest.raises(ValueError, match=r"\['solver_order'\] apply to variant='diffusers' only"):
        make_trajectory(const, "dpmpp_2m", 4, variant="k_diffusion", solver_order=2)
    with pytest.raises(ValueError, match="dynamic_shift"):
        make_trajectory(flux, "dpmpp_2m", 4, variant="k_diffusion")
    with pytest.raises(ValueError, match="unknown variant"):
        make_trajectory(const, "dpmpp_2m", 4, variant="comfy")
    with pytest.raises(ValueError, match="stochastic_sampling"):
        make_trajectory(const, "heun", 4, stochastic_sampling=True)
    # image_seq_len describes the latents: without a dynamic shift it changes nothing (Flux schnell)
    a, b = make_trajectory(const, "euler", 6), make_trajectory(const, "euler", 6, image_seq_len=4096)
    assert np.array_equal(a.sigmas, b.sigmas) and np.array_equal(a.model_t, b.model_t)
