"""``python -m dit_jax.convert``: import to a model directory, export back, and failures that leave nothing behind."""

import os
import subprocess
import sys

import pytest
import torch
import torch_reference as ref
from parity import assert_bit_exact, randomize_, state_dict_numpy, state_dict_torch

from dit_jax import convert
from dit_jax.checkpoint import load_model
from dit_jax.convert.__main__ import main, parse_set


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny original-format DiT training checkpoint (width 32: heads must be given)."""
    m = randomize_(ref.OrigDiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=3), 0)
    sd = state_dict_numpy(m)
    path = tmp_path_factory.mktemp("ckpt") / "0001000.pt"
    torch.save({"ema": state_dict_torch(sd)}, path)
    return path, sd


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "dit_jax.convert", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.filterwarnings("ignore:exporting a DiT")
def test_import_export_end_to_end(tmp_path, checkpoint):
    src, sd = checkpoint
    out = _cli(src, tmp_path / "model", "--set", "num_heads=4", "--set", "scan_blocks=true")
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout[-400:])
    assert '"num_heads": 4' in out.stdout and "parameters:" in out.stdout
    config, params = load_model(tmp_path / "model")
    assert config.scan_blocks and config.num_heads == 4 and config.timestep_freq_shift == 0.0

    out = _cli("--to-torch", tmp_path / "model", tmp_path / "dit.safetensors", "--format", "original")
    assert out.returncode == 0, out.stderr[-2000:]
    back, _, _ = convert.read_checkpoint(tmp_path / "dit.safetensors")
    assert_bit_exact(back, sd)

    assert main(["--to-torch", str(tmp_path / "model"), str(tmp_path / "dit-diffusers"), "--format", "diffusers"]) == 0
    assert (tmp_path / "dit-diffusers" / "config.json").exists()
    assert (tmp_path / "dit-diffusers" / "diffusion_pytorch_model.safetensors").exists()


def test_failed_conversion_leaves_nothing(tmp_path, checkpoint, capsys):
    src, _ = checkpoint
    out = _cli(src, tmp_path / "model")  # no num_heads for width 32
    assert out.returncode == 1
    assert "error:" in out.stderr and "num_heads" in out.stderr
    print(out.stderr.strip())
    assert list(tmp_path.iterdir()) == []

    # in-process for the remaining argument errors
    assert main([str(src), str(tmp_path / "m"), "--set", "num_heads"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "m"), "--set", "num_heads=4", "--set", "depht=2"]) == 1
    assert "unknown DiTConfig override(s) ['depht']" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "m"), "--set", "num_heads=5"]) == 1  # 32 is not a multiple of 5
    assert "num_heads=5" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "m"), "--weights", "model", "--set", "num_heads=4"]) == 1
    assert "no 'model' entry" in capsys.readouterr().err
    assert main(["--to-torch", str(tmp_path / "nowhere"), str(tmp_path / "x.pt"), "--format", "original"]) == 1
    assert main(["--to-torch", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_parse_set():
    assert parse_set(["num_heads=16", "preset=DiT-XL/2", "kv_compress_layers=[1, 2]", "qk_norm=true", "x=a=b"]) == {
        "num_heads": 16,
        "preset": "DiT-XL/2",
        "kv_compress_layers": (1, 2),
        "qk_norm": True,
        "x": "a=b",
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_set(["=3"])
