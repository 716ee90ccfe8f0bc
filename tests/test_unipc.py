"""UniPC (diffusers ``UniPCMultistepScheduler``): our ``sample(method="unipc")`` vs the diffusers loop stepping the
same analytic model, for Wan 2.1's flow config (flow_shift 3 and 5, 50 and 10 steps) and VP configs (ε, v, x₀;
bh1/bh2, orders 1–3, predict_x0, disable_corrector, sigma_min); the timesteps handed to the model; jit (traced once,
sharded == unsharded); the scheduler-config mapping and the sampler policy; one clear error per bad setting."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from parity import nhwc, torch_nchw

import dit_jax.diffusion as D

TOL = 1e-5  # relative to max |x| of the diffusers result
B, H, W, C = 2, 4, 4, 4

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (every key as the Hub writes it)
WAN_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def make_models(kind: str, table: np.ndarray | None):
    """(jax model NHWC, torch model NCHW): the same formula of (x, t). The ε model stays near the Gaussian optimum
    √(1 − ᾱ)·x (ᾱ looked up at the integer timestep) so that x₀ stays bounded."""

    def mean(x, t, ab, roll, sin, cos, tanh, sqrt):
        g = sin(roll(x) + t / 250.0)
        if kind == "epsilon":
            return sqrt(1 - ab) * x + 0.3 * sqrt(ab) * g
        if kind == "v_prediction":
            return 0.5 * tanh(x) + 0.2 * g
        if kind == "sample":
            return 1.5 * tanh(x) + 0.2 * g
        return 0.7 * x + 0.3 * g * cos(t / 400.0)  # flow velocity

    def jax_model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == jnp.float32
        tt = t[:, None, None, None]
        ab = None if table is None else jnp.asarray(table)[t.astype(jnp.int32)][:, None, None, None]
        return mean(x, tt, ab, lambda a: jnp.roll(a, 1, axis=-1), jnp.sin, jnp.cos, jnp.tanh, jnp.sqrt)

    def torch_model(x, t):
        tt = t.to(torch.float32).reshape(-1, 1, 1, 1)
        ab = None if table is None else torch.from_numpy(table)[t.long()].reshape(-1, 1, 1, 1)
        return mean(x, tt, ab, lambda a: torch.roll(a, 1, dims=1), torch.sin, torch.cos, torch.tanh, torch.sqrt)

    return jax_model, torch_model


def latents(seed: int = 0, batch: int = B) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, H, W, C)).astype(np.float32)


def run_diffusers(scheduler, torch_model, x0: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
    """The WanPipeline loop: ``for t in timesteps: x = step(model(x, t.expand(B)), t, x)``; also the timesteps seen."""
    scheduler.set_timesteps(n)
    x, seen = torch_nchw(x0), []
    for t in scheduler.timesteps:
        tb = t.expand(x.shape[0])
        seen.append(tb.tolist())
        x = scheduler.step(torch_model(x, tb), t, x).prev_sample
    return nhwc(x), seen


def run_ours(schedule, method, options, jax_model, x0: np.ndarray, n: int) -> tuple[np.ndarray, list[list[float]]]:
    """``sample`` under jit; the timesteps the model got, recorded from inside the loop."""
    seen = []

    def model(x, t):
        jax.debug.callback(lambda tv: seen.append(np.asarray(tv).tolist()), t, ordered=True)
        return jax_model(x, t)

    fn = jax.jit(lambda x: D.sample(model, x, schedule=schedule, method=method, num_steps=n, **options))
    out = np.asarray(fn(jnp.asarray(x0)))
    jax.effects_barrier()
    return out, seen


def check_parity(config: dict, n: int, name: str) -> None:
    scheduler = diffusers.UniPCMultistepScheduler.from_config(config)
    schedule, method, options = D.from_diffusers_scheduler_config(dict(config))
    assert method == "unipc"
    table = None
    if isinstance(schedule, D.DDPMSchedule):
        table = scheduler.alphas_cumprod.numpy().astype(np.float32)
    jax_model, torch_model = make_models(getattr(schedule, "prediction", "flow"), table)
    x0 = latents()
    ref, ref_t = run_diffusers(scheduler, torch_model, x0, n)
    ours, our_t = run_ours(schedule, method, options, jax_model, x0, n)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"{name}: {n} steps, max|ours − diffusers|/max|x| = {err:.2e}, timesteps {ref_t[0][0]} … {ref_t[-1][0]}")
    assert np.all(np.isfinite(ref)) and np.all(np.isfinite(ours))
    np.testing.assert_array_equal(np.asarray(our_t, np.float32), np.asarray(ref_t, np.float32))
    np.testing.assert_array_equal(D.model_timesteps(schedule, method, n, **options), np.asarray(ref_t)[:, 0])
    assert err <= TOL, err
    assert np.abs(ref - x0).max() > 1000 * TOL * np.abs(ref).max()  # the comparison is sensitive


# --------------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 10])
@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
def test_wan_flow_config_matches_diffusers(flow_shift, n):
    check_parity({**WAN_CONFIG, "flow_shift": flow_shift}, n, f"wan flow_shift={flow_shift}")


FLOW_VARIANTS = {
    "order3_bh2": {"solver_order": 3},
    "disable_corrector": {"disable_corrector": [0, 3, 4]},
    "sigma_min_no_lower_final": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "bh1_sigma_min": {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "shift1": {"flow_shift": 1.0, "solver_order": 1},
}


@pytest.mark.parametrize("name", list(FLOW_VARIANTS))
def test_flow_options_match_diffusers(name):
    check_parity({**WAN_CONFIG, **FLOW_VARIANTS[name]}, 8, name)


VP_CASES = {
    # name: (config, steps)
    "eps_scaled_linear": ({"_class_name": "UniPCMultistepScheduler", **SD_BETAS}, 20),
    "v_prediction": ({"_class_name": "UniPCMultistepScheduler", **SD_BETAS, "prediction_type": "v_prediction"}, 20),
    "v_linear": ({"_class_name": "UniPCMultistepScheduler", "prediction_type": "v_prediction"}, 20),
    "sample_order3_leading": (
        {"_class_name": "UniPCMultistepScheduler", "prediction_type": "sample", "solver_order": 3}
        | {"timestep_spacing": "leading", "steps_offset": 1},
        12,
    ),
    "eps_noise_form_bh1_trailing": (
        {"_class_name": "UniPCMultistepScheduler", **SD_BETAS, "predict_x0": False, "solver_type": "bh1"}
        | {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing", "disable_corrector": [2]},
        12,
    ),
    "v_noise_form": (
        {"_class_name": "UniPCMultistepScheduler", **SD_BETAS, "prediction_type": "v_prediction"}
        | {"predict_x0": False, "final_sigmas_type": "sigma_min", "lower_order_final": False},
        10,
    ),
    "dpm_solver_type_reads_bh2": ({"_class_name": "UniPCMultistepScheduler", **SD_BETAS, "solver_type": "midpoint"}, 6),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' np.array(tensor) under numpy 2
@pytest.mark.parametrize("name", list(VP_CASES))
def test_vp_configs_match_diffusers(name):
    config, n = VP_CASES[name]
    check_parity(config, n, name)


@pytest.mark.parametrize(
    "changes, set_kwargs, options",
    [
        ({"shift_terminal": 0.1}, {}, {}),
        ({"use_dynamic_shifting": True}, {"mu": 0.8}, {"mu": 0.8}),
        ({"final_sigmas_type": "sigma_min", "flow_shift": 1.0}, {}, {}),
    ],
)
def test_flow_sigmas_and_timesteps(changes, set_kwargs, options):
    """The scheduler's sigmas (float32) and model timesteps for the other flow settings, bit for bit."""
    config = {**WAN_CONFIG, **changes}
    scheduler = diffusers.UniPCMultistepScheduler.from_config(config)
    scheduler.set_timesteps(12, **set_kwargs)
    schedule, method, mapped = D.from_diffusers_scheduler_config(config)
    traj = D.make_trajectory(schedule, method, 12, **mapped, **options)
    np.testing.assert_array_equal(traj.sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(traj.model_t, scheduler.timesteps.numpy().astype(np.float32))


# --------------------------------------------------------------------------------------------------------------------
# jit, sharding, policy
# --------------------------------------------------------------------------------------------------------------------


def test_jit_traces_once_and_runs_sharded():
    schedule, method, options = D.from_diffusers_scheduler_config(WAN_CONFIG)
    jax_model, _ = make_models("flow", None)
    traces = []

    def model(x, t):
        traces.append(1)
        return jax_model(x, t)

    fn = jax.jit(lambda x: D.sample(model, x, schedule=schedule, method=method, num_steps=6, **options))
    x = latents(batch=8)
    plain = np.asarray(fn(jnp.asarray(x)))
    assert len(traces) == 1 and D.make_trajectory(schedule, method, 6, **options).num_model_calls == 6
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = fn(jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec("data"))))
    np.testing.assert_allclose(np.asarray(sharded), plain, rtol=0, atol=1e-6)
    low = D.sample(jax_model, jnp.asarray(x, jnp.bfloat16), schedule=schedule, method=method, num_steps=3, **options)
    assert low.dtype == jnp.bfloat16  # the loop carries float32, the result has the latents' dtype


def test_learned_sigma_model_uses_its_mean():
    """A DiT-style model with 2·C output channels: unipc drops the variance half, as diffusers' pipelines do."""
    schedule = D.DDPMSchedule(learned_sigma=True)
    mean_model, _ = make_models("epsilon", np.asarray(schedule.alphas_cumprod, np.float32))
    both = lambda x, t: jnp.concatenate([mean_model(x, t), jnp.tanh(x) + 5.0], axis=-1)  # noqa: E731
    x = jnp.asarray(latents())
    ours = D.sample(both, x, schedule=schedule, method="unipc", num_steps=5)
    plain = D.sample(mean_model, x, schedule=D.DDPMSchedule(), method="unipc", num_steps=5)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))


def test_policy_accepts_the_unipc_config():
    schedule, method, options = D.from_diffusers_scheduler_config(WAN_CONFIG)
    assert schedule == D.FlowSchedule(shift=3.0) and method == "unipc"
    assert options == {
        "solver_order": 2,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": (),
        "final_sigmas_type": "zero",
    }
    assert D.sampler_settings(schedule, method, options, learned_sigma=False) == (schedule, method, options)
    # another method on Wan's flow schedule, and unipc requested by a flow pipeline whose default is Euler
    assert D.sampler_settings(schedule, method, options, learned_sigma=False, requested="euler")[1:] == ("euler", {})
    assert D.sampler_settings(D.FlowSchedule(shift=3.0), "euler", {}, learned_sigma=False, requested="unipc") == (
        D.FlowSchedule(shift=3.0),
        "unipc",
        {},
    )
    # a DDPM pipeline asking for unipc is configured as UniPCMultistepScheduler.from_config(its config)
    dpm = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, prediction_type="v_prediction", solver_type="heun")
    dpm_config = dict(dpm.config, _class_name="DPMSolverMultistepScheduler")
    sched, meth, opts = D.sampler_settings(
        D.DDPMSchedule(**SD_BETAS),
        "dpmpp_2m",
        {},
        learned_sigma=False,
        scheduler_config=dpm_config,
        requested="unipc",
    )
    theirs = diffusers.UniPCMultistepScheduler.from_config(dpm.config)
    expected = D.from_diffusers_scheduler_config(dict(theirs.config, _class_name="UniPCMultistepScheduler"))
    assert (sched, meth, opts) == expected and opts["solver_type"] == "bh2" and sched.prediction == "v_prediction"
    # and back: DPM-Solver from a UniPC config reads bh2 as midpoint (as diffusers does)
    unipc_config = dict(theirs.config, _class_name="UniPCMultistepScheduler")
    _, meth, opts = D.sampler_settings(
        sched, "unipc", {}, learned_sigma=False, scheduler_config=unipc_config, requested="dpmpp_2m"
    )
    assert meth == "dpmpp_2m" and opts["solver_type"] == "midpoint"


def test_wan_family_default_sampler_is_unipc():
    """The Wan family declares this scheduler config; the policy maps it to our UniPC."""
    from dit_jax.models.family import family_named

    config = family_named("wan").scheduler_config
    schedule, method, options = D.from_diffusers_scheduler_config(dict(config))
    assert method == "unipc" and isinstance(schedule, D.FlowSchedule)
    D.sampler_settings(schedule, method, options, learned_sigma=False)
    assert D.model_timesteps(schedule, method, 50, **options)[0] == 999


# --------------------------------------------------------------------------------------------------------------------
# Errors: one clear message naming the key or value
# --------------------------------------------------------------------------------------------------------------------

SAMPLE_ERRORS = [
    (D.FlowSchedule(shift=3.0), {"solver_typ": "bh2"}, "solver_typ"),
    (D.FlowSchedule(shift=3.0), {"predict_x0": False}, "predict_x0"),
    (D.FlowSchedule(shift=3.0), {"solver_type": "midpoint"}, "solver_type 'midpoint'"),
    (D.FlowSchedule(shift=3.0), {"solver_order": 0}, "solver_order"),
    (D.FlowSchedule(shift=3.0), {"final_sigmas_type": "max"}, "final_sigmas_type 'max'"),
    (D.FlowSchedule(shift=3.0), {"disable_corrector": 3}, "disable_corrector"),
    (D.FlowSchedule(shift=3.0), {"solver_type": "bh1"}, "solver_type='bh1' needs final_sigmas_type='sigma_min'"),
    (D.FlowSchedule(shift=3.0), {"lower_order_final": False}, "lower_order_final=False"),
    (D.FlowSchedule(shift=3.0), {"mu": 0.5}, "mu="),
    (D.FlowSchedule(dynamic_shift=True), {}, "image_seq_len"),
    (D.DDPMSchedule(), {"predict_x0": False}, "predict_x0=False needs final_sigmas_type='sigma_min'"),
    (D.DDPMSchedule(), {"timestep_spacing": "even"}, "timestep_spacing 'even'"),
    (D.DDPMSchedule(), {"shift_terminal": 0.1}, "shift_terminal"),
]


@pytest.mark.parametrize("schedule, options, match", SAMPLE_ERRORS)
def test_bad_sample_options_raise_one_clear_error(schedule, options, match):
    model, _ = make_models("flow", None)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        D.sample(model, jnp.zeros((1, 2, 2, 1)), schedule=schedule, method="unipc", num_steps=4, **options)


CONFIG_ERRORS = [
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ({"solver_p": {"_class_name": "DDIMScheduler"}}, "solver_p="),
    ({"thresholding": True}, "thresholding=True"),
    ({"prediction_type": "epsilon"}, "prediction_type='epsilon'"),
    ({"predict_x0": False}, "predict_x0=False"),
    ({"solver_order": 0}, "solver_order=0"),
    ({"solver_type": "bh3"}, "solver_type='bh3'"),
    ({"final_sigmas_type": "max"}, "final_sigmas_type='max'"),
    ({"disable_corrector": "all"}, "disable_corrector='all'"),
    ({"use_flow_sigmas": False}, "prediction_type='flow_prediction' needs use_flow_sigmas=True"),
    ({"use_flow_sigmas": False, "prediction_type": "epsilon", "shift_terminal": 0.1}, "shift_terminal=0.1"),
    ({"use_flow_sigmas": False, "prediction_type": "epsilon", "rescale_betas_zero_snr": True}, "rescale_betas_zero"),
]


@pytest.mark.parametrize("changes, match", CONFIG_ERRORS)
def test_bad_scheduler_config_raises_naming_the_key(changes, match):
    with pytest.raises(ValueError, match=match):
        D.from_diffusers_scheduler_config({**WAN_CONFIG, **changes})
