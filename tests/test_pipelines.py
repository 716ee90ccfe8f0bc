"""Pipelines: ``dit_jax.pipelines.load`` + ``ClassConditionalPipeline`` against diffusers ``DiTPipeline``.

The reference is a ``DiTPipeline`` of tiny random components (MODELS.md §7: the diffusers pipeline test's
transformer with every parameter re-randomised, a random one-block ``AutoencoderKL``) saved with
``save_pretrained``; both sides start from the same latents. Criterion: images in [0, 1] within 3e-4.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import check_images, nhwc, randomize_

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.convert import from_torch
from dit_jax.convert.vae import vae_from_torch

LABELS = [1, 999, 500]
STEPS = 20
GUIDANCE = 4.0
TRANSFORMER = dict(  # tests/pipelines/dit/test_dit.py get_dummy_components
    sample_size=16,
    num_layers=2,
    patch_size=4,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)


def tiny_components():
    """Transformer and VAE with every parameter random; the VAE's output layer is rescaled so decoded images
    mostly stay inside [−1, 1] (clipping would hide differences)."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**TRANSFORMER).eval()
    with torch.no_grad():
        randomize_(transformer, seed=1)
        for block in transformer.transformer_blocks[1:]:  # converted checkpoints share one embedder
            block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
        vae = AutoencoderKL().eval()
        randomize_(vae, seed=2)
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        std = vae.decode(z).sample.std()
        vae.decoder.conv_out.weight.mul_(0.4 / std)
        vae.decoder.conv_out.bias.mul_(0.4 / std)
    return transformer, vae


def save_pipeline(folder, transformer, vae, scheduler):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def run_diffusers(pipe, latents_nchw: np.ndarray, labels, steps: int, guidance: float, monkeypatch):
    """``DiTPipeline.__call__`` with fixed initial latents; returns (images NHWC, final latents NHWC)."""
    import diffusers.pipelines.dit.pipeline_dit as pipeline_dit

    def fixed(shape, **kw):
        assert tuple(shape) == latents_nchw.shape
        return torch.from_numpy(latents_nchw.copy())

    seen = {}
    decode = pipe.vae.decode

    def spy(z, *a, **kw):
        seen["z"] = z.detach().numpy().copy()
        return decode(z, *a, **kw)

    monkeypatch.setattr(pipeline_dit, "randn_tensor", fixed)
    monkeypatch.setattr(pipe.vae, "decode", spy)
    with torch.no_grad():
        images = pipe(labels, guidance_scale=guidance, num_inference_steps=steps, output_type="np").images
    monkeypatch.undo()
    scaling = pipe.vae.config.scaling_factor
    return np.asarray(images), nhwc(seen["z"]) * scaling


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two pipeline folders (DDIM and DPM-Solver++) with the same weights, and the torch pipelines."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    transformer, vae = tiny_components()
    root = tmp_path_factory.mktemp("dit_pipelines")
    out = {}
    for name, scheduler in (("ddim", DDIMScheduler()), ("dpm", DPMSolverMultistepScheduler())):
        folder = root / name
        out[name] = (folder, save_pipeline(folder, transformer, vae, scheduler))
    return out


def initial_latents(batch: int = len(LABELS), seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 4, 16, 16).astype(np.float32)  # NCHW


@pytest.fixture(scope="module")
def ddim_pipe(folders):
    return pipelines.load(folders["ddim"][0])


@pytest.mark.parametrize("name,method", [("ddim", "ddim"), ("dpm", "dpmpp_2m")])
def test_diffusers_pipeline_parity(folders, name, method, monkeypatch):
    folder, torch_pipe = folders[name]
    lat = initial_latents()
    want, want_z = run_diffusers(torch_pipe, lat, LABELS, STEPS, GUIDANCE, monkeypatch)
    pipe = pipelines.load(folder)
    assert pipe.method == method and pipe.num_inference_steps == 50 and pipe.guidance_scale == 4.0
    lat_nhwc = nhwc(lat)
    got = pipe(LABELS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat_nhwc)
    got_z = pipe(LABELS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat_nhwc, output_type="latent")
    assert got.shape == want.shape == (3, 16, 16, 3)
    check_images(name, got, want, got_z, want_z, min_inside=0.8)
    # guidance changes the result (the null class is used), and the guidance is not a no-op
    unguided = pipe(LABELS, num_inference_steps=STEPS, guidance_scale=1.0, latents=lat_nhwc)
    assert float(np.abs(unguided - got).max()) > 1e-2


def test_model_directory_with_vae_folder_and_vae_model_dir(folders, ddim_pipe, tmp_path):
    folder, _ = folders["ddim"]
    lat = nhwc(initial_latents())
    want = ddim_pipe(LABELS, num_inference_steps=6, latents=lat)

    config, params = from_torch(folder / "transformer")
    save_model(tmp_path / "model", config, params)
    vae_config, vae_params = vae_from_torch(folder / "vae")
    save_model(tmp_path / "vae", vae_config, vae_params)

    # model directory + diffusers VAE folder; the scheduler config of the pipeline (clip_sample=True)
    pipe = pipelines.load(tmp_path / "model", vae=folder / "vae", scheduler=folder / "scheduler")
    got = pipe(LABELS, num_inference_steps=6, latents=lat)
    print(f"model dir + VAE folder vs pipeline folder: max diff {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, atol=1e-6)

    # VAE model directory; default sampler: the DiT converter's DDIM (no clipping)
    pipe = pipelines.load(tmp_path / "model", vae=tmp_path / "vae")
    assert pipe.method == "ddim" and pipe.options["clip_sample"] is False
    got = pipe(LABELS, num_inference_steps=6, latents=lat, clip_sample=True)
    np.testing.assert_allclose(got, want, atol=1e-6)

    # a raw torch checkpoint (the diffusers transformer folder) with the VAE folder
    pipe = pipelines.load(folder / "transformer", vae=folder / "vae", scheduler=folder / "scheduler")
    np.testing.assert_allclose(pipe(LABELS, num_inference_steps=6, latents=lat), want, atol=1e-6)


def test_sharded_batch_equals_unsharded(ddim_pipe):
    assert len(ddim_pipe.mesh.devices.reshape(-1)) == 8
    single = dataclasses.replace(ddim_pipe, devices=jax.devices()[:1])
    kw = dict(num_inference_steps=6, seed=3)
    sharded = ddim_pipe(LABELS, **kw)  # 3 labels padded to 8, sharded over 8 devices
    one = single(LABELS, **kw)
    err = float(np.abs(sharded - one).max())
    print(f"3 labels on 8 devices vs 1 device: max diff {err:.1e}")
    assert err <= 1e-5
    # the padded batch really is sharded
    x = ddim_pipe._pad(jnp.zeros((3, 16, 16, 4)))
    assert x.shape[0] == 8


def test_compiles_once_per_configuration(ddim_pipe):
    kw = dict(num_inference_steps=5)
    a = ddim_pipe(LABELS, guidance_scale=3.0, seed=1, **kw)
    n = len(ddim_pipe._compiled)
    b = ddim_pipe(LABELS, guidance_scale=5.0, seed=2, **kw)  # new scale and seed: same compiled loop
    assert len(ddim_pipe._compiled) == n
    fns = [f for k, f in ddim_pipe._compiled.items() if k[0] == "sample" and k[4] == 5]
    assert len(fns) == 1 and fns[0]._cache_size() == 1
    assert float(np.abs(a - b).max()) > 1e-3


def test_outputs_progress_and_guidance_channels(ddim_pipe):
    calls = []
    images = ddim_pipe([7, 8], num_inference_steps=4, output_type="pil", progress=lambda i, n: calls.append((i, n)))
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    assert sorted(set(calls)) == [(i, 4) for i in range(1, 5)]
    lat = ddim_pipe([7, 8], num_inference_steps=4, output_type="latent")
    assert lat.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(ddim_pipe.decode(lat), ddim_pipe([7, 8], num_inference_steps=4), atol=1e-6)
    # original DiT guidance (3 of 4 channels) is another trajectory
    three = ddim_pipe([7, 8], num_inference_steps=4, output_type="latent", guidance_channels=3)
    assert np.isfinite(three).all() and float(np.abs(three - lat).max()) > 1e-4


def test_ddpm_uses_learned_range_and_adm_respacing(ddim_pipe):
    schedule, method, options = ddim_pipe.sampler_settings("ddpm", respacing="250")
    assert schedule.learned_sigma and method == "ddpm" and options["variance_type"] == "learned_range"
    assert "timestep_spacing" not in options  # the respacing fixes the timesteps
    plan = ddim_pipe.plan(250, "ddpm", respacing="250")
    assert plan.model_t[0] == 999 and plan.model_t[-1] == 0 and plan.num_model_calls == 250
    # DDIM and DPM-Solver drop the variance
    schedule, method, options = ddim_pipe.sampler_settings("dpmpp_2m")
    assert schedule.learned_sigma and "variance_type" not in options
    a = ddim_pipe([3], num_inference_steps=5, method="ddpm", seed=0)
    b = ddim_pipe([3], num_inference_steps=5, method="ddpm", seed=1)
    assert np.isfinite(a).all() and float(np.abs(a - b).max()) > 1e-3  # stochastic: the seed matters


def test_bfloat16(folders, ddim_pipe):
    pipe = pipelines.load(folders["ddim"][0], dtype="bf16")
    assert pipe.model_config.dtype == "bfloat16" and pipe.vae_config.dtype == "bfloat16"
    lat = nhwc(initial_latents())
    got = pipe(LABELS, num_inference_steps=6, latents=lat)
    want = ddim_pipe(LABELS, num_inference_steps=6, latents=lat)
    err = float(np.abs(got - want).max())
    print(f"bf16 vs fp32 images: max diff {err:.2e}, mean {np.abs(got - want).mean():.2e}")
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert 0 < err < 0.25


def test_errors_name_the_bad_value(folders, ddim_pipe, tmp_path):
    folder, _ = folders["ddim"]
    with pytest.raises(ValueError, match=r"class id\(s\) \[1000\] out of range"):
        ddim_pipe([1, 1000])
    with pytest.raises(ValueError, match="unknown method 'euler'"):
        ddim_pipe([1], method="euler")
    with pytest.raises(ValueError, match="unknown output_type 'pt'"):
        ddim_pipe([1], output_type="pt")
    with pytest.raises(ValueError, match="guidance_channels=5"):
        ddim_pipe([1], guidance_channels=5)
    with pytest.raises(ValueError, match=r"latents must be NHWC of shape \(1, h, w, 4\)"):
        ddim_pipe([1], latents=np.zeros((1, 4, 16, 16)))
    with pytest.raises(ValueError, match="unknown option"):
        ddim_pipe([1], num_inference_steps=3, bogus=1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pipelines.load(tmp_path / "nowhere")
    config, params = from_torch(folder / "transformer")
    save_model(tmp_path / "model", config, params)
    with pytest.raises(ValueError, match="pass vae="):
        pipelines.load(tmp_path / "model")
    with pytest.raises(ValueError, match="'sd-vae-ft-ema' is a VAE preset"):
        pipelines.load(tmp_path / "model", vae="sd-vae-ft-ema")
    with pytest.raises(FileNotFoundError, match="missing-vae"):
        pipelines.load(tmp_path / "model", vae=tmp_path / "missing-vae")
    with pytest.raises(ValueError, match="unknown DiTConfig override"):
        pipelines.load(tmp_path / "model", vae=folder / "vae", depth_typo=3)
    with pytest.raises(ValueError, match="dtype='fp16'"):
        pipelines.load(folder, dtype="fp16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        pipelines.load(tmp_path / "empty")
