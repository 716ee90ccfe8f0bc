"""Noise schedules: diffusers betas, ADM respacing facts, spaced betas, the flow shifts, hashability."""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dit_jax.diffusion as D


@pytest.mark.parametrize(
    "kw",
    [
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
    ],
)
def test_betas_match_diffusers(kw):
    ours = D.DDPMSchedule(**kw)
    theirs = diffusers.DDPMScheduler(**kw)
    assert ours.betas.dtype == np.float64 and ours.betas.shape == (1000,)
    err = np.abs(ours.betas / theirs.betas.numpy().astype(np.float64) - 1).max()
    print(f"{kw['beta_schedule']}: betas rel err vs diffusers (float32) {err:.1e}")
    assert err < 1e-6
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=2e-5)


def test_adm_linear_and_cosine_facts():
    # ADM get_named_beta_schedule("linear", 1000) = linspace(1e-4, 0.02) in float64; DiT's default
    np.testing.assert_array_equal(D.DDPMSchedule().betas, np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    cos = D.DDPMSchedule(beta_schedule="squaredcos_cap_v2").betas
    assert cos.max() == 0.999 and cos[0] == pytest.approx(
        1
        - math.cos(1 / 1000 / 1.008 * math.pi / 2 + 0.008 / 1.008 * math.pi / 2) ** 2
        / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    )


def test_space_timesteps():
    s250 = D.space_timesteps(1000, "250")
    assert s250 == [round(i * 999 / 249) for i in range(250)]
    assert s250[:5] == [0, 4, 8, 12, 16] and s250[-3:] == [991, 995, 999]
    assert D.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    three = D.space_timesteps(1000, "10,15,20")
    assert len(three) == 45 and three[:2] == [0, 37] and three[9] == 333  # section 1: 334 steps, 10 evenly
    assert three[10] == 334 and three[-1] == 999  # section 2 starts at 334; section 3 ends at 999
    assert D.space_timesteps(100, "100") == list(range(100))
    with pytest.raises(ValueError, match="ddim600"):
        D.space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError, match="'a,b'"):
        D.space_timesteps(1000, "a,b")


def test_spaced_betas_keep_alphas_cumprod():
    schedule = D.DDPMSchedule()
    use = D.space_timesteps(1000, "250")
    betas = D.spaced_betas(schedule.alphas_cumprod, use)
    np.testing.assert_allclose(np.cumprod(1 - betas), schedule.alphas_cumprod[use], rtol=1e-12)
    assert betas[0] == pytest.approx(schedule.betas[0], rel=1e-10) and betas.max() < 0.1


def test_posterior_properties_follow_ddpm_equations():
    s = D.DDPMSchedule()
    ac, b, t = s.alphas_cumprod, s.betas, 500
    assert s.posterior_variance[t] == pytest.approx(b[t] * (1 - ac[t - 1]) / (1 - ac[t]), rel=1e-12)
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == np.log(s.posterior_variance[1])
    # posterior mean of x_{t−1} from x₀ and x_t: coefficients sum to the right thing for x₀ = x_t/√ᾱ_t (noise-free)
    x0 = 1.0
    xt = np.sqrt(ac[t]) * x0
    mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * xt
    assert mean == pytest.approx(np.sqrt(ac[t - 1]) * x0, rel=1e-12)


def test_schedules_are_hashable_static_args():
    ddpm, flow = D.DDPMSchedule(learned_sigma=True), D.FlowSchedule(dynamic_shift={"max_shift": 1.15})
    assert hash(ddpm) == hash(D.DDPMSchedule(learned_sigma=True)) and flow == D.FlowSchedule(dynamic_shift=True)
    assert D.FlowSchedule(dynamic_shift=((256, 0.5), (4096, 1.15))).dynamic_shift == D.FLUX_DYNAMIC_SHIFT
    f = jax.jit(lambda x, s: x * s.shift, static_argnums=1)
    assert float(f(jnp.ones(()), D.FlowSchedule(shift=3.0))) == 3.0


def test_flow_shifts():
    u = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(D.FlowSchedule(shift=3.0).shift_sigmas(u), 3 * u / (1 + 2 * u))
    assert np.array_equal(D.FlowSchedule().shift_sigmas(u), u)
    flux = D.FlowSchedule(dynamic_shift=True)
    assert flux.mu(256) == pytest.approx(0.5) and flux.mu(4096) == pytest.approx(1.15)
    assert flux.mu(1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)
    mu = flux.mu(4096)
    np.testing.assert_allclose(
        flux.shift_sigmas(u[1:], image_seq_len=4096), math.exp(mu) / (math.exp(mu) + 1 / u[1:] - 1)
    )


def test_bad_values_raise_one_clear_error():
    with pytest.raises(ValueError, match="'cosine'"):
        D.DDPMSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="'eps'"):
        D.DDPMSchedule(prediction="eps")
    with pytest.raises(ValueError, match="dynamic_shift"):
        D.FlowSchedule(dynamic_shift=(1, 2, 3))
    with pytest.raises(ValueError, match="shift must be > 0"):
        D.FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="no dynamic_shift"):
        D.FlowSchedule().shift_sigmas(0.5, image_seq_len=1024)
