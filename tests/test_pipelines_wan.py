"""Text-to-video: ``dit_jax.pipelines.load`` + ``TextToVideoPipeline`` against diffusers ``WanPipeline``, video files
(``save_video``: MP4 read back with imageio, GIF/WebP), ``python -m dit_jax.sample --video``, and the error paths.

The reference is a diffusers ``WanPipeline`` of tiny random components saved with ``save_pretrained``: the FAMILIES.md
tiny ``WanTransformer3DModel`` and ``AutoencoderKLWan`` (4 levels: spatial factor 8, temporal factor 4; here with
non-trivial latent statistics so that the un-normalisation counts), a tiny ``UMT5EncoderModel`` and an offline T5
tokenizer, every parameter re-drawn, and the family's UniPC flow scheduler config. Both sides start from the same
latents (diffusers: (B, C, F, h, w); ours channels-last (B, F, h, w, C)) and encode the prompts themselves (512
tokens). Criterion: frames in [0, 1] within 3e-4.
"""

import jax
import numpy as np
import pytest
import torch
from parity import check_images, randomize_, randomize_encoder_
from test_t5 import tiny_tokenizer
from test_text_encoders_more import tiny_t5

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.convert import from_torch
from dit_jax.models import families
from dit_jax.pipelines import TextToVideoPipeline, save_video
from dit_jax.sample import main

PROMPTS = ["a cat walking on the red sofa", "an astronaut riding a horse"]
STEPS = 4
SIZE = dict(num_frames=9, height=32, width=48)  # 3 latent frames of 4×6
TRANSFORMER = dict(  # FAMILIES.md "Wan 2.1 video" tiny transformer
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
VAE = dict(  # FAMILIES.md tiny VAE, with per-channel statistics that are not 0 / 1
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.5, -0.7],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The host's cores are shared: torch with several threads is much slower here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vae():
    """A random AutoencoderKLWan (RMS-norm gammas 1 ± 0.1) whose output conv is rescaled so that decoded videos mostly
    stay inside [−1, 1] (diffusers clamps there)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = randomize_encoder_(AutoencoderKLWan(**VAE), seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        z = torch.randn(1, 4, 3, 4, 6, generator=g)
        std = vae.decode(z).sample.std()
        vae.decoder.conv_out.weight.mul_(0.4 / std)
        vae.decoder.conv_out.bias.mul_(0.4 / std)
    return vae.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A WanPipeline folder of tiny random components and the torch pipeline."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan_pipeline")
    torch.manual_seed(1)
    transformer = randomize_(WanTransformer3DModel(**TRANSFORMER).eval(), seed=1)
    text_encoder = tiny_t5("umt5", seed=4, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2)
    scheduler = UniPCMultistepScheduler.from_config(dict(families()["wan"].scheduler_config))
    pipe = WanPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=tiny_vae(), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


@pytest.fixture(scope="module")
def pipe(folder):
    return pipelines.load(folder[0])


def initial_latents(batch: int = len(PROMPTS), seed: int = 0) -> np.ndarray:
    """(B, C, F, h, w) as diffusers takes them."""
    return np.random.RandomState(seed).randn(batch, 4, 3, 4, 6).astype(np.float32)


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 4, 1))


def run_diffusers(torch_pipe, prompts, latents, monkeypatch, **kw):
    """The diffusers pipeline from fixed latents: (frames (B, F, H, W, 3), final unscaled latents channels-last)."""
    seen = {}
    decode = torch_pipe.vae.decode

    def spy(z, *a, **k):
        seen["z"] = z.detach().numpy().copy()
        return decode(z, *a, **k)

    monkeypatch.setattr(torch_pipe.vae, "decode", spy)
    with torch.no_grad():
        out = torch_pipe(prompts, latents=torch.from_numpy(latents), num_inference_steps=STEPS, output_type="np",
                         **SIZE, **kw)  # fmt: skip
    monkeypatch.setattr(torch_pipe.vae, "decode", decode)
    return np.asarray(out.frames), channels_last(seen["z"])


@pytest.mark.parametrize("negative", [None, "blurry, static, low quality"])
def test_wan_pipeline_parity(folder, pipe, negative, monkeypatch):
    _, torch_pipe = folder
    assert isinstance(pipe, TextToVideoPipeline) and pipe.method == "unipc"
    assert (pipe.num_inference_steps, pipe.guidance_scale, pipe.max_sequence_length) == (50, 5.0, 512)
    assert (pipe.vae_scale_factor, pipe.vae_temporal_factor) == (8, 4)
    lat = initial_latents()
    want, want_z = run_diffusers(torch_pipe, PROMPTS, lat, monkeypatch, negative_prompt=negative)
    got = pipe(PROMPTS, negative, num_inference_steps=STEPS, latents=channels_last(lat))
    got_z = pipe(PROMPTS, negative, num_inference_steps=STEPS, latents=channels_last(lat), output_type="latent")
    assert got.shape == (2, 9, 32, 48, 3) and got.dtype == np.float32
    cfg = pipe.vae_config
    got_z = got_z * np.asarray(cfg.latents_std, np.float32) + np.asarray(cfg.latents_mean, np.float32)
    check_images(f"Wan 2.1 text-to-video (negative {negative!r})", got, want, got_z, want_z)
    # the guidance is not a no-op, and another scale reuses the compiled loop
    n = len(pipe._compiled)
    other = pipe(PROMPTS, negative, num_inference_steps=STEPS, latents=channels_last(lat), guidance_scale=2.0)
    assert len(pipe._compiled) == n and float(np.abs(other - got).max()) > 1e-2


def test_text_and_precomputed_embeddings(folder, pipe):
    """``encode_prompt`` equals ``WanPipeline.encode_prompt`` (UMT5 at 512 tokens, zero past each prompt, cleaned
    prompts, k rows per prompt), and the embeddings give the videos the prompts give."""
    _, torch_pipe = folder
    kw = dict(num_videos_per_prompt=2, max_sequence_length=24)
    with torch.no_grad():
        want, want_neg = torch_pipe.encode_prompt(["  a cat &amp;   a dog "], "blurry", **kw)
    emb, neg = pipe.encode_prompt(["  a cat &amp;   a dog "], "blurry", **kw)
    assert emb.shape == neg.shape == (2, 24, 16) and np.all(emb[:, -4:] == 0) and np.all(neg[:, -4:] == 0)
    err = max(float(np.abs(emb - want.numpy()).max()), float(np.abs(neg - want_neg.numpy()).max()))
    print(f"encode_prompt vs WanPipeline.encode_prompt: max abs err {err:.1e}")
    assert err <= 1e-5
    assert pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[1] is None
    lat = channels_last(initial_latents())
    emb, neg = pipe.encode_prompt(PROMPTS)
    got = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=STEPS, latents=lat,
               output_type="latent")  # fmt: skip
    want = pipe(PROMPTS, num_inference_steps=STEPS, latents=lat, output_type="latent")
    np.testing.assert_array_equal(got, want)
    # without negative embeddings the negative prompt "" is encoded to the embeddings' length
    got = pipe(prompt_embeds=emb, num_inference_steps=STEPS, latents=lat, output_type="latent")
    np.testing.assert_array_equal(got, want)


def test_model_directory_vae_and_text_encoder(folder, pipe, tmp_path):
    """A model directory + ``vae=`` (a diffusers AutoencoderKLWan folder, here the pipeline folder's ``vae/``,
    through the Wan VAE's conversion; or a VAE model directory) + ``text_encoder=`` (the pipeline folder, or its UMT5
    folder with the tokenizer beside it) gives the pipeline folder's components and sampler, bit for bit."""
    path, _ = folder
    save_model(tmp_path / "wan", *from_torch(path / "transformer"))
    save_model(tmp_path / "vae", *pipelines.load_vae(path / "vae"))
    for vae, text_encoder in ((path, path), (tmp_path / "vae", path / "text_encoder")):
        other = pipelines.load(tmp_path / "wan", vae=vae, text_encoder=text_encoder)
        assert isinstance(other, TextToVideoPipeline) and other.vae_config == pipe.vae_config
        assert (other.schedule, other.method, other.options) == (pipe.schedule, pipe.method, pipe.options)
        assert (other.num_inference_steps, other.guidance_scale, other.max_sequence_length) == (50, 5.0, 512)
        for a, b in ((other.params, pipe.params), (other.vae_params, pipe.vae_params),
                     (other.text_encoder.params, pipe.text_encoder.params)):  # fmt: skip
            assert jax.tree.structure(a) == jax.tree.structure(b)
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    with pytest.raises(ValueError, match="is a text-to-video Wan: pass text_encoder="):
        pipelines.load(tmp_path / "wan", vae=path / "vae")
    with pytest.raises(ValueError, match="pass vae="):
        pipelines.load(tmp_path / "wan", text_encoder=path)


# imageio's FFMPEG reader leaves a pipe of its ffmpeg process to the garbage collector
READER_PIPE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@READER_PIPE
def test_save_video_mp4_gif_webp(tmp_path, monkeypatch):
    import imageio.v3 as iio
    from PIL import Image

    t, y, x = np.meshgrid(np.arange(9), np.arange(32), np.arange(48), indexing="ij")
    frames = np.stack([0.5 + 0.4 * np.sin(x / 7 + t / 3), 0.5 + 0.4 * np.cos(y / 5 - t / 4), (x + y) / 80], -1)
    frames = frames.astype(np.float32)  # F H W 3, smooth: what a lossy codec keeps
    mp4 = save_video(frames, tmp_path / "v.mp4", fps=16)
    back = iio.imread(mp4, plugin="FFMPEG")
    meta = iio.immeta(mp4, plugin="FFMPEG")
    assert back.shape == (9, 32, 48, 3) and meta["codec"] == "h264" and meta["fps"] == 16
    err = float(np.abs(back / 255.0 - frames).mean())
    print(f"MP4 round trip: mean abs error {err:.3f}")
    assert err < 0.02
    gif = save_video(frames, tmp_path / "v.gif", fps=10)
    with Image.open(gif) as im:
        assert (im.n_frames, im.size, im.info["duration"], im.info["loop"]) == (9, (48, 32), 100, 0)
    with Image.open(save_video((frames * 255).astype(np.uint8), tmp_path / "v.webp", fps=8)) as im:
        assert (im.n_frames, im.size) == (9, (48, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4", "v.webp"]  # no temporary files left
    with pytest.raises(ValueError, match=r"ending in \.mp4, \.gif, \.webp"):
        save_video(frames, tmp_path / "v.avi")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        save_video(frames[None], tmp_path / "w.gif")
    with pytest.raises(ValueError, match="fps=0"):
        save_video(frames, tmp_path / "w.gif", fps=0)
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"needs imageio-ffmpeg: pip install 'dit-jax\[video\]'"):
        save_video(frames, tmp_path / "w.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4", "v.webp"]


@READER_PIPE
def test_cli_video(folder, pipe, tmp_path, monkeypatch, capsys):
    """``python -m dit_jax.sample --video`` writes one MP4 (``--out``) or one file per prompt (``--out-dir``) holding
    the pipeline's videos. The run reuses the module's pipeline (``load`` is checked to get the folder; loading
    itself is tested above), so nothing compiles twice."""
    import imageio.v3 as iio
    from PIL import Image

    path, _ = folder
    calls = []

    def load(source, **kw):
        calls.append((source, kw))
        assert str(source) == str(path) and kw["vae"] is None and kw["dtype"] == "fp32"
        return pipe

    monkeypatch.setattr(pipelines, "load", load)
    base = ["--pipeline", str(path), "--video", "--num-frames", "9", "--height", "32", "--width", "48", "--steps", "4"]
    base += ["--seed", "3", "--no-progress"]
    assert main([*base, "--prompt", PROMPTS[0], "--fps", "8", "--out", str(tmp_path / "cat.mp4")]) == 0
    assert f"wrote {tmp_path / 'cat.mp4'}" in capsys.readouterr().out
    want = pipe(PROMPTS[0], num_inference_steps=STEPS, latents=pipe.prepare_latents(1, 3, **SIZE))
    back = iio.imread(tmp_path / "cat.mp4", plugin="FFMPEG")
    assert back.shape == (9, 32, 48, 3) and iio.immeta(tmp_path / "cat.mp4", plugin="FFMPEG")["fps"] == 8
    ref = iio.imread(save_video(want[0], tmp_path / "ref" / "cat.mp4", fps=8), plugin="FFMPEG")
    diff = int(np.abs(back.astype(int) - ref.astype(int)).max())
    loss = float(np.abs(back / 255.0 - want[0]).mean())
    print(f"CLI MP4 vs the pipeline's video written alike: max diff {diff} levels (H.264 loss: mean {loss:.3f})")
    assert diff <= 2
    out_dir = tmp_path / "videos"
    want = pipe(PROMPTS, num_inference_steps=STEPS, latents=pipe.prepare_latents(2, 3, **SIZE))
    argv = [*base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--batch-size", "1", "--video-format", "gif"]
    assert main([*argv, "--out-dir", str(out_dir)]) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["0000_a-cat-walking-on-the-red-sofa.gif", "0001_an-astronaut-riding-a-horse.gif"]
    for i, (name, video) in enumerate(zip(names, want)):
        with Image.open(out_dir / name) as im, Image.open(save_video(video, tmp_path / "ref" / f"{i}.gif")) as ref:
            assert im.n_frames == 9 and im.info["duration"] == 60  # 1000 / 16 fps ms, in GIF's 10-ms steps
            for k in range(9):
                im.seek(k)
                ref.seek(k)
                assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.convert("RGB")))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--classes", "1,2", "--out-dir", "v"], "text-to-video models from prompts: --classes does not apply"),
        (["--prompt", "a", "--nrow", "2", "--clip-skip", "1", "--out-dir", "v"], "--nrow, --clip-skip do not apply"),
        (["--prompt", "a", "--out", "x.png"], r"--out x.png: expected a video file name ending in \.mp4"),
        (["--prompt", "a", "--prompt", "b", "--out", "x.mp4"], "--out writes one video but 2 prompts are given"),
        (["--prompt", "a", "--num-frames", "8", "--out", "x.mp4"], r"num_frames must be 1 \+ 4·k"),
        (["--prompt", "a", "--height", "40", "--out", "x.gif"], "height and width must be multiples of 16"),
    ],
)
def test_cli_video_errors(folder, pipe, tmp_path, monkeypatch, capsys, argv, message):
    """Each mistake is one error line, before anything samples, and nothing is written."""
    import re

    monkeypatch.setattr(pipelines, "load", lambda source, **kw: pipe)
    monkeypatch.chdir(tmp_path)
    assert main(["--pipeline", str(folder[0]), "--video", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not list(tmp_path.iterdir())


def save_tiny_dit(path, in_channels: int):
    """A tiny DiT model directory (zero params: nothing compiles)."""
    import flax.linen as nn

    from dit_jax.models import DiTConfig, abstract_params

    dit = DiTConfig(input_size=4, patch_size=2, in_channels=in_channels, hidden_size=32, depth=1, num_heads=2,
                    num_classes=10, learn_sigma=False)  # fmt: skip
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(abstract_params(dit)))
    save_model(path, dit, params)
    return path


def test_cli_video_and_image_flags(folder, pipe, tmp_path, monkeypatch, capsys):
    """A video model without ``--video``, video flags without it, and ``--video`` on an image model."""
    monkeypatch.setattr(pipelines, "load", lambda source, **kw: pipe)
    out = str(tmp_path / "x.png")
    assert main(["--pipeline", str(folder[0]), "--prompt", "a", "--out", out]) == 1
    assert "is a text-to-video Wan model: add --video" in capsys.readouterr().err
    assert main(["--pipeline", str(folder[0]), "--prompt", "a", "--fps", "8", "--out", out]) == 1
    assert "--fps applies to videos: add --video" in capsys.readouterr().err
    assert main(["--pipeline", str(folder[0]), "--prompt", "a", "--out", str(tmp_path / "x.mp4")]) == 1
    assert "expected a .png file name (videos: add --video)" in capsys.readouterr().err
    monkeypatch.undo()
    save_tiny_dit(tmp_path / "dit", in_channels=3)
    argv = ["--model", str(tmp_path / "dit"), "--video", "--prompt", "a", "--num-frames", "5"]
    assert main([*argv, "--out", str(tmp_path / "x.mp4")]) == 1
    err = capsys.readouterr().err
    assert "is a class-to-image DiT model, not a text-to-video one: --video, --num-frames do not apply" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_errors(folder, pipe, tmp_path):
    path, _ = folder
    lat = channels_last(initial_latents())
    with pytest.raises(ValueError, match=r"multiples of 16 .*got 30x48; num_frames must be 1 \+ 4·k .* got 8"):
        pipe("a cat", height=30, width=48, num_frames=8)
    with pytest.raises(ValueError, match="unknown output_type 'pil'"):
        pipe("a cat", latents=lat, output_type="pil")
    with pytest.raises(ValueError, match=r"latents must be channels-last \(B, F, h, w, 4\)"):
        pipe("a cat", latents=lat[:, 0])
    with pytest.raises(ValueError, match=r"latents must be channels-last of shape \(1, 3, 4, 6, 4\)"):
        pipe("a cat", latents=lat)  # two latents for one prompt
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds"):
        pipe("a cat", prompt_embeds=np.zeros((1, 512, 16), np.float32), latents=lat[:1])
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 16\)"):
        pipe(prompt_embeds=np.zeros((1, 512, 8), np.float32), latents=lat[:1])
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        pipe(PROMPTS, ["a", "b", "c"], latents=lat)
    with pytest.raises(ValueError, match="num_videos_per_prompt=0"):
        pipe("a cat", num_videos_per_prompt=0)
    bare = TextToVideoPipeline(**{k: getattr(pipe, k) for k in ("model_config", "params", "schedule", "method",
                                                               "vae_config", "vae_params")})  # fmt: skip
    with pytest.raises(ValueError, match="has no text encoder: pass prompt_embeds="):
        bare("a cat", latents=lat[:1])
    # the VAE must fit the pipeline: a video VAE for video, an AutoencoderKL for images
    from dit_jax.encoders.vae import VAEConfig

    with pytest.raises(TypeError, match="decodes with a causal video VAE"):
        TextToVideoPipeline(pipe.model_config, pipe.params, pipe.schedule, pipe.method,
                            vae_config=VAEConfig(latent_channels=4), vae_params={})  # fmt: skip
    with pytest.raises(TypeError, match="ClassConditionalPipeline decodes with an AutoencoderKL"):
        pipelines.load(save_tiny_dit(tmp_path / "dit", in_channels=4), vae=path / "vae")
    # a Wan VAE weights file without config.json: the statistics of a 4-channel VAE are not in the weights
    from dit_jax.convert import save_torch
    from dit_jax.convert.rules import ConversionError

    save_torch(tmp_path / "vae.safetensors", pipe.vae_config, pipe.vae_params, format="diffusers")
    with pytest.raises(ConversionError, match="pass latents_mean=..., latents_std="):
        pipelines.load_vae(tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="holds a WanConfig, not a VAE"):
        pipelines.load_vae(path / "transformer")
    save_model(tmp_path / "wan", pipe.model_config, pipe.params)
    with pytest.raises(ValueError, match="is a model directory of a WanConfig, not a VAE"):
        pipelines.load_vae(tmp_path / "wan")
