"""``python -m dit_jax.sample`` end to end on tiny random models (DiT and PixArt): the PNG grid equals the pipeline's
images, the README's documented flags work, and every mistake is one error line with nothing written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipelines import LABELS, save_pipeline, tiny_components
from test_pipelines_pixart import tiny_transformer, tiny_vae
from test_pipelines_workdir import workdir  # noqa: F401 (fixture)
from test_t5 import tiny_t5, tiny_tokenizer

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.convert import from_torch
from dit_jax.convert.vae import vae_from_torch
from dit_jax.sample import _parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A DiTPipeline folder (DDIM), and the same weights as a model directory + VAE model directory."""
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("cli")
    transformer, vae = tiny_components()
    save_pipeline(root / "pipe", transformer, vae, DDIMScheduler())
    config, params = from_torch(root / "pipe" / "transformer")
    save_model(root / "model", config, params)
    save_model(root / "vae", *vae_from_torch(root / "pipe" / "vae"))
    return root


def test_cli_writes_the_pipeline_grid(tiny, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "dit_jax.sample", "--pipeline", str(tiny / "pipe"), "--classes", "1,999,500"]
    cmd += ["--steps", "5", "--guidance", "4.0", "--seed", "0", "--nrow", "2", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "sampling" in proc.stderr and "5/5" in proc.stderr  # the progress bar followed the sampler's steps
    got = np.asarray(Image.open(out))
    images = pipelines.load(tiny / "pipe")(LABELS, num_inference_steps=5, guidance_scale=4.0, seed=0)
    want = pipelines.make_grid(pipelines.to_uint8(images), nrow=2)
    assert got.shape == want.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    print(f"CLI grid vs in-process pipeline: max diff {diff} (uint8 levels)")
    assert diff <= 1
    assert not [p for p in tmp_path.iterdir() if p.name != "grid.png"]  # no temporary files left


def test_cli_paper_recipe_flags_on_a_model_directory(tiny, tmp_path, capsys):
    """The README's recipe flags (ddpm, ADM respacing, 3 guided channels, VAE model dir, batches, bf16, out-dir)."""
    out = tmp_path / "samples"
    argv = ["--model", str(tiny / "model"), "--vae", str(tiny / "vae"), "--classes", "207,360,387"]
    argv += ["--method", "ddpm", "--steps", "10", "--respacing", "adm", "--guidance", "1.5", "--guidance-channels", "3"]
    argv += ["--batch-size", "2", "--dtype", "bf16", "--seed", "1", "--no-progress", "--out-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000_207.png", "0001_360.png", "0002_387.png"]
    ims = [np.asarray(Image.open(out / f)) for f in files]
    assert all(im.shape == (16, 16, 3) for im in ims) and np.abs(ims[0].astype(int) - ims[1]).max() > 0

    # --batch-size does not change what a deterministic sampler draws
    grid_a, grid_b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(tiny / "model"), "--vae", str(tiny / "vae"), "--classes", "1,2,3", "--no-progress"]
    common += ["--method", "ddim", "--steps", "4", "--scheduler", str(tiny / "pipe" / "scheduler")]
    assert main(common + ["--out", str(grid_a)]) == 0
    assert main(common + ["--batch-size", "1", "--out", str(grid_b)]) == 0
    a, b = np.asarray(Image.open(grid_a)).astype(int), np.asarray(Image.open(grid_b)).astype(int)
    assert np.abs(a - b).max() <= 1


def test_cli_workdir(workdir, tmp_path, capsys):  # noqa: F811
    root, _ = workdir
    out = tmp_path / "digits.png"
    assert (
        main(["--workdir", str(root), "--classes", "0,1,2,3", "--nrow", "4", "--no-progress", "--out", str(out)]) == 0
    )
    im = Image.open(out)
    assert im.mode == "L" and im.size == (2 + 4 * 10, 2 + 10)
    # one line says what was sampled: the run's checkpoint and weights (a LoRA run: its adapters merged into the base)
    assert capsys.readouterr().out.splitlines() == [f"sampling from {root} (checkpoint 9, EMA)", f"wrote {out}"]
    # --vae-tiling reaches the pipeline: a pixel-space run has no VAE to tile (one error line, nothing written)
    tiled = tmp_path / "tiled.png"
    assert main(["--workdir", str(root), "--classes", "0", "--vae-tiling", "--no-progress", "--out", str(tiled)]) == 1
    assert "enable_vae_tiling: a pixel-space model has no VAE" in capsys.readouterr().err and not tiled.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--pipeline", "{missing}", "--classes", "1"], "does not exist"),
        (["--pipeline", "{pipe}", "--classes", "1,1000"], r"class id\(s\) \[1000\] out of range"),
        (["--pipeline", "{pipe}", "--classes", "1,cat"], "expected comma-separated integer class ids"),
        (["--pipeline", "{pipe}", "--classes", "1", "--method", "lms"], "unknown method 'lms'"),
        (["--pipeline", "{pipe}", "--classes", "1", "--steps", "0"], "num_steps must be a positive integer"),
        (["--pipeline", "{pipe}", "--classes", "1", "--method", "dpmpp_2m", "--respacing", "adm"], "--respacing adm"),
        (["--model", "{model}", "--classes", "1"], "pass vae="),
        (["--model", "{model}", "--vae", "sd-vae-ft-mse", "--classes", "1"], "is a VAE preset"),
    ],
)
def test_cli_errors(tiny, tmp_path, capsys, argv, message):
    paths = {"missing": tmp_path / "missing", "pipe": tiny / "pipe", "model": tiny / "model"}
    argv = [a.format(**paths) for a in argv] + ["--no-progress", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_usage_errors(tiny, tmp_path):
    with pytest.raises(SystemExit) as e:  # two sources
        main(["--pipeline", str(tiny / "pipe"), "--model", str(tiny / "model"), "--classes", "1", "--out", "x.png"])
    assert e.value.code == 2
    assert main(["--pipeline", str(tiny / "pipe"), "--classes", "1", "--out", str(tmp_path / "x.jpg")]) == 1


def readme_sampling_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Sampling") :]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    inline = re.findall(r"`(python -m dit_jax\.sample [^`]*)`", section)
    joined = [b.replace("\\\n", " ") for b in blocks]  # shell line continuations
    lines = [ln for b in joined for ln in b.splitlines() if ln.startswith("python -m")]
    return [shlex.split(" ".join(c.split()), comments=True) for c in lines + inline]


def test_readme_commands_parse():
    commands = readme_sampling_commands()
    samples = [c[3:] for c in commands if c[:3] == ["python", "-m", "dit_jax.sample"]]
    converts = [c[3:] for c in commands if c[:3] == ["python", "-m", "dit_jax.convert"]]
    assert len(samples) >= 7 and len(converts) >= 1
    for argv in samples:
        args = _parser().parse_args(argv)  # every documented flag exists (SystemExit otherwise)
        assert args.classes or args.prompt or args.prompts_file
    assert any(args.count("--prompt") >= 2 for args in samples)  # the PixArt commands are documented
    from dit_jax.convert.__main__ import _parser as convert_parser

    for argv in converts:
        convert_parser().parse_args(argv)
    flags = {a for argv in samples for a in argv if a.startswith("--")}
    # the flags of the paper recipe are exercised end to end above on tiny models
    assert {"--method", "--steps", "--respacing", "--guidance-channels", "--vae", "--out-dir", "--batch-size"} <= flags


# ---- PixArt -----------------------------------------------------------------------------------------------------

PROMPTS = ["a cat on the sofa", "a photo of a dog", "the red horse"]


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A PixArtSigmaPipeline folder of tiny random components (DPM-Solver++), and its transformer as a model dir."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli_pixart")
    pipe = PixArtSigmaPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=tiny_transformer(1), scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    pipe.save_pretrained(root / "pipe")
    save_model(root / "model", *from_torch(root / "pipe" / "transformer"))
    torch.set_num_threads(threads)
    return root


def test_cli_pixart_prompts_grid(pixart, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "dit_jax.sample", "--pipeline", str(pixart / "pipe"), "--prompt", PROMPTS[0]]
    cmd += ["--prompt", PROMPTS[1], "--steps", "4", "--guidance", "4.5", "--height", "48", "--width", "80"]
    cmd += ["--nrow", "2", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "4/4" in proc.stderr
    got = np.asarray(Image.open(out))
    images = pipelines.load(pixart / "pipe")(PROMPTS[:2], num_inference_steps=4, height=48, width=80, seed=0)
    want = pipelines.make_grid(pipelines.to_uint8(images), nrow=2)
    assert got.shape == want.shape == (2 + 48 + 2, 2 + 2 * (80 + 2), 3)
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    print(f"PixArt CLI grid vs in-process pipeline: max diff {diff} (uint8 levels)")
    assert diff <= 1
    assert not [p for p in tmp_path.iterdir() if p.name != "grid.png"]


def test_cli_pixart_prompts_file_model_dir(pixart, tmp_path, capsys):
    """A model directory with --vae and --text-encoder, prompts from a file, batches, one PNG per prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[0], "", PROMPTS[1] + "  ", PROMPTS[2]]) + "\n")
    out = tmp_path / "samples"
    argv = ["--model", str(pixart / "model"), "--vae", str(pixart / "pipe" / "vae"), "--text-encoder"]
    argv += [str(pixart / "pipe"), "--prompts-file", str(prompts), "--steps", "3", "--batch-size", "2"]
    argv += ["--negative-prompt", "a blue sofa", "--no-progress", "--out-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000_a-cat-on-the-sofa.png", "0001_a-photo-of-a-dog.png", "0002_the-red-horse.png"]
    ims = np.stack([np.asarray(Image.open(out / f)) for f in files])
    assert ims.shape == (3, 64, 64, 3)
    pipe = pipelines.load(pixart / "pipe")
    want = pipelines.to_uint8(pipe(PROMPTS, num_inference_steps=3, negative_prompt="a blue sofa", seed=0))
    assert np.abs(ims.astype(int) - want).max() <= 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--pipeline", "{pixart}", "--classes", "1"], "text-to-image .* give --prompt/--prompts-file, not --classes"),
        (["--pipeline", "{pipe}", "--prompt", "a cat"], "class-conditional DiT: --prompt does not apply"),
        (["--pipeline", "{pixart}", "--prompt", "a", "--height", "40"], "height=40, width=64 must be multiples of 16"),
        (["--pipeline", "{pixart}", "--prompts-file", "{missing}"], "--prompts-file .* does not exist"),
        (["--model", "{pixart_model}", "--vae", "{pixart}/vae", "--prompt", "a"], "pass text_encoder="),
        (["--pipeline", "{pixart}"], r"give --classes \(DiT\) or --prompt/--prompts-file \(PixArt\)"),
    ],
)
def test_cli_pixart_errors(tiny, pixart, tmp_path, capsys, argv, message):
    paths = dict(pixart=pixart / "pipe", pixart_model=pixart / "model", pipe=tiny / "pipe", missing=tmp_path / "no")
    argv = [a.format(**paths) for a in argv] + ["--no-progress", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
