"""Text-to-image pipelines of the MM-DiT families: ``dit_jax.pipelines.load`` + ``TextToImagePipeline`` against
diffusers ``StableDiffusion3Pipeline`` and ``FluxPipeline``.

The references are diffusers pipelines of tiny random components built offline and saved with ``save_pretrained``:
the SD3.5-style tiny transformer of FAMILIES.md (dual attention in block 0, RMS qk-norm) and the tiny Flux
transformer (dev with a guidance embedding, schnell without), every parameter re-randomised; a random two-block
``AutoencoderKL`` with 16 latent channels and the SD3 / Flux scaling and shift factors; random tiny CLIP text models
(``CLIPTextModelWithProjection`` ×2 for SD3, ``CLIPTextModel`` for Flux) with a byte-level BPE tokenizer written here
(its EOS has the largest id, so the legacy EOS pooling, argmax of the ids, finds it); a random tiny T5 with the
offline T5 tokenizer of ``test_t5``; ``FlowMatchEulerDiscreteScheduler`` (SD3: shift 3; Flux-dev: dynamic shift;
schnell: shift 1). Both sides start from the same latents (diffusers' Flux takes them packed) and encode the prompts
themselves. Criterion: images in [0, 1] within 3e-4 (``parity.check_images``).
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from parity import check_images, nhwc, randomize_, randomize_encoder_
from test_t5 import tiny_t5, tiny_tokenizer

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.convert import from_torch
from dit_jax.models import build
from dit_jax.models.family import family_named
from dit_jax.pipelines import TextToImagePipeline
from dit_jax.pipelines.text_to_image import EmbedsKeys

PROMPTS = ["a cat sitting on the red sofa", "a photo of an astronaut riding a horse"]
STEPS = 6
T5_LENGTH = 24  # max_sequence_length of the parity runs (the pipelines' defaults, 256 and 512, are checked apart)
HEIGHT, WIDTH = 32, 48  # pixels: 16×24 latents (VAE factor 2), a non-square 8×12 token grid
SD3_TRANSFORMER = dict(  # FAMILIES.md tiny config, 16 latent channels
    sample_size=16,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    out_channels=16,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
FLUX_TRANSFORMER = dict(  # FAMILIES.md tiny config; 64 packed channels = 16 latent channels × 2 × 2
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
VAE = dict(
    block_out_channels=(8, 8),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=32,
)
VAE_FACTORS = {  # MODELS.md §6
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
}
# CLIP text models: widths 16 (CLIP-L-like) and 12 (CLIP-G-like); SD3 zero-pads 16 + 12 = 28 to the T5 width 32
CLIP = dict(vocab_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            projection_dim=8, eos_token_id=2, bos_token_id=62, pad_token_id=1, layer_norm_eps=1e-5)  # fmt: skip
BOS, EOS = 62, 63


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The host's cores are shared: torch with several threads is much slower here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny components, built offline ----------------------------------------------------------------------------


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer over a tiny byte-level BPE vocabulary (letters, letters ending a word, a few merges, "!"),
    ``<|startoftext|>`` 62 and ``<|endoftext|>`` 63: the EOS has the largest id, as in CLIP's real vocabulary.
    ``pad_token``: CLIP-L pads with its EOS, CLIP-G (SD3's second tokenizer) with "!"."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = list(letters) + [c + "</w>" for c in letters] + ["".join(m) for m in merges] + ["!"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def tiny_clip(projection: bool, hidden_size: int, hidden_act: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**CLIP, hidden_size=hidden_size, hidden_act=hidden_act)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return randomize_encoder_(model, seed, norms="layer_norm", unit=("token_embedding", "position_embedding"))


def tiny_vae(kind: str):
    """A random VAE whose output layer is rescaled so decoded images mostly stay inside [−1, 1]."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE, **VAE_FACTORS[kind]).eval()
    with torch.no_grad():
        randomize_encoder_(vae, seed=2)
        z = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(3)) / vae.config.scaling_factor
        std = vae.decode(z).sample.std()
        vae.decoder.conv_out.weight.mul_(0.4 / std)
        vae.decoder.conv_out.bias.mul_(0.4 / std)
    return vae


def tiny_transformer(cls_name: str, seed: int, **kw):
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**kw).eval()
    with torch.no_grad():
        randomize_(model, seed=seed + 1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Pipeline folders and their torch pipelines: SD3 (with and without T5), Flux-dev and Flux-schnell."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("mmdit_pipelines")
    t5, t5_tok = tiny_t5(seed=4), tiny_tokenizer()
    sd3_parts = dict(
        transformer=tiny_transformer("SD3Transformer2DModel", 1, **SD3_TRANSFORMER),
        vae=tiny_vae("sd3"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip(True, 16, "quick_gelu", seed=5),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip(True, 12, "gelu", seed=6),
        tokenizer_2=clip_tokenizer(pad_token="!"),
    )
    flux_parts = dict(vae=tiny_vae("flux"), text_encoder=tiny_clip(False, 16, "quick_gelu", seed=7),
                      tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok)  # fmt: skip
    dev_scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's hub config
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipes = {
        "sd3": StableDiffusion3Pipeline(**sd3_parts, text_encoder_3=t5, tokenizer_3=t5_tok),
        "sd3_no_t5": StableDiffusion3Pipeline(**sd3_parts, text_encoder_3=None, tokenizer_3=None),
        "dev": FluxPipeline(
            transformer=tiny_transformer("FluxTransformer2DModel", 8, guidance_embeds=True, **FLUX_TRANSFORMER),
            scheduler=dev_scheduler,
            **flux_parts,
        ),
        "schnell": FluxPipeline(
            transformer=tiny_transformer("FluxTransformer2DModel", 9, guidance_embeds=False, **FLUX_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
            **flux_parts,
        ),
    }
    out = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
        out[name] = (root / name, pipe)
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    """``dit_jax.pipelines.load`` of each folder, loaded once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = pipelines.load(folders[name][0])
        return cache[name]

    return get


# ---- running the references ------------------------------------------------------------------------------------


def initial_latents(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 16, HEIGHT // 2, WIDTH // 2).astype(np.float32)  # NCHW


def run_diffusers(pipe, prompts, latents_nchw, monkeypatch, **kw):
    """The diffusers pipeline from fixed latents (packed for Flux); returns (images NHWC, final latents NHWC)."""
    from diffusers import FluxPipeline

    seen = {}
    decode = pipe.vae.decode

    def spy(z, *a, **k):
        seen["z"] = z.detach().numpy().copy()
        return decode(z, *a, **k)

    monkeypatch.setattr(pipe.vae, "decode", spy)
    lat = torch.from_numpy(latents_nchw)
    if isinstance(pipe, FluxPipeline):
        lat = FluxPipeline._pack_latents(lat, *lat.shape)
    kw = {"num_inference_steps": STEPS, "max_sequence_length": T5_LENGTH, "height": HEIGHT, "width": WIDTH, **kw}
    with torch.no_grad():
        images = pipe(prompts, latents=lat, output_type="np", **kw).images
    monkeypatch.setattr(pipe.vae, "decode", decode)
    cfg = pipe.vae.config
    return np.asarray(images), (nhwc(seen["z"]) - cfg.shift_factor) * cfg.scaling_factor


def compare(name, pipe, torch_pipe, monkeypatch, prompts=PROMPTS, batch=None, seed=0, **kw):
    """Run both pipelines on the same latents and check the images and the final latents."""
    lat = initial_latents(batch or len(prompts), seed)
    want, want_z = run_diffusers(torch_pipe, prompts, lat, monkeypatch, **kw)
    ours = dict(kw, max_sequence_length=T5_LENGTH, num_inference_steps=STEPS)
    got_z = pipe(prompts, latents=nhwc(lat), output_type="latent", **ours)
    got = pipe.decode(got_z)  # = output_type="np" (no resizing here), one sampler run fewer
    assert got.shape == (len(lat), HEIGHT, WIDTH, 3) and got.dtype == np.float32
    return check_images(name, got, want, got_z, want_z), got


# ---- SD3 / SD3.5 -----------------------------------------------------------------------------------------------


def test_sd3_pipeline_parity(folders, loaded, monkeypatch):
    """Three encoders with their own prompts (prompt_3 for T5), a negative prompt, CFG 7 with the shift-3 Euler
    sampler, a non-square image."""
    pipe = loaded("sd3")
    assert isinstance(pipe, TextToImagePipeline) and pipe.method == "euler"
    assert (pipe.num_inference_steps, pipe.guidance_scale, pipe.max_sequence_length) == (28, 7.0, 256)
    assert sorted(pipe.encoders) == ["clip_g", "clip_l", "t5"] and pipe.text_encoder is None
    kw = dict(prompt_3=["a red horse", "the dog"], negative_prompt="a blue dog")
    err, got = compare("SD3 (CLIP-L, CLIP-G, T5), CFG 7", pipe, folders["sd3"][1], monkeypatch, **kw)
    # the guidance is not a no-op, and a new scale reuses the compiled loop
    n = len(pipe._compiled)
    other = pipe(PROMPTS, **dict(kw, guidance_scale=2.0), latents=nhwc(initial_latents(2)), num_inference_steps=STEPS,
                 max_sequence_length=T5_LENGTH)  # fmt: skip
    assert len(pipe._compiled) == n and float(np.abs(other - got).max()) > 1e-2


def test_sd3_without_t5_and_images_per_prompt(folders, loaded, monkeypatch):
    """A folder saved without T5 (``text_encoder_3`` null: zero T5 features of max_sequence_length tokens), two
    images per prompt, the default negative prompt ""."""
    pipe = loaded("sd3_no_t5")
    assert sorted(pipe.encoders) == ["clip_g", "clip_l"]
    lat = initial_latents(4, seed=1)
    want, want_z = run_diffusers(folders["sd3_no_t5"][1], PROMPTS, lat, monkeypatch, num_images_per_prompt=2,
                                 max_sequence_length=256)  # fmt: skip
    got = pipe(PROMPTS, latents=nhwc(lat), num_inference_steps=STEPS, num_images_per_prompt=2)
    check_images("SD3 without T5, 2 images per prompt", got, want)


def test_sd3_skip_layer_guidance(folders, loaded, monkeypatch):
    """SD3.5-medium's skip-layer guidance: blocks 1 and 2 skipped at steps 1 and 2 of 6 (start 0.01, stop 0.5)."""
    pipe = loaded("sd3")
    # the family hands the condition's static ``skip_layers`` to the model
    x, t = np.random.RandomState(0).randn(1, 16, 16, 16).astype(np.float32), np.array([500.0], np.float32)
    cond = {"context": np.ones((1, 5, 32), np.float32), "pooled": np.ones((1, 16), np.float32)}
    model, apply = build(pipe.model_config), pipe.family.apply
    both = jax.jit(lambda p: (apply(model, p, x, t, cond), apply(model, p, x, t, {**cond, "skip_layers": (1,)})))
    full, skipped = both(pipe.params)
    assert float(np.abs(full - skipped).max()) > 1e-3, "SD3Family.apply must pass condition['skip_layers'] on"
    kw = dict(skip_guidance_layers=[1, 2], skip_layer_guidance_scale=2.0, skip_layer_guidance_stop=0.5)
    err, got = compare("SD3 skip-layer guidance [1, 2]", pipe, folders["sd3"][1], monkeypatch, **kw)
    plain = pipe(PROMPTS, latents=nhwc(initial_latents(2)), num_inference_steps=STEPS, max_sequence_length=T5_LENGTH)
    assert float(np.abs(plain - got).max()) > 1e-3


def test_sd3_prompt_embeds_and_clip_skip(folders, loaded, monkeypatch):
    """diffusers' ``encode_prompt`` embeddings (``prompt_embeds`` + ``pooled_prompt_embeds`` and the negatives) give
    diffusers' images; ours equal theirs; without negative embeddings the negative prompt is encoded to the
    embeddings' length; ``clip_skip=1`` (both CLIPs' ``hidden_states[-3]``) gives diffusers' ``clip_skip=1`` images."""
    pipe, torch_pipe = loaded("sd3"), folders["sd3"][1]
    with torch.no_grad():
        want = torch_pipe.encode_prompt(
            PROMPTS, None, None, negative_prompt="a blue dog", max_sequence_length=T5_LENGTH
        )
    got = pipe.encode_prompt(PROMPTS, T5_LENGTH, negative_prompt="a blue dog")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, g, w in zip(names, got, want):
        err = float(np.abs(g - w.numpy()).max())
        print(f"SD3 encode_prompt {name} {g.shape}: max diff {err:.1e}")
        assert g.shape == tuple(w.shape) and g.dtype == np.float32 and err <= 1e-5
    kw = dict(zip(names, want))
    err, got_images = compare("SD3 from prompt_embeds + pooled_prompt_embeds", pipe, torch_pipe, monkeypatch,
                              prompts=None, batch=2, **kw)  # fmt: skip
    # no negative embeddings: negative_prompt is encoded with the 24 T5 tokens of prompt_embeds (77 + 24)
    lat = nhwc(initial_latents(2))
    plain = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, max_sequence_length=T5_LENGTH, output_type="latent")
    embeds = pipe(prompt_embeds=kw["prompt_embeds"], pooled_prompt_embeds=kw["pooled_prompt_embeds"], latents=lat,
                  num_inference_steps=STEPS, output_type="latent")  # fmt: skip
    err = float(np.abs(plain - embeds).max())
    print(f"SD3 prompt_embeds + encoded negative prompt vs prompts: max latent diff {err:.1e}")
    assert err <= 1e-4
    # clip_skip: other CLIP features (the pooled vectors stay the final layer's), diffusers' images
    skipped = pipe.text_condition(PROMPTS, max_sequence_length=T5_LENGTH, clip_skip=1)
    default = pipe.text_condition(PROMPTS, max_sequence_length=T5_LENGTH)
    np.testing.assert_array_equal(skipped["pooled"], default["pooled"])
    assert float(np.abs(skipped["context"][:, :77] - default["context"][:, :77]).max()) > 1e-2
    np.testing.assert_array_equal(skipped["context"][:, 77:], default["context"][:, 77:])  # T5 ignores clip_skip
    compare("SD3 clip_skip=1", pipe, torch_pipe, monkeypatch, clip_skip=1, negative_prompt="a blue dog")


# ---- Flux ------------------------------------------------------------------------------------------------------


def test_flux_dev_pipeline_parity(folders, loaded, monkeypatch):
    """FLUX.1-dev style: CLIP pooled + T5 (prompt_2), embedded guidance 3.5 (no CFG), explicit sigmas shifted by μ of
    the 96 packed image tokens."""
    pipe = loaded("dev")
    assert (pipe.num_inference_steps, pipe.guidance_scale, pipe.max_sequence_length) == (28, 3.5, 512)
    assert sorted(pipe.encoders) == ["clip", "t5"]
    kw = dict(prompt_2=["a red horse", "the dog"])
    err, got = compare("Flux-dev (CLIP, T5), embedded guidance 3.5", pipe, folders["dev"][1], monkeypatch, **kw)
    traj = pipe.trajectory(STEPS, height=HEIGHT, width=WIDTH)
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    mu = 0.5 + (96 - 256) * (1.15 - 0.5) / (4096 - 256)
    want_t = 1000 * np.exp(mu) / (np.exp(mu) + 1 / sigmas - 1)
    np.testing.assert_allclose(traj.model_t, want_t, rtol=1e-6)
    # the embedded guidance reaches the model: another scale, other images (one model call per step: no CFG)
    other = pipe(PROMPTS, prompt_2=kw["prompt_2"], latents=nhwc(initial_latents(2)), guidance_scale=1.0,
                 num_inference_steps=STEPS, max_sequence_length=T5_LENGTH)  # fmt: skip
    assert float(np.abs(other - got).max()) > 1e-3


def test_flux_schnell_true_cfg(folders, loaded, monkeypatch):
    """FLUX.1-schnell style (no guidance embedding, shift 1): guidance_scale is ignored; true CFG with a negative
    prompt and true_cfg_scale, as FluxPipeline."""
    pipe = loaded("schnell")
    kw = dict(negative_prompt="a blue dog", true_cfg_scale=2.5)
    compare("Flux-schnell, true CFG 2.5", pipe, folders["schnell"][1], monkeypatch, **kw)
    assert pipe.guidance_scale == 3.5  # FluxPipeline's default, which a model without guidance embedding ignores


def test_flux_prompt_embeds(folders, loaded, monkeypatch):
    """FluxPipeline.encode_prompt's T5 ``prompt_embeds`` and CLIP ``pooled_prompt_embeds``, with negative ones under
    true CFG (schnell), give diffusers' images."""
    pipe, torch_pipe = loaded("schnell"), folders["schnell"][1]
    with torch.no_grad():
        pe, pooled, _ = torch_pipe.encode_prompt(PROMPTS, ["a red horse", "the dog"], max_sequence_length=T5_LENGTH)
        neg, neg_pooled, _ = torch_pipe.encode_prompt(["a blue dog"] * 2, max_sequence_length=T5_LENGTH)
    got, _, got_pooled, _ = pipe.encode_prompt(PROMPTS, T5_LENGTH, prompt_2=["a red horse", "the dog"],
                                               do_classifier_free_guidance=False)  # fmt: skip
    err = max(float(np.abs(got - pe.numpy()).max()), float(np.abs(got_pooled - pooled.numpy()).max()))
    print(f"Flux encode_prompt (T5 {got.shape}, pooled {got_pooled.shape}) vs diffusers: max diff {err:.1e}")
    assert err <= 1e-5
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
              negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=2.5)  # fmt: skip
    compare("Flux-schnell from prompt_embeds, true CFG 2.5", pipe, torch_pipe, monkeypatch, prompts=None, batch=2, **kw)


# ---- other sources ---------------------------------------------------------------------------------------------


def test_model_directory_with_text_encoders(folders, loaded, tmp_path):
    """An SD3 model directory with ``vae=`` and the text encoders of a pipeline folder (``text_encoder=``) or per
    slot (``text_encoders=``): the same text condition as the folder's pipeline, the family's default sampler."""
    folder = folders["sd3"][0]
    save_model(tmp_path / "model", *from_torch(folder / "transformer"))
    want = loaded("sd3").text_condition(PROMPTS, max_sequence_length=T5_LENGTH)
    pipe = pipelines.load(tmp_path / "model", vae=folder / "vae", text_encoder=folder)
    assert sorted(pipe.encoders) == ["clip_g", "clip_l", "t5"] and pipe.method == "euler"
    assert pipe.scheduler_config == pipelines.SD3_SCHEDULER_CONFIG and pipe.max_sequence_length == 256
    got = pipe.text_condition(PROMPTS, max_sequence_length=T5_LENGTH)
    assert sorted(got) == ["context", "pooled"] and got["context"].shape == (2, 77 + T5_LENGTH, 32)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # the folder's CLIPs and no T5: zero T5 features; a missing encoder source is an error
    clips = {k: pipe.encoders[k] for k in ("clip_l", "clip_g")}
    no_t5 = pipelines.load(tmp_path / "model", vae=folder / "vae", text_encoders=clips)
    assert sorted(no_t5.encoders) == ["clip_g", "clip_l"]
    with pytest.raises(ValueError, match=r"is a text-to-image SD3: pass text_encoder= \(a SD3 pipeline folder"):
        pipelines.load(tmp_path / "model", vae=folder / "vae")


def test_stability_single_file_with_text_encoder_folders(folders, monkeypatch, tmp_path):
    """A Stability single file (``model.diffusion_model.*`` beside the LDM VAE under ``first_stage_model.``) loads
    without ``vae=``, its text encoders from a pipeline folder: the same images as diffusers with those weights. (The
    VAE has 32 groups per norm, the LDM default: the file cannot tell norm_num_groups.)"""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from safetensors.numpy import save_file

    from dit_jax.convert import to_torch

    folder, torch_pipe = folders["sd3"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**VAE, "block_out_channels": (32, 32), "norm_num_groups": 32}, **VAE_FACTORS["sd3"]).eval()
    with torch.no_grad():
        randomize_encoder_(vae, seed=11)
        vae.decoder.conv_out.weight.mul_(0.1)
    vae_folder = tmp_path / "vae"
    vae.save_pretrained(vae_folder)
    config, params = from_torch(folder / "transformer")
    vae_config, vae_params = from_torch(vae_folder)
    sd = {f"model.diffusion_model.{k}": v for k, v in to_torch(config, params, format="original").items()}
    sd.update({f"first_stage_model.{k}": v for k, v in to_torch(vae_config, vae_params, format="original").items()})
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "sd3_tiny.safetensors"))
    pipe = pipelines.load(tmp_path / "sd3_tiny.safetensors", text_encoder=folder)
    assert pipe.vae_config.scaling_factor == pytest.approx(1.5305) and pipe.method == "euler"
    reference = StableDiffusion3Pipeline(**{**torch_pipe.components, "vae": vae})
    reference.set_progress_bar_config(disable=True)
    compare("SD3 single file + text encoder folders", pipe, reference, monkeypatch)


def test_cli_flux_prompt_2_and_true_cfg_error(folders, loaded, tmp_path, capsys):
    """``python -m dit_jax.sample`` on the Flux-dev folder: ``--prompt-2``, ``--guidance`` (embedded) and
    ``--max-sequence-length`` give the in-process pipeline's images; ``--true-cfg`` on SD3 is one error line."""
    from PIL import Image

    from dit_jax.sample import main

    out = tmp_path / "grid.png"
    argv = [
        "--pipeline",
        str(folders["dev"][0]),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--prompt-2",
        "the dog",
    ]
    argv += ["--steps", str(STEPS), "--guidance", "2.0", "--height", str(HEIGHT), "--width", str(WIDTH)]
    argv += ["--max-sequence-length", str(T5_LENGTH), "--nrow", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    images = loaded("dev")(PROMPTS, prompt_2="the dog", guidance_scale=2.0, height=HEIGHT, width=WIDTH,
                           num_inference_steps=STEPS, max_sequence_length=T5_LENGTH, seed=0)  # fmt: skip
    want = pipelines.make_grid(pipelines.to_uint8(images), nrow=2)
    got = np.asarray(Image.open(out))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    capsys.readouterr()
    argv = ["--pipeline", str(folders["sd3_no_t5"][0]), "--prompt", "a cat", "--true-cfg", "2", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: --true-cfg applies to models with embedded guidance (Flux); use --guidance for SD3\n"
    # --clip-skip reaches the pipeline (the tiny CLIPs have 2 layers: at most 1)
    argv = ["--pipeline", str(folders["sd3_no_t5"][0]), "--prompt", "a cat", "--clip-skip", "2", "--out", str(out)]
    argv += ["--steps", "1", "--no-progress"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("error: clip_skip=2 skips more layers than the 2-layer CLIP encoder")


# ---- errors ----------------------------------------------------------------------------------------------------


def test_errors_name_the_problem(folders, loaded, tmp_path):
    sd3, flux = loaded("sd3_no_t5"), loaded("schnell")
    with pytest.raises(ValueError, match=r"latents must be NHWC of shape \(2, 16, 24, 16\)"):
        sd3(PROMPTS, height=HEIGHT, width=WIDTH, latents=np.zeros((2, 16, 16, 16)))
    with pytest.raises(ValueError, match=r"latents must be NHWC of shape \(B, h, w, 16\)"):
        flux(PROMPTS, latents=np.zeros((2, 64, 8, 12)))
    # precomputed embeddings of a model with a pooled text vector: the inputs they fill, from condition_specs
    assert sd3.embeds_keys() == EmbedsKeys("context", 32, None, "pooled", 16, offset=77)  # 77 CLIP tokens, then T5
    assert flux.embeds_keys() == EmbedsKeys("context", 32, None, "pooled", 16, offset=0)
    emb, pooled = np.zeros((2, 8, 32)), np.zeros((2, 16))
    with pytest.raises(
        ValueError, match=r"prompt_embeds need pooled_prompt_embeds as well: a SD3 model takes a pooled"
    ):
        sd3(prompt_embeds=emb)
    with pytest.raises(ValueError, match="prompt_attention_mask does not apply: a SD3 model takes no text mask"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, prompt_attention_mask=np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 32\), got shape \(2, 8, 28\)"):
        sd3(prompt_embeds=np.zeros((2, 8, 28)), pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must be \(2, 16\) .*got shape \(1, 16\)"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled[:1])
    with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds must be \(2, 16\) .*got shape \(2, 12\)"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=emb,
            negative_pooled_prompt_embeds=np.zeros((2, 12)))  # fmt: skip
    with pytest.raises(ValueError, match="pooled_prompt_embeds go with prompt_embeds: pass both"):
        sd3(PROMPTS, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds go with negative_prompt_embeds"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="negative_prompt_embeds need negative_pooled_prompt_embeds as well"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=emb)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds have 3 rows for 2 prompts"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=np.zeros((3, 8, 32)),
            negative_pooled_prompt_embeds=np.zeros((3, 16)))  # fmt: skip
    with pytest.raises(ValueError, match=r"negative condition's 'context' has shape \(2, 9, 32\) but the prompt's"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=np.zeros((2, 9, 32)),
            negative_pooled_prompt_embeds=pooled)  # fmt: skip
    with pytest.raises(ValueError, match=r"encoded with max_sequence_length=4: pass the max_sequence_length"):
        sd3(prompt_embeds=emb, pooled_prompt_embeds=pooled, max_sequence_length=4)  # 77 + 4 tokens, not 8
    no_text = dataclasses.replace(sd3, text_encoders={})
    with pytest.raises(ValueError, match="has no text encoder for the negative prompt of guidance: with prompt_embeds "
                       "pass negative_prompt_embeds and negative_pooled_prompt_embeds"):  # fmt: skip
        no_text(prompt_embeds=emb, pooled_prompt_embeds=pooled)
    # a model without a pooled vector (PixArt with micro-conditions: 2-D float inputs that are size conditions)
    pixart = dict(input_size=16, in_channels=16, hidden_size=24, depth=1, num_heads=2, caption_channels=32)
    tiny = family_named("pixart").config_class(**pixart, caption_length=8, micro_conditions=True)
    one_slot = dataclasses.replace(sd3, model_config=tiny, params={}, text_encoders={})
    assert one_slot.embeds_keys() == EmbedsKeys("caption", 32, "caption_mask", None, None)
    no_pooled = r"pooled_prompt_embeds: a PixArt model takes no pooled text vector \(its text inputs: caption, "
    with pytest.raises(ValueError, match=no_pooled + r"caption_mask\); pass prompt_embeds with prompt_attention_mask"):
        one_slot(prompt_embeds=emb, prompt_attention_mask=np.ones((2, 8)), pooled_prompt_embeds=pooled)
    # clip_skip: the tiny CLIPs have 2 layers (hidden_states: embeddings + 2), so at most 1
    with pytest.raises(ValueError, match=r"clip_skip=2 skips more layers than the 2-layer CLIP encoder has"):
        sd3(PROMPTS, clip_skip=2)
    with pytest.raises(ValueError, match=r"clip_skip=-1 must be None or a non-negative integer"):
        sd3(PROMPTS, clip_skip=-1)
    with pytest.raises(ValueError, match=r"clip_skip=1 applies to CLIP text encoders; a SD3 model reads prompts with"):
        dataclasses.replace(sd3, text_encoders={"t5": loaded("sd3").encoders["t5"]})(PROMPTS, clip_skip=1)
    with pytest.raises(ValueError, match="true_cfg_scale applies to models with embedded guidance"):
        sd3(PROMPTS, true_cfg_scale=2.0, height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="prompt_2 has 3 entries for 2 prompts"):
        flux(PROMPTS, prompt_2=["a", "b", "c"], height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="height=34, width=48 must be multiples of 4"):
        flux(PROMPTS, height=34, width=48)
    # a folder without its second tokenizer
    folder = folders["sd3"][0]
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(folder / "model_index.json", broken / "model_index.json")
    for part in json.loads((folder / "model_index.json").read_text()):
        if (folder / part).is_dir() and part != "tokenizer_2":
            (broken / part).symlink_to(folder / part)
    with pytest.raises(ValueError, match=r"needs a 'tokenizer_2' component"):
        pipelines.load(broken)
    # one text encoder for a three-encoder model
    with pytest.raises(ValueError, match=r"text_encoder=.* pass a SD3 pipeline folder or text_encoders="):
        pipelines.load(folder, text_encoder=sd3.encoders["clip_l"])
    with pytest.raises(ValueError, match=r"text_encoders: 'clip' is not a text slot"):
        pipelines.load(folder, text_encoders={"clip": sd3.encoders["clip_l"]})
