"""Classifier-free guidance wrapper: the original DiT/PixArt ``forward_with_cfg`` (first k channels guided, the rest
and the variance from the conditional half), the DiTPipeline loop (all latent channels), pytrees, sharding."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from parity import nhwc, torch_nchw

import dit_jax.diffusion as D
from dit_jax.diffusion.guidance import cfg

B, H, W, C = 2, 4, 4, 4
NULL = 10
EMB = np.random.default_rng(0).normal(size=(NULL + 1, 2 * C)).astype(np.float32)
AC = D.DDPMSchedule().alphas_cumprod.astype(np.float32)  # ᾱ at integer t, keeps the ε half realistic


def cond_model_jax(x, t, y):
    """Class-conditional analytic model with a learned-sigma half: (B, H, W, 2C)."""
    tt = t[:, None, None, None]
    e = jnp.asarray(EMB)[y][:, None, None, :]
    ab = jnp.asarray(AC)[t.astype(jnp.int32)][:, None, None, None]
    eps = jnp.sqrt(1 - ab) * x + jnp.sqrt(ab) * 0.5 * jnp.tanh(x) * jnp.cos(tt / 500.0)
    base = jnp.concatenate([eps, jnp.tanh(0.5 * x - 0.2)], axis=-1)
    return base + 0.3 * jnp.concatenate([jnp.sqrt(ab) * jnp.ones(C), jnp.ones(C) + 0 * ab], axis=-1) * e


def cond_model_torch(x, t, y):  # NCHW
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    e = torch.from_numpy(EMB)[y][:, :, None, None]
    ab = torch.from_numpy(AC)[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1)
    eps = torch.sqrt(1 - ab) * x + torch.sqrt(ab) * 0.5 * torch.tanh(x) * torch.cos(tt / 500.0)
    base = torch.cat([eps, torch.tanh(0.5 * x - 0.2)], dim=1)
    return base + 0.3 * torch.cat([torch.sqrt(ab).expand(-1, C, 1, 1), torch.ones_like(ab).expand(-1, C, 1, 1)], 1) * e


def forward_with_cfg_reference(x, t, y, y_null, scale, k):
    """The original DiT forward_with_cfg (torch, NCHW) on the doubled batch; returns the conditional half."""
    z = torch.cat([x, x], 0)
    labels = torch.cat([y, y_null], 0)
    half = z[: len(z) // 2]
    combined = torch.cat([half, half], dim=0)
    out = cond_model_torch(combined, torch.cat([t, t]), labels)
    eps, rest = out[:, :k], out[:, k:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)[: len(x)]


def test_channel_subset_matches_forward_with_cfg():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    y = np.array([3, 7])
    for k in (3, C):
        fn = cfg(cond_model_jax, jnp.asarray(y), jnp.full((B,), NULL), 4.0, guide_channels=None if k == C else k)
        ours = np.asarray(fn(jnp.asarray(x), jnp.asarray(t)))
        ref = nhwc(
            forward_with_cfg_reference(
                torch_nchw(x), torch.from_numpy(t), torch.from_numpy(y), torch.full((B,), NULL), 4.0, k
            )
        )
        err = float(np.abs(ours - ref).max())
        print(f"cfg guide {k} of {C} channels vs forward_with_cfg: {err:.1e}")
        assert ours.shape == (B, H, W, 2 * C) and err < 1e-6
        cond = np.asarray(cond_model_jax(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
        np.testing.assert_array_equal(ours[..., k:], cond[..., k:])  # unguided channels + variance: conditional
        assert np.abs(ours[..., :k] - cond[..., :k]).max() > 0.1  # the guided ones are not


def test_dit_pipeline_loop_with_guidance():
    """sample(cfg(...)) with DDIM equals DiTPipeline's loop (doubled batch, all channels guided, sigma dropped)."""
    schedule = D.DDPMSchedule(learned_sigma=True)
    y = np.array([1, 4])
    x_init = np.random.default_rng(2).standard_normal((B, H, W, C)).astype(np.float32)
    ours = np.asarray(
        D.sample(
            cfg(cond_model_jax, jnp.asarray(y), jnp.full((B,), NULL), 4.0),
            jnp.asarray(x_init),
            schedule=schedule,
            method="ddim",
            num_steps=25,
        )
    )
    sch = diffusers.DDIMScheduler(clip_sample=False)
    sch.set_timesteps(25)
    labels = torch.cat([torch.from_numpy(y), torch.full((B,), NULL)])
    z = torch.cat([torch_nchw(x_init)] * 2)
    for t in sch.timesteps:
        half = z[: len(z) // 2]
        z = torch.cat([half, half])
        out = cond_model_torch(z, t.expand(len(z)), labels)
        eps, rest = out[:, :C], out[:, C:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + 4.0 * (cond_eps - uncond_eps)
        out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
        z = sch.step(out[:, :C], t, z).prev_sample
    ref = nhwc(z[:B])
    err = float(np.abs(ours - ref).max())
    print(f"sample(cfg(...), ddim 25) vs DiTPipeline loop: {err:.1e} (max|x| = {np.abs(ref).max():.2f})")
    assert err < 1e-5


def test_scale_one_pytree_and_traced_scale():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        emb, mask = c
        return x * 0 + (emb * mask).sum(-1)[:, None, None, None]

    x = jnp.ones((B, H, W, C))
    t = jnp.zeros((B,))
    emb, mask = jnp.arange(2 * 3, dtype=jnp.float32).reshape(B, 3), jnp.ones((B, 3))
    null = (jnp.zeros((1, 3)), jnp.ones((1, 3)))  # one null caption broadcast over the batch
    cfg(model, (emb, mask), null, 1.0)(x, t)
    assert calls == [B]  # scale 1: no doubling
    out = cfg(model, (emb, mask), null, 2.0)(x, t)
    assert calls[-1] == 2 * B
    np.testing.assert_allclose(out[:, 0, 0, 0], 2.0 * np.array([3.0, 12.0]))  # uncond 0 + 2·(cond − 0)

    traces = []

    @jax.jit
    def guided(x, scale):
        traces.append(1)
        return cfg(cond_model_jax, jnp.array([1, 2]), jnp.full((B,), NULL), scale)(x, jnp.zeros((B,)))

    a = guided(jnp.ones((B, H, W, C)), 1.5)
    b = guided(jnp.ones((B, H, W, C)), 4.0)
    assert len(traces) == 1 and np.abs(np.asarray(a) - np.asarray(b)).max() > 0.1
    # a scalar null class is broadcast over the batch
    x2, t2 = jnp.ones((B, H, W, C)), jnp.full((B,), 10.0)
    np.testing.assert_array_equal(
        cfg(cond_model_jax, jnp.array([1, 2]), NULL, 3.0)(x2, t2),
        cfg(cond_model_jax, jnp.array([1, 2]), jnp.full((B,), NULL), 3.0)(x2, t2),
    )


def test_cfg_sampling_sharded_equals_unsharded():
    schedule = D.DDPMSchedule(learned_sigma=True)
    y = jnp.arange(8) % NULL
    x8 = jnp.asarray(np.random.default_rng(3).standard_normal((8, H, W, C)).astype(np.float32))

    @jax.jit
    def run(x, y, key):
        fn = cfg(cond_model_jax, y, jnp.full_like(y, NULL), 4.0, guide_channels=3)
        return D.sample(fn, x, schedule=schedule, method="ddpm", num_steps=None, key=key, respacing="10")

    key = jax.random.key(0)
    single = np.asarray(run(x8, y, key))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        sharded = run(jax.device_put(x8, shard), jax.device_put(y, shard), key)
    err = float(np.abs(np.asarray(sharded) - single).max())
    print(f"cfg + ddpm (ADM respacing 10, guide 3 channels) sharded vs unsharded: {err:.1e}")
    assert err <= 1e-6
