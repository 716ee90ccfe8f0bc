"""Text-to-image pipelines: ``dit_jax.pipelines.load`` + ``TextToImagePipeline`` against diffusers
``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline``.

The references are diffusers pipelines of tiny random components (MODELS.md §7: the pipeline test's
``PixArtTransformer2DModel`` with every parameter re-randomised, a random four-block ``AutoencoderKL`` (VAE factor 8),
a random tiny ``T5EncoderModel`` and an offline T5 tokenizer) saved with ``save_pretrained``; both sides start from
the same latents and encode the prompts themselves. Criterion: images in [0, 1] within 3e-4.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest
import torch
import torch_reference as ref
from parity import check_images, nhwc, randomize_
from test_t5 import tiny_t5, tiny_tokenizer

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.convert import from_torch
from dit_jax.models import build, enable_kv_compress
from dit_jax.models.pixart import ASPECT_RATIO_BINS
from dit_jax.pipelines import TextToImagePipeline

PROMPTS = ["a cat sitting on the red sofa", "a photo of an astronaut riding a horse"]
STEPS = 20
GUIDANCE = 4.5
TRANSFORMER = dict(  # tests/pipelines/pixart_sigma/test_pixart.py get_dummy_components
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=3,
    caption_channels=32,
    in_channels=4,
    cross_attention_dim=24,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
VAE = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=64,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The host's cores are shared: torch with several threads is much slower here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_transformer(seed: int, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**TRANSFORMER, **overrides}).eval()
    with torch.no_grad():
        randomize_(model, seed=seed + 1)
    return model


def tiny_vae():
    """A random VAE whose output layer is rescaled so decoded images mostly stay inside [−1, 1]."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        randomize_(vae, seed=2)
        z = 3.0 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) / vae.config.scaling_factor
        std = vae.decode(z).sample.std()
        vae.decoder.conv_out.weight.mul_(0.4 / std)
        vae.decoder.conv_out.bias.mul_(0.4 / std)
    return vae


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """PixArt-Σ pipeline folders (DPM-Solver++, DDIM) and a PixArt-α folder with micro-conditions; torch pipelines."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    root = tmp_path_factory.mktemp("pixart_pipelines")
    text_encoder, tokenizer, vae = tiny_t5(), tiny_tokenizer(), tiny_vae()
    sigma = tiny_transformer(1)
    alpha = tiny_transformer(5, use_additional_conditions=True)
    out = {}
    for name, cls, transformer, scheduler in (
        ("dpm", PixArtSigmaPipeline, sigma, DPMSolverMultistepScheduler()),
        ("ddim", PixArtSigmaPipeline, sigma, DDIMScheduler()),
        ("alpha", PixArtAlphaPipeline, alpha, DPMSolverMultistepScheduler()),
    ):
        pipe = cls(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
        out[name] = (root / name, pipe)
    return out


@pytest.fixture(scope="module")
def dpm_pipe(folders):
    return pipelines.load(folders["dpm"][0])


def initial_latents(batch: int = len(PROMPTS), h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 4, h, w).astype(np.float32)  # NCHW


def run_diffusers(pipe, prompts, latents_nchw, monkeypatch, **kw):
    """The diffusers pipeline from fixed latents; returns (images NHWC, final latents NHWC)."""
    seen = {}
    decode = pipe.vae.decode

    def spy(z, *a, **k):
        seen["z"] = z.detach().numpy().copy()
        return decode(z, *a, **k)

    monkeypatch.setattr(pipe.vae, "decode", spy)
    kw = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "use_resolution_binning": False, **kw}
    with torch.no_grad():
        images = pipe(prompts, latents=torch.from_numpy(latents_nchw), output_type="np", clean_caption=False, **kw)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    return np.asarray(images.images), nhwc(seen["z"]) * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("name,method,negative", [("dpm", "dpmpp_2m", ""), ("ddim", "ddim", "a blue dog")])
def test_sigma_pipeline_parity(folders, dpm_pipe, name, method, negative, monkeypatch):
    folder, torch_pipe = folders[name]
    lat = initial_latents()
    want, want_z = run_diffusers(torch_pipe, PROMPTS, lat, monkeypatch, negative_prompt=negative)
    pipe = dpm_pipe if name == "dpm" else pipelines.load(folder)
    assert isinstance(pipe, TextToImagePipeline) and pipe.method == method
    assert (pipe.num_inference_steps, pipe.guidance_scale, pipe.max_sequence_length) == (20, 4.5, 300)
    got = pipe(PROMPTS, negative_prompt=negative, latents=nhwc(lat))
    got_z = pipe(PROMPTS, negative_prompt=negative, latents=nhwc(lat), output_type="latent")
    assert got.shape == (2, 64, 64, 3) and got.dtype == np.float32
    check_images(f"PixArt-Σ {name} (negative {negative!r})", got, want, got_z, want_z)
    # the guidance is not a no-op, and a new scale or seed reuses the compiled loop
    n = len(pipe._compiled)
    other = pipe(PROMPTS, negative_prompt=negative, latents=nhwc(lat), guidance_scale=2.0)
    assert len(pipe._compiled) == n and float(np.abs(other - got).max()) > 1e-2
    assert pipe.text_encoder._encode._cache_size() == 1  # T5 compiled once (prompts and negatives)


def test_alpha_micro_conditions_non_square(folders, monkeypatch):
    """α-style model with resolution/aspect-ratio embedders on a non-square 48×80 image. diffusers passes the
    micro-conditions when ``sample_size == 128``: the reference's config says so during the call."""
    from diffusers.configuration_utils import FrozenDict

    folder, torch_pipe = folders["alpha"]
    pipe = pipelines.load(folder)
    assert pipe.model_config.micro_conditions and pipe.max_sequence_length == 120  # PixArtAlphaPipeline's default
    lat = initial_latents(h=6, w=10, seed=1)
    config = torch_pipe.transformer._internal_dict
    monkeypatch.setattr(torch_pipe.transformer, "_internal_dict", FrozenDict({**config, "sample_size": 128}))
    want, want_z = run_diffusers(torch_pipe, PROMPTS, lat, monkeypatch, height=48, width=80)
    got = pipe(PROMPTS, height=48, width=80, latents=nhwc(lat))
    assert got.shape == (2, 48, 80, 3)
    check_images("PixArt-α micro-conditions, 48x80", got, want)
    # the micro-conditions reach the model: (h, w) and h / w change its output
    model, x, emb = build(pipe.model_config), np.zeros((1, 6, 10, 4), np.float32), np.zeros((1, 120, 32), np.float32)
    outs = [
        model.apply(
            {"params": pipe.params}, x, np.array([500.0]), emb, None, np.array([hw]), np.array([[hw[0] / hw[1]]])
        )
        for hw in ([48.0, 80.0], [80.0, 48.0])
    ]
    assert float(np.abs(outs[0] - outs[1]).max()) > 1e-3


def test_resolution_binning(folders, dpm_pipe, monkeypatch):
    """200×300 px goes to the 0.68 bin (208×304), is sampled there and resized back, as diffusers does with the
    256-px table (sample size 32: the reference's config says so during the call, our pipeline gets the table)."""
    from diffusers.configuration_utils import FrozenDict

    _, torch_pipe = folders["dpm"]
    pipe = dataclasses.replace(dpm_pipe, aspect_ratio_bins=ASPECT_RATIO_BINS[32])
    assert pipe.image_size(200, 300) == ((208, 304), (200, 300))
    lat = initial_latents(h=26, w=38, seed=2)
    config = torch_pipe.transformer._internal_dict
    monkeypatch.setattr(torch_pipe.transformer, "_internal_dict", FrozenDict({**config, "sample_size": 32}))
    want, want_z = run_diffusers(
        torch_pipe, PROMPTS, lat, monkeypatch, height=200, width=300, use_resolution_binning=True
    )
    got = pipe(PROMPTS, height=200, width=300, latents=nhwc(lat))
    got_z = pipe(PROMPTS, height=200, width=300, latents=nhwc(lat), output_type="latent")
    assert got.shape == (2, 200, 300, 3) and got_z.shape == (2, 26, 38, 4)
    check_images("PixArt-Σ binned 200x300 → 208x304", got, want, got_z, want_z)
    # without binning 200×300 is not a multiple of 16 px
    with pytest.raises(ValueError, match="height=200, width=300 must be multiples of 16"):
        pipe(PROMPTS, height=200, width=300, use_resolution_binning=False)


def test_aspect_ratio_bins_match_diffusers():
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    tables = {
        32: ASPECT_RATIO_256_BIN,
        64: ASPECT_RATIO_512_BIN,
        128: ASPECT_RATIO_1024_BIN,
        256: ASPECT_RATIO_2048_BIN,
    }
    rng = np.random.default_rng(0)
    for sample_size, table in tables.items():
        assert list(ASPECT_RATIO_BINS[sample_size]) == [(int(h), int(w)) for h, w in table.values()]
        sizes = rng.integers(64, 4096, (300, 2)).tolist() + [[1000, 1500], [1024, 1024], [600, 1224]]
        for h, w in sizes:
            want = PixArtImageProcessor.classify_height_width_bin(h, w, table)
            assert pipelines.closest_bin(h, w, ASPECT_RATIO_BINS[sample_size]) == want, (h, w)


@pytest.mark.parametrize("src,dst", [((26, 38), (200, 300)), ((13, 20), (40, 64)), ((40, 64), (13, 20))])
def test_resize_and_crop_matches_diffusers(src, dst):
    from diffusers.image_processor import PixArtImageProcessor

    x = np.random.default_rng(1).standard_normal((2, 3, *src)).astype(np.float32)
    want = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), dst[1], dst[0]).numpy()
    got = np.asarray(pipelines.resize_and_crop(nhwc(x), *dst))
    err = float(np.abs(got - nhwc(want)).max())
    print(f"resize_and_crop {src} → {dst}: max diff {err:.1e}")
    assert got.shape == (2, *dst, 3) and err <= 1e-5


def test_prompt_embeds_sharding_and_no_text_encoder(folders, dpm_pipe, monkeypatch):
    """``encode_prompt`` equals diffusers' T5 features; precomputed embeddings sample the same images on one
    device without a text encoder as the prompts on eight devices (3 prompts padded to 8)."""
    _, torch_pipe = folders["dpm"]
    prompts = PROMPTS + ["the dog"]
    emb, mask = dpm_pipe.encode_prompt(prompts)
    with torch.no_grad():
        want, want_mask, neg, neg_mask = torch_pipe.encode_prompt(
            prompts, True, negative_prompt="", clean_caption=False
        )
    err = float(np.abs(emb - want.numpy()).max())
    print(f"T5 prompt features vs diffusers encode_prompt: max diff {err:.1e} (|feature| ≤ {want.abs().max():.1f})")
    assert emb.shape == (3, 300, 32) and err <= 1e-4 and (mask == want_mask.numpy()).all()
    assert mask.sum(1).tolist() == want_mask.numpy().sum(1).tolist() and mask[2].sum() < mask[1].sum()

    lat = nhwc(initial_latents(3, seed=4))
    kw = dict(num_inference_steps=6, latents=lat)
    sharded = dpm_pipe(prompts, **kw)
    assert len(dpm_pipe.mesh.devices.reshape(-1)) == 8
    single = dataclasses.replace(dpm_pipe, devices=jax.devices()[:1], text_encoder=None)
    one = single(
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg.numpy()[:1],
        negative_prompt_attention_mask=neg_mask.numpy()[:1],
        **kw,
    )
    err = float(np.abs(sharded - one).max())
    print(f"3 prompts on 8 devices vs embeddings on 1 device: max diff {err:.1e}")
    assert err <= 1e-5
    with pytest.raises(ValueError, match="has no text encoder: pass prompt_embeds"):
        single(PROMPTS)
    # num_images_per_prompt repeats each prompt in place, as diffusers (4 images, still one padded batch of 8)
    lat4 = nhwc(initial_latents(4, seed=5))
    per_prompt = dpm_pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=6, latents=lat4)
    repeated = dpm_pipe([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, num_inference_steps=6, latents=lat4)
    assert per_prompt.shape == (4, 64, 64, 3) and float(np.abs(per_prompt - repeated).max()) <= 1e-6


def test_sequence_parallel_sampling_equals_data_parallel(folders, dpm_pipe):
    """``sequence_parallel=4``: each image's 16 tokens split over 4 devices (ring attention: 3 heads), 2 images over
    the 2 data rows, the same images as the batch-only mesh; a bad split is one clear error before anything runs."""
    lat = nhwc(initial_latents(seed=6))
    kw = dict(num_inference_steps=4, latents=lat)
    want = dpm_pipe(PROMPTS, **kw)
    split = pipelines.load(folders["dpm"][0], sequence_parallel=4)
    assert dict(split.mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    got = split(PROMPTS, **kw)
    err = float(np.abs(got - want).max())
    print(f"sequence_parallel=4 (ring) vs data-parallel images: max diff {err:.1e}")
    assert err <= 1e-5
    with pytest.raises(ValueError, match="sequence_parallel=3 must be a positive integer that divides the 8 devices"):
        dataclasses.replace(dpm_pipe, sequence_parallel=3)
    with pytest.raises(ValueError, match="sequence_mode='tree' is invalid"):
        dataclasses.replace(dpm_pipe, sequence_parallel=2, sequence_mode="tree")


def test_model_directory_and_original_checkpoint(folders, dpm_pipe, tmp_path):
    """A PixArt model directory / original ``.pth`` with ``vae=`` and ``text_encoder=``; α's learned null caption
    is the negative caption ``y_embedding`` under the prompt's mask; the original DPM-Solver runs."""
    folder, _ = folders["dpm"]
    lat = nhwc(initial_latents())
    want = dpm_pipe(PROMPTS, num_inference_steps=6, latents=lat)
    config, params = from_torch(folder / "transformer")
    save_model(tmp_path / "model", config, params)
    pipe = pipelines.load(tmp_path / "model", vae=folder / "vae", text_encoder=dpm_pipe.text_encoder)
    assert pipe.method == "dpmpp_2m" and pipe.scheduler_config == pipelines.PIXART_SCHEDULER_CONFIG
    np.testing.assert_allclose(pipe(PROMPTS, num_inference_steps=6, latents=lat), want, atol=1e-6)

    # an original-format checkpoint with a learned null caption (α: 120 tokens)
    orig = ref.OrigPixArtMS(input_size=8, hidden_size=24, depth=2, num_heads=3, caption_channels=32)
    with torch.no_grad():
        randomize_(orig, seed=7)
    torch.save({"state_dict": orig.state_dict()}, tmp_path / "PixArt-tiny.pth")
    pipe = pipelines.load(tmp_path / "PixArt-tiny.pth", vae=folder / "vae", text_encoder=folder, num_heads=3)
    assert pipe.model_config.learned_null_caption and pipe.max_sequence_length == 120
    learned = pipe(PROMPTS, num_inference_steps=6, latents=lat, null_caption="learned")
    emb, mask = pipe.encode_prompt(PROMPTS)
    null = np.broadcast_to(pipe.params["y_embedder"]["y_embedding"], emb.shape)
    explicit = pipe(
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt_embeds=null,
        negative_prompt_attention_mask=mask,
        num_inference_steps=6,
        latents=lat,
    )
    negative = pipe(PROMPTS, num_inference_steps=6, latents=lat)
    err = float(np.abs(learned - explicit).max())
    print(f"learned null caption vs y_embedding as negative caption with the prompt mask: max diff {err:.1e}")
    assert err <= 1e-5 and float(np.abs(learned - negative).max()) > 1e-2
    # the original PixArt sampler: DPM-Solver on continuous times, guidance on 3 channels
    plan = pipe.plan(20, variant="dpm_solver")
    assert plan.num_model_calls == 20 and plan.model_t[0] == 999 and plan.model_t[1] != 949
    original = pipe(PROMPTS, num_inference_steps=6, latents=lat, null_caption="learned", variant="dpm_solver",
                    guidance_channels=3)  # fmt: skip
    assert np.isfinite(original).all() and float(np.abs(original - learned).max()) > 1e-3


def test_bfloat16_text_encoder(folders, dpm_pipe):
    pipe = pipelines.load(folders["dpm"][0], text_dtype="bf16")
    assert pipe.text_encoder.config.dtype == "bfloat16" and pipe.model_config.dtype == "float32"
    got, mask = pipe.encode_prompt(PROMPTS)
    want, want_mask = dpm_pipe.encode_prompt(PROMPTS)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"bf16 vs fp32 T5 features: max relative diff {err:.1e}")
    assert got.dtype == np.float32 and (mask == want_mask).all() and 0 < err < 0.05


def test_errors_name_the_bad_value(folders, dpm_pipe, tmp_path):
    folder, _ = folders["dpm"]
    emb, mask = dpm_pipe.encode_prompt(PROMPTS[:1])
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds, not both"):
        dpm_pipe(PROMPTS[:1], prompt_embeds=emb, prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds"):
        dpm_pipe()
    with pytest.raises(ValueError, match="prompt_attention_mask is required"):
        dpm_pipe(prompt_embeds=emb)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 32\)"):
        dpm_pipe(prompt_embeds=emb[..., :8], prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="height=48, width=72 must be multiples of 16"):
        dpm_pipe(PROMPTS, height=48, width=72)
    with pytest.raises(ValueError, match="use_resolution_binning=True: no aspect-ratio bins for sample size 8"):
        dpm_pipe(PROMPTS, use_resolution_binning=True)
    with pytest.raises(ValueError, match="has no learned null caption"):
        dpm_pipe(PROMPTS, null_caption="learned")
    with pytest.raises(ValueError, match="null_caption='none' is invalid"):
        dpm_pipe(PROMPTS, null_caption="none")
    with pytest.raises(ValueError, match=r"latents must be NHWC of shape \(2, 4, 4, 4\)"):
        dpm_pipe(PROMPTS, height=32, width=32, latents=np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        dpm_pipe(PROMPTS, negative_prompt=["a", "b", "c"])
    # KV compression (ratio 2) needs a token grid divisible by 2: 48×80 px is 3×5 tokens
    config, params = enable_kv_compress(dpm_pipe.model_config, dpm_pipe.params, (1,))
    kv = dataclasses.replace(dpm_pipe, model_config=config, params=params)
    with pytest.raises(ValueError, match="give a 3x5 token grid, which KV compression with ratio 2 cannot divide"):
        kv(PROMPTS, height=48, width=80)
    # loading
    config, params = from_torch(folder / "transformer")
    save_model(tmp_path / "model", config, params)
    with pytest.raises(ValueError, match="is a text-to-image PixArt: pass text_encoder="):
        pipelines.load(tmp_path / "model", vae=folder / "vae")
    with pytest.raises(FileNotFoundError, match="missing-t5"):
        pipelines.load(tmp_path / "model", vae=folder / "vae", text_encoder=tmp_path / "missing-t5")
    with pytest.raises(ValueError, match="text_dtype='fp16' is invalid"):
        pipelines.load(folder, text_dtype="fp16")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((folder / "model_index.json").read_text())
    for part in ("transformer", "vae", "scheduler", "text_encoder"):
        (broken / part).symlink_to(folder / part)
    with pytest.raises(ValueError, match=r"needs a 'tokenizer' component"):
        pipelines.load(broken)
    assert math.isfinite(dpm_pipe.guidance_scale)
