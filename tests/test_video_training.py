"""Video training: 5-D batches (B, F, H, W, C) through the shared trainer and planner via the family protocol, video
precompute (GIF / frame-folder / MP4 clips → a tiny random Wan VAE's latents + a tiny UMT5's ``context``, frames ×
resolution buckets) trained on by a tiny Wan (flow matching, text dropout, EMA, checkpoints, resume, GIF previews),
the video quickstart config end to end with its evaluator, the evaluator on synthetic clips, and the Wan fine-tuning
config's sequence-parallel plan."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from dit_jax import evaluate as evaluate_cli
from dit_jax import evaluate_video, pipelines, plan
from dit_jax.checkpoint import save_model
from dit_jax.data import buckets, create_dataset, records, videos
from dit_jax.data import moving_digits as md
from dit_jax.data.precompute import main as precompute_main
from dit_jax.data.transforms import hflip, resize_center_crop, to_model_range
from dit_jax.demo import table_prompts
from dit_jax.encoders import wan_vae
from dit_jax.models import family_of, init_params, preset
from dit_jax.models.flops import forward_flops
from dit_jax.train import objectives, trainer
from dit_jax.train.config import base_config, load_config_file
from dit_jax.train.metrics import read_metrics
from dit_jax.train.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_WAN = dict(input_size=4, input_frames=3, patch_size=2, patch_size_t=1, in_channels=4, out_channels=4,
                hidden_size=24, num_heads=2, depth=1, ffn_dim=32, text_dim=16, freq_dim=16,
                rope_max_seq_len=32)  # fmt: skip
TINY_VAE = wan_vae.WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1,
                                temporal_downsample=(False, True, True), latents_mean=(0.3, -0.2, 0.5, -0.7),
                                latents_std=(1.5, 0.8, 2.0, 1.2))  # fmt: skip
CAPTIONS = ["a red square moving right", "the blue sofa", "a cat", "red", "an astronaut riding a horse", "the cat",
            "a horse on the sofa", "blue"]  # fmt: skip


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny models: XLA's expensive CPU passes would dominate the test time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


# ---- the family protocol's frame axis ---------------------------------------------------------------------------


def test_family_protocol_counts_frames_tokens_and_flops():
    wan = preset("Wan2.1-T2V-1.3B", **TINY_WAN)
    family = family_of(wan)
    assert family.example_shape(wan) == (3, 4, 4, 4)
    assert family.num_tokens(wan, (3, 4, 8, 4)) == 3 * 2 * 4
    assert family.num_tokens(wan.replace(patch_size_t=3), (3, 4, 8, 4)) == 2 * 4
    full = preset("Wan2.1-T2V-1.3B")
    assert family.num_tokens(full, (21, 60, 104, 16)) == 32_760  # 81 frames at 480×832
    flops = family.batch_flops(wan, {"x": (2, 5, 4, 8, 4), "context": (2, 7, 16)})
    assert flops == 2 * family.forward_flops(wan, 4, 8, 7, frames=5)
    dit = preset("DiT-S/2")  # images: the default counts what the trainer counted before
    assert family_of(dit).batch_flops(dit, {"x": (3, 32, 32, 4), "y": (3,)}) == 3 * forward_flops(dit, 32, 32)
    assert family_of(dit).example_shape(dit) == (32, 32, 4) and family_of(dit).num_tokens(dit, (32, 32, 4)) == 256
    batch = plan.abstract_batch(wan, 2)
    assert batch["x"].shape == (2, 3, 4, 4, 4) and batch["context"].shape == (2, 512, 16)
    assert plan.abstract_batch(wan, 2, (5, 4, 8, 4))["x"].shape == (2, 5, 4, 8, 4)
    # text dropout: dropped rows get zero features
    context = jnp.ones((3, 2, 16))
    dropped = family.drop_condition(wan, {"context": context}, jnp.asarray([True, False, True]))["context"]
    assert float(jnp.abs(dropped[0]).max()) == 0 and float(jnp.abs(dropped[1] - 1).max()) == 0


def test_dynamic_shift_counts_spacetime_tokens_and_bad_batches_are_named():
    from dit_jax.diffusion.schedules import FlowSchedule

    seen = []
    loss_fn = objectives.make_loss_fn(
        "flow", {}, FlowSchedule(dynamic_shift=True), num_tokens=lambda shape: seen.append(shape) or 96
    )
    x0 = jnp.zeros((2, 3, 4, 8, 4))
    loss, _ = loss_fn(lambda x, t: jnp.zeros_like(x), x0, jax.random.split(jax.random.key(0), 2))
    assert seen == [(3, 4, 8, 4)] and loss.shape == (2,)
    wan = preset("Wan2.1-T2V-1.3B", **TINY_WAN)
    with pytest.raises(ValueError, match=r"5-D inputs like \(B, 3, 4, 4, 4\) \(videos\)"):
        trainer._check_batch({"x": np.zeros((8, 4, 4, 4))}, wan, 8)


# ---- video buckets and sources ----------------------------------------------------------------------------------


def test_frame_buckets_and_video_flips():
    assert buckets.frame_counts(81) == tuple(range(1, 82, 4)) and buckets.frame_counts(9) == (1, 5, 9)
    with pytest.raises(ValueError, match="1 \\+ 4·k"):
        buckets.frame_counts(8)
    sizes = ((16, 48), (32, 32), (48, 16))
    assert buckets.video_bucket(12, 40, 48, sizes, (1, 5, 9)) == (9, 32, 32)
    assert buckets.video_bucket(12, 40, 48, sizes, (1, 5, 9), frame_stride=2) == (5, 32, 32)  # 9 at stride 2: 17
    assert buckets.video_bucket(3, 24, 64, sizes, (5, 9)) is None
    clip = np.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
    assert (hflip(clip) == clip[:, :, ::-1]).all() and (hflip(clip[0]) == clip[0][:, ::-1]).all()


def _clip(k: int, frames: int, h: int, w: int) -> np.ndarray:
    """A moving bright square on a colour gradient: (frames, h, w, 3) uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * k % 256)], -1)
        x0 = (3 * f + 5 * k) % max(1, w - 8)
        img[h // 3 : h // 3 + 8, x0 : x0 + 8] = (255, 255, 255)
        out[f] = img
    return out


def _write(folder, name: str, frames: np.ndarray, kind: str, caption: str | None) -> None:
    path = os.path.join(folder, name)
    if kind == "gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path + ".gif", save_all=True, append_images=images[1:], duration=60, loop=0)
    elif kind == "frames":
        os.makedirs(path)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(path, f"{i:04d}.png"))
    else:
        import imageio_ffmpeg

        writer = imageio_ffmpeg.write_frames(path + ".mp4", (frames.shape[2], frames.shape[1]), fps=8,
                                             codec="libx264", pix_fmt_out="yuv444p", quality=10,
                                             macro_block_size=1, ffmpeg_log_level="error")  # fmt: skip
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    if caption is not None:
        with open(path + ".txt", "w") as f:
            f.write(caption)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """8 captioned 9-frame clips (4 GIFs, 3 frame folders, 1 MP4), a wide one, a short one and one without caption."""
    root = tmp_path_factory.mktemp("videos")
    kinds = ["gif"] * 4 + ["frames"] * 3 + ["mp4"]
    for k, kind in enumerate(kinds):
        h, w = (36, 36) if kind == "frames" else (40, 48)
        _write(root, f"clip{k}", _clip(k, 9 + (kind == "frames"), h, w), kind, CAPTIONS[k])
    _write(root, "wide", _clip(8, 9, 24, 64), "gif", "a wide clip")
    _write(root, "short", _clip(9, 5, 40, 48), "gif", "a short clip")
    _write(root, "uncaptioned", _clip(10, 9, 40, 48), "gif", None)
    return root


def test_video_folder_source_reads_gif_frames_and_mp4(video_folder):
    files, captions = videos.scan_video_folder(str(video_folder))
    assert [os.path.basename(f) for f in files][:3] == ["clip0.gif", "clip1.gif", "clip2.gif"]
    assert len(files) == 10 and all(c.endswith(".txt") for c in captions)  # the uncaptioned clip is left out
    assert videos.video_info(str(video_folder / "clip4")) == (10, 36, 36)
    assert videos.video_info(str(video_folder / "clip7.mp4")) == (9, 40, 48)
    got = videos.read_frames(str(video_folder / "clip7.mp4"), [0, 4, 8])
    want = _clip(7, 9, 40, 48)[[0, 4, 8]]
    assert got.shape == (3, 40, 48, 3) and np.abs(got.astype(int) - want).mean() < 8  # lossy H.264
    source = dict(name="video_folder", path=str(video_folder), image_size=16, num_frames=5, frame_stride=2)
    ds = create_dataset(dict(source, num_threads=1), batch_size=4, seed=0, shard_index=0, shard_count=1)
    it = iter(ds)
    batches = [next(it) for _ in range(3)]  # more than an epoch
    assert all(b["x"].shape == (4, 5, 16, 16, 3) and b["x"].min() >= -1 for b in batches)
    assert len(batches[0]["caption_text"]) == 4 and ds.x_shapes == [(5, 16, 16, 3)]
    assert ds.skipped.count >= 1  # "short": 5 frames, 9 needed at stride 2


# ---- precompute → train ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny random Wan VAE (model directory), a tiny Wan's model directory (for --model) and a UMT5 text encoder
    with its tokenizer (text_encoder/ + tokenizer/)."""
    from test_t5 import tiny_tokenizer
    from test_text_encoders_more import tiny_t5

    root = tmp_path_factory.mktemp("wan_parts")
    vae_params = init_params(TINY_VAE, 3)
    save_model(root / "vae", TINY_VAE, vae_params)
    wan = preset("Wan2.1-T2V-1.3B", **TINY_WAN)
    save_model(root / "wan", wan, init_params(wan, 1))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_t5("umt5", seed=4, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2).save_pretrained(
        root / "text" / "text_encoder"
    )
    torch.set_num_threads(n)
    tiny_tokenizer().save_pretrained(root / "text" / "tokenizer")
    return root, vae_params


def _precompute(video_folder, root, out, *extra):
    return precompute_main(["--source", str(video_folder), "--out", str(out), "--num-frames", "9",
                            "--image-size", "32", "--vae", str(root / "vae"), "--batch-size", "4",
                            "--model", str(root / "wan"), "--text-encoder", str(root / "text"),
                            "--text-dtype", "float32", "--num-threads", "2", *extra])  # fmt: skip


def test_video_precompute_then_train_tiny_wan_with_resume(tmp_path, video_folder, components):
    root, vae_params = components
    out = tmp_path / "latents"
    summary = _precompute(video_folder, root, out)
    manifest = summary.manifest
    assert manifest["num_records"] == 9 and manifest["num_skipped"] == 1  # 8 clips + the wide one; "short" skipped
    assert manifest["config"]["has_condition"] and manifest["config"]["latents_std"] == list(TINY_VAE.latents_std)
    (info,) = manifest["files"].values()
    assert info["shape"] == [3, 4, 4, 4]  # 9 frames of 32² → 3 latent frames of 4²
    # a record: the chunked encode of exactly the frames training would read, and the UMT5 condition
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(out / next(iter(manifest["files"]))))
    rec = records.decode_latent_record(reader.read([0])[0])
    reader.close()
    assert rec["source_index"] == 0 and rec["caption"] == CAPTIONS[0]
    frames = videos.read_frames(str(video_folder / "clip0.gif"), range(9))
    frames = np.stack([resize_center_crop(Image.fromarray(f), 32, 32) for f in frames])
    mean, logvar = wan_vae.encode(wan_vae.AutoencoderKLWan(TINY_VAE), vae_params, to_model_range(frames)[None])
    np.testing.assert_allclose(rec["latent_mean"], np.asarray(mean[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec["latent_logvar"], np.asarray(logvar[0]), rtol=1e-5, atol=1e-5)
    context = rec["condition"]["context"]
    rows = np.flatnonzero(np.abs(context).max(axis=1) > 0)  # the prompt's tokens, zero past its length
    assert context.shape == (512, 16) and 3 < len(rows) < 100 and (rows == np.arange(len(rows))).all()

    # the 'latents' source yields normalised 5-D clips + context; a tiny Wan trains on them and resumes
    def config(steps, sample):
        c = base_config()
        c.model = dict(name="Wan2.1-T2V-1.3B", **TINY_WAN)
        c.diffusion = dict(shift=3.0, weighting="uniform")
        c.data = dict(name="latents", path=str(out), random_flip=True, num_threads=1, prefetch_buffer_size=8)
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, steps, 1, 1
        c.optimizer.lr = 1e-3
        c.ema_decay = 0.9
        c.cfg_dropout_prob = 0.5
        c.sample.update(enabled=sample, num_steps=2, per_class=2, num_classes=1, guidance_scale=2.0,
                        vae=str(root / "vae"))  # fmt: skip
        return c

    run = str(tmp_path / "run")
    train_and_evaluate(config(2, False), run)
    train_and_evaluate(config(3, True), run)  # resumes from checkpoint 2
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in metrics)
    gif = Image.open(os.path.join(run, "samples", "step_0000003.gif"))
    assert gif.n_frames == 9  # 3 latent frames decoded by the video VAE into 9 frames
    assert Image.open(os.path.join(run, "samples", "step_0000003.png")).size[1] == 2 * 33 + 1  # 2 clips, 32 px

    # frames × resolution buckets: the wide clip gets a 16×48 bucket, the short one a 5-frame clip
    args = ["--source", str(video_folder), "--out", str(tmp_path / "bucketed"), "--num-frames", "9"]
    bucketed = precompute_main([*args, "--image-size", "32", "--vae", str(root / "vae"), "--buckets"]).manifest
    shapes = sorted(tuple(f["shape"]) for f in bucketed["files"].values())
    assert shapes == [(2, 4, 4, 4), (3, 2, 6, 4), (3, 4, 4, 4)] and bucketed["num_records"] == 10
    counts = {tuple(f["shape"]): f["records"] for f in bucketed["files"].values()}
    assert counts[(3, 4, 4, 4)] == 8 and counts[(2, 4, 4, 4)] == 1


# ---- the video quickstart and its evaluator ---------------------------------------------------------------------


def test_video_quickstart_config_end_to_end(tmp_path, capsys):
    c = load_config_file(os.path.join(ROOT, "configs", "video_quickstart.py"))
    c.batch_size, c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 8, 2, 2, 0, 1
    c.sample.update(num_steps=2, per_class=2, num_classes=2)
    run = str(tmp_path / "video_quickstart")
    train_and_evaluate(c, run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    frames = c.data.num_frames
    assert Image.open(os.path.join(run, "samples", "step_0000002.gif")).n_frames == frames
    assert evaluate_video.is_video_run(run) and not evaluate_video.is_video_run(str(tmp_path / "none"))
    code = evaluate_cli.main(["--workdir", run, "--samples_per_class", "1", "--num_steps", "2"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "direction" in out  # two steps of training: noise
    with open(os.path.join(run, "eval", "step_0000002.json")) as f:
        report = json.load(f)
    assert report["clips"] == 40 and report["samples_per_prompt"] == 1 and not report["passed"]
    assert Image.open(os.path.join(run, "eval", "step_0000002.gif")).n_frames == frames

    # the run samples by prompt without a text encoder: the trainer recorded its prompts' features
    pipe = pipelines.load(run)
    size = dict(height=16, width=16, num_frames=frames, num_inference_steps=2, guidance_scale=3.0, seed=0)
    by_prompt = pipe(["digit 3 moving left", "digit 7 moving up"], **size)
    context = md.prompt_context([3, 7], [1, 3], 16, 1)
    by_features = pipe(prompt_embeds=context, negative_prompt_embeds=np.zeros_like(context), **size)
    np.testing.assert_array_equal(by_prompt, by_features)
    assert by_prompt.shape == (2, frames, 16, 16, 1)
    with pytest.raises(ValueError, match="'a cat' is not one of the 40 prompts"):
        pipe("a cat", **size)
    offered = table_prompts(pipe)  # the web demo offers them as a list
    assert list(offered) == list(md.prompt_table(16, 1)) and np.array_equal(offered["digit 3 moving left"], context[0])


@pytest.fixture(scope="module")
def classifier():
    return evaluate_video.fit_classifier(16, cv_folds=0)[0]


def _real_clips(per_prompt: int, seed: int = 0):
    source = md.MovingDigitsSource(16, 8, 16)
    rng = np.random.default_rng(seed)
    digits, directions = evaluate_video.prompts(per_prompt)
    clips = []
    for d, k in zip(digits, directions):
        index = rng.choice(np.flatnonzero(source.labels == d)) * len(md.DIRECTIONS) + k
        example = source.load(int(index), rng)
        assert np.array_equal(example["context"], md.prompt_context([d], [k])[0])
        clips.append(example["x"])
    return np.stack(clips), digits, directions


def test_evaluator_passes_real_clips_and_fails_wrong_ones(classifier):
    clips, digits, directions = _real_clips(2)
    assert clips.shape == (80, 8, 16, 16, 1)
    perfect = evaluate_video.score_videos(clips, digits, directions, clf=classifier)
    assert perfect["passed"] and perfect["digit_accuracy"] >= 0.95 and perfect["direction_accuracy"] == 1.0
    assert perfect["mean_travel_px"] == pytest.approx(8.0)
    backwards = evaluate_video.score_videos(clips[:, ::-1], digits, directions, clf=classifier)
    assert backwards["direction_accuracy"] == 0.0 and backwards["digit_accuracy"] >= 0.95 and not backwards["passed"]
    still = evaluate_video.score_videos(np.repeat(clips[:, :1], 8, axis=1), digits, directions, clf=classifier)
    assert still["direction_accuracy"] == 0.0
    wrong = evaluate_video.score_videos(clips, (digits + 1) % 10, directions, clf=classifier)
    assert wrong["digit_accuracy"] <= 0.05 and wrong["direction_accuracy"] == 1.0
    noise = np.random.default_rng(1).uniform(-1, 1, clips.shape).astype(np.float32)
    assert evaluate_video.score_videos(noise, digits, directions, clf=classifier)["accuracy"] <= 0.1
    half = clips.copy()
    half[::2] = half[::2, ::-1]  # every other clip backwards: direction right for half of them
    assert evaluate_video.score_videos(half, digits, directions, clf=classifier)["direction_accuracy"] == 0.5


# ---- planning the Wan fine-tuning config --------------------------------------------------------------------------


def test_wan_finetune_config_plans_sequence_parallel_on_8_devices():
    c = load_config_file(os.path.join(ROOT, "configs", "wan_1_3b_finetune.py"))
    assert c.mesh.sequence == 4 and c.model.scan_blocks and c.model.remat == "full"
    c.model.update(TINY_WAN, num_heads=4, hidden_size=48, depth=2, dtype="float32")  # XLA:CPU: no bf16 seq-parallel
    c.init_from.model_dir = ""
    report = plan.plan(c, example_shape=(3, 4, 8, 4))
    assert report["fits"] and report["mesh"].startswith("data=1 fsdp=2 sequence=4")
    assert report["example_shape"] == [3, 4, 8, 4] and report["tokens_per_example"] == 24


def test_moving_digits_centred_option_fixes_the_position_across_the_motion():
    centred = md.MovingDigitsSource(16, 8, 16, random_offset=False)
    a, b = (centred.load(5, np.random.default_rng(seed))["x"] for seed in (0, 1))  # digit record 1, moving left
    assert np.array_equal(a, b)
    rows = np.flatnonzero((a[..., 0] > -1).any(axis=(0, 2)))  # horizontal motion: the glyph's rows never change
    assert rows.min() >= 4 and rows.max() < 12
    free = md.MovingDigitsSource(16, 8, 16)
    assert len({free.load(5, np.random.default_rng(seed))["x"].tobytes() for seed in range(6)}) > 1
    ds = create_dataset(dict(name="moving_digits", random_offset=False, num_threads=1), batch_size=2, seed=0,
                        shard_index=0, shard_count=1)  # fmt: skip
    assert next(iter(ds))["x"].shape == (2, 8, 16, 16, 1)


def test_moving_digits_prompt_layouts():
    two, one = md.prompt_context([3, 7], [1, 2]), md.prompt_context([3, 7], [1, 2], tokens=1)
    assert two.shape == (2, 2, 16) and one.shape == (2, 1, 16)
    assert (np.flatnonzero(two[0, 0]) == [3]).all() and (np.flatnonzero(two[0, 1]) == [11]).all()
    assert (np.flatnonzero(one[1, 0]) == [7, 12]).all() and np.array_equal(one[:, 0], two.sum(axis=1))
    with pytest.raises(ValueError, match="one token"):
        md.prompt_context([3], [1], tokens=3)
    source = md.MovingDigitsSource(16, 4, 16, random_offset=False, prompt_tokens=1)
    assert source.load(0, np.random.default_rng(0))["context"].shape == (1, 16)


def test_moving_digits_trail_shows_the_previous_position_below_the_ink_threshold():
    plain = md.MovingDigitsSource(16, 4, 16, random_offset=False).load(0, np.random.default_rng(0))["x"]
    trailed = md.MovingDigitsSource(16, 4, 16, random_offset=False, trail=0.35).load(0, np.random.default_rng(0))["x"]
    ink_plain, ink_trail = (plain + 1) / 2, (trailed + 1) / 2  # digit record 0 moving right
    assert np.array_equal(ink_trail[0], ink_plain[0])
    for k in range(1, 4):
        np.testing.assert_allclose(ink_trail[k], np.maximum(ink_plain[k], 0.35 * ink_plain[k - 1]), atol=1e-6)
    assert (ink_trail - ink_plain).max() > 0.1
    # the evaluator sees the glyph only: the same centres of mass
    np.testing.assert_allclose(
        evaluate_video.centres_of_mass(trailed[None]), evaluate_video.centres_of_mass(plain[None])
    )
    with pytest.raises(ValueError, match="data.trail"):
        md.MovingDigitsSource(16, 4, 16, trail=0.6)
