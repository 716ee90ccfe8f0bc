"""DDPM (ADM hybrid, learned sigma) and rectified-flow losses vs references written from the published equations
(ADM / Improved DDPM, SD3) and diffusers' training utilities."""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import rel_err

import dit_jax.diffusion as D

B, H, W, C = 4, 4, 4, 3


def data(seed=0):
    """x₀ in [−1, 1] with some pixels at exactly ±1 (the edge bins of the discretised likelihood)."""
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.normal(0, 0.6, (B, H, W, C)), -1, 1).astype(np.float32)
    x0[0, 0, 0] = 1.0
    x0[1, 0, 0] = -1.0
    noise = rng.standard_normal((B, H, W, C)).astype(np.float32)
    return x0, noise


def model_fn(x, t, *, learned=False, a=0.7, b=0.4, kind="epsilon"):
    t = t[:, None, None, None]
    if kind == "sample":  # an x₀ model near the identity, so that the t = 0 decoder likelihood is well conditioned
        mean = x + 0.02 * jnp.sin(a * x + t / 300.0)
    else:
        mean = a * jnp.tanh(x) + 0.3 * jnp.sin(x + t / 300.0)
    if not learned:
        return mean
    return jnp.concatenate([mean, jnp.tanh(b * x + t / 1000.0 - 0.5)], axis=-1)


def model_np(x, t, *, learned=False, kind="epsilon"):
    t = t[:, None, None, None].astype(np.float64)
    if kind == "sample":
        mean = x + 0.02 * np.sin(0.7 * x + t / 300.0)
    else:
        mean = 0.7 * np.tanh(x) + 0.3 * np.sin(x + t / 300.0)
    if not learned:
        return mean, None
    return mean, np.tanh(0.4 * x + t / 1000.0 - 0.5)


# --------------------------------------------------------------------------------------------------------------------
# ADM reference (float64 numpy), written from gaussian_diffusion.py's equations
# --------------------------------------------------------------------------------------------------------------------


def adm_reference(betas, x0, noise, t, prediction, learned):
    x0, noise = x0.astype(np.float64), noise.astype(np.float64)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])

    def ex(a):
        return a[t][:, None, None, None]

    x_t = ex(np.sqrt(ac)) * x0 + ex(np.sqrt(1 - ac)) * noise
    out, v = model_np(x_t.astype(np.float32).astype(np.float64), t, learned=learned, kind=prediction)
    target = {"epsilon": noise, "sample": x0, "v_prediction": ex(np.sqrt(ac)) * noise - ex(np.sqrt(1 - ac)) * x0}
    mse = ((target[prediction] - out) ** 2).reshape(len(t), -1).mean(1)
    if not learned:
        return mse, None
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(ac_prev) / (1 - ac)
    c2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    true_mean = ex(c1) * x0 + ex(c2) * x_t
    true_logvar = ex(post_log_var)
    if prediction == "epsilon":
        pred_x0 = ex(np.sqrt(1 / ac)) * x_t - ex(np.sqrt(1 / ac - 1)) * out
    elif prediction == "v_prediction":
        pred_x0 = ex(np.sqrt(ac)) * x_t - ex(np.sqrt(1 - ac)) * out
    else:
        pred_x0 = out
    model_mean = ex(c1) * pred_x0 + ex(c2) * x_t
    frac = (v + 1) / 2
    model_logvar = frac * ex(np.log(betas)) + (1 - frac) * true_logvar
    kl = 0.5 * (
        -1
        + model_logvar
        - true_logvar
        + np.exp(true_logvar - model_logvar)
        + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
    )
    kl = kl.reshape(len(t), -1).mean(1) / math.log(2)

    def cdf(z):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    inv = np.exp(-0.5 * model_logvar)
    cdf_plus = cdf(inv * (x0 - model_mean + 1 / 255))
    cdf_min = cdf(inv * (x0 - model_mean - 1 / 255))
    logp = np.where(
        x0 < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    nll = -logp.reshape(len(t), -1).mean(1) / math.log(2)
    vb = np.where(t == 0, nll, kl)
    return mse + vb, vb


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_loss_matches_adm_equations(prediction, learned):
    schedule = D.DDPMSchedule(prediction=prediction, learned_sigma=learned)
    x0, noise = data()
    t = np.array([0, 1, 500, 999])
    loss, aux = jax.jit(
        lambda x, k, t, n: D.ddpm_loss(
            lambda a, b: model_fn(a, b, learned=learned, kind=prediction), schedule, x, k, t=t, noise=n
        )
    )(jnp.asarray(x0), jax.random.key(0), jnp.asarray(t), jnp.asarray(noise))
    ref, ref_vb = adm_reference(schedule.betas, x0, noise, t, prediction, learned)
    # float32 vs the float64 equations: the VLB has cancellations (x₀ from ε at t = T − 1, the CDF difference of
    # the t = 0 likelihood), so compare elementwise with a float32-sized relative tolerance
    err = float(np.max(np.abs(np.asarray(loss) - ref) / (np.abs(ref) + 1e-3)))
    print(f"ddpm_loss {prediction} learned_sigma={learned}: rel err {err:.1e}; loss {np.asarray(loss).round(4)}")
    assert loss.shape == (B,) and err < 1e-4
    if learned:
        np.testing.assert_allclose(aux["vb"], ref_vb, rtol=1e-4, atol=1e-6)
        assert float(aux["vb"][0]) > 0 and np.all(np.asarray(aux["vb"]) >= 0)  # t = 0: decoder NLL in bits/dim


def test_ddpm_vb_trains_only_the_variance():
    """The VLB term sees the mean output through stop_gradient (ADM's frozen_out); the MSE sees no variance."""
    schedule = D.DDPMSchedule(learned_sigma=True)
    x0, noise = data(1)

    def parts(a, b):
        fn = lambda x, t: model_fn(x, t, learned=True, a=a, b=b)  # noqa: E731
        _, aux = D.ddpm_loss(
            fn, schedule, jnp.asarray(x0), jax.random.key(0), t=jnp.array([3, 50, 400, 900]), noise=jnp.asarray(noise)
        )
        return aux["mse"].sum(), aux["vb"].sum()

    g_mse = jax.grad(lambda p: parts(*p)[0])((0.7, 0.4))
    g_vb = jax.grad(lambda p: parts(*p)[1])((0.7, 0.4))
    print(f"d mse/d(mean, var) = {g_mse}, d vb/d(mean, var) = {g_vb}")
    assert g_vb[0] == 0.0 and abs(g_vb[1]) > 1e-4
    assert g_mse[1] == 0.0 and abs(g_mse[0]) > 1e-4


def test_ddpm_timesteps_uniform_and_float_to_model():
    schedule = D.DDPMSchedule(num_train_timesteps=50)
    seen = {}

    def fn(x, t):
        seen["dtype"] = t.dtype
        return x

    x0 = jnp.zeros((4096, 1, 1, 1))
    _, aux = D.ddpm_loss(fn, schedule, x0, jax.random.key(1))
    counts = np.bincount(np.asarray(aux["t"]), minlength=50)
    assert seen["dtype"] == jnp.float32
    assert counts.min() > 40 and len(counts) == 50  # 4096 / 50 ≈ 82 per step


def test_q_sample_and_velocity_match_diffusers():
    sch = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = D.DDPMSchedule(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction="v_prediction"
    )
    x0, noise = data(2)
    t = np.array([0, 10, 500, 999])
    tt = lambda a: torch.from_numpy(a)  # noqa: E731
    ref_xt = sch.add_noise(tt(x0), tt(noise), torch.from_numpy(t)).numpy()
    ref_v = sch.get_velocity(tt(x0), tt(noise), torch.from_numpy(t)).numpy()
    xt = D.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    v = D.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    print(
        f"q_sample vs add_noise {np.abs(xt - ref_xt).max():.1e}, v target vs get_velocity {np.abs(v - ref_v).max():.1e}"
    )
    np.testing.assert_allclose(xt, ref_xt, atol=2e-6)
    np.testing.assert_allclose(v, ref_v, atol=2e-6)


def test_normal_kl_and_discretized_likelihood():
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(2, 64))
    lv1, lv2 = rng.normal(size=(2, 64))
    # KL of two Gaussians, written out: log(σ2/σ1) + (σ1² + (μ1 − μ2)²)/(2σ2²) − 1/2
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    ref = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(D.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)
    # the discretised likelihood is a probability over the 256 bins: the bins of one pixel sum to ~1
    bins = jnp.linspace(-1, 1, 256)
    for mean, log_scale in [(0.1, -2.0), (-0.7, -4.0), (0.95, -1.0)]:
        logp = D.discretized_gaussian_log_likelihood(
            bins, means=jnp.full(256, mean), log_scales=jnp.full(256, log_scale)
        )
        total = float(jnp.exp(logp).sum())
        assert abs(total - 1.0) < 2e-3, total
        exact = 0.5 * (
            math.erf((0.1 + 1 / 255 - mean) / (math.exp(log_scale) * math.sqrt(2)))
            - math.erf((0.1 - 1 / 255 - mean) / (math.exp(log_scale) * math.sqrt(2)))
        )
        approx = float(
            jnp.exp(
                D.discretized_gaussian_log_likelihood(
                    jnp.array(0.1), means=jnp.array(mean), log_scales=jnp.array(log_scale)
                )
            )
        )
        assert abs(approx - exact) < 5e-4  # ADM's tanh approximation of Φ is good to ~2e-4


# --------------------------------------------------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------------------------------------------------


def test_flow_loss_matches_equations():
    schedule = D.FlowSchedule(shift=3.0)
    x0, noise = data(4)
    sig = np.array([0.0, 0.25, 0.7, 1.0], np.float32)
    seen = {}

    def fn(x, t):
        seen["t"] = t
        return 0.5 * jnp.tanh(x) + 0.001 * t[:, None, None, None]

    loss, aux = D.flow_loss(
        fn, schedule, jnp.asarray(x0), jax.random.key(0), t=jnp.asarray(sig), noise=jnp.asarray(noise)
    )
    s = sig[:, None, None, None].astype(np.float64)
    xt = (1 - s) * x0 + s * noise
    pred = 0.5 * np.tanh(xt) + 0.001 * 1000 * s
    ref = ((pred - (noise - x0)) ** 2).reshape(B, -1).mean(1)
    err = rel_err(loss, ref)
    print(f"flow_loss vs equations: rel err {err:.1e}")
    assert err < 1e-5
    np.testing.assert_allclose(seen["t"], sig * 1000)


@pytest.mark.parametrize("weighting", ["logit_normal", "mode", "uniform"])
def test_flow_density_matches_diffusers(weighting, monkeypatch):
    """Same base draws → same u as diffusers' compute_density_for_timestep_sampling; and the distributions agree."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    base = np.random.default_rng(5).random(512).astype(np.float32)
    if weighting == "logit_normal":
        base = np.random.default_rng(5).standard_normal(512).astype(np.float32)
        monkeypatch.setattr(torch, "normal", lambda mean, std, size, **_: mean + std * torch.from_numpy(base))
    else:
        monkeypatch.setattr(torch, "rand", lambda size, **_: torch.from_numpy(base))
    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ref = compute_density_for_timestep_sampling(weighting, 512, **kw).numpy()
    ours = np.asarray(D.density_transform(weighting, jnp.asarray(base), **kw))
    monkeypatch.undo()
    err = float(np.abs(ours - ref).max())
    # and our own draws follow the same law (two-sample Kolmogorov–Smirnov distance)
    draws = np.sort(
        np.asarray(D.sample_flow_sigmas(jax.random.key(0), (20000,), D.FlowSchedule(), weighting=weighting, **kw))
    )
    theirs = np.sort(
        compute_density_for_timestep_sampling(
            weighting, 20000, **kw, generator=torch.Generator().manual_seed(0)
        ).numpy()
    )
    grid = np.linspace(0, 1, 201)
    ks = np.abs(np.searchsorted(draws, grid) - np.searchsorted(theirs, grid)).max() / 20000
    print(f"density {weighting}: same draws max err {err:.1e}; KS distance {ks:.3f}")
    assert err < 1e-6 and ks < 0.025
    assert draws.min() >= 0 and draws.max() <= 1


def test_flow_shifts_and_loss_weights():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    u = np.linspace(0.01, 0.99, 99).astype(np.float32)
    # SD3 constant shift and its effect on sampled sigmas
    sd3 = D.FlowSchedule(shift=3.0)
    np.testing.assert_allclose(sd3.shift_sigmas(u), 3 * u / (1 + 2 * u), rtol=1e-6)
    shifted = np.asarray(D.sample_flow_sigmas(jax.random.key(0), (20000,), sd3))
    assert abs(np.median(shifted) - 0.75) < 0.01  # median of shift(U) = shift(0.5) = 0.75
    # Flux's resolution-dependent shift equals diffusers' exponential time shift with μ from the token count
    flux = D.FlowSchedule(dynamic_shift=((256, 0.5), (4096, 1.15)))
    for seq_len in (256, 1024, 4096):
        mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
        ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, torch.tensor(u))
        np.testing.assert_allclose(flux.shift_sigmas(u, image_seq_len=seq_len), ref.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        D.flow_loss(lambda x, t: x, flux, jnp.zeros((2, 2, 2, 1)), jax.random.key(0))
    # loss weights
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = compute_loss_weighting_for_sd3(scheme, torch.tensor(u)).numpy()
        np.testing.assert_allclose(D.flow_loss_weight(scheme, jnp.asarray(u)), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="'lognormal'"):
        D.flow_loss(lambda x, t: x, sd3, jnp.zeros((2, 2, 2, 1)), jax.random.key(0), weighting="lognormal")


def test_losses_jit_with_static_schedule():
    x0, noise = data(6)
    for schedule, loss_fn in [
        (D.DDPMSchedule(learned_sigma=True), D.ddpm_loss),
        (D.FlowSchedule(shift=3.0), D.flow_loss),
    ]:
        learned = getattr(schedule, "learned_sigma", False)

        @jax.jit
        def step(p, x, k, schedule=schedule, loss_fn=loss_fn, learned=learned):
            def loss(q):
                fn = lambda a, t: model_fn(a, t, learned=learned, a=q)  # noqa: E731
                return loss_fn(fn, schedule, x, k)[0].mean()

            return jax.value_and_grad(loss)(p)

        value, grad = step(0.7, jnp.asarray(x0), jax.random.key(2))
        assert np.isfinite(value) and np.isfinite(grad) and grad != 0
