"""Checkpoint reading and conversion errors: file types, wrappers, dtypes, shards, detection, and every error path."""

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch
import torch_reference as ref
from parity import randomize_, state_dict_numpy, state_dict_torch
from safetensors.numpy import save_file

from dit_jax import convert
from dit_jax.convert import io


@pytest.fixture(scope="module")
def dit_sd() -> dict[str, np.ndarray]:
    """A tiny original-format DiT (width 384 so heads are inferred: 6)."""
    m = ref.OrigDiT(input_size=8, patch_size=2, hidden_size=384, depth=1, num_heads=6, num_classes=4)
    return state_dict_numpy(randomize_(m, seed=0))


def test_safetensors_bf16_fp16_become_float32(tmp_path, dit_sd):
    import safetensors.torch

    half = {
        k: torch.from_numpy(v).to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(dit_sd.items())
    }
    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file(half, str(path))
    sd = io.read_safetensors(path)
    assert all(v.dtype == np.float32 for v in sd.values())
    for k, v in half.items():
        np.testing.assert_array_equal(sd[k], v.float().numpy())
    config, params = convert.from_torch(path)
    assert config.num_heads == 6 and params["y_embedder"]["embedding"].dtype == np.float32
    assert io.to_float32(np.ones(2, ml_dtypes.bfloat16)).dtype == np.float32


def test_wrappers(tmp_path, dit_sd):
    other = {k: v + 1 for k, v in dit_sd.items()}
    cases = {
        "bare.pt": (state_dict_torch(dit_sd), "ema", dit_sd),
        "pixart.pth": ({"state_dict": state_dict_torch(dit_sd)}, "model", dit_sd),
        "pixart_train.pth": (
            {"state_dict": state_dict_torch(other), "state_dict_ema": state_dict_torch(dit_sd), "epoch": 3},
            "ema",
            dit_sd,
        ),
        "pixart_train_raw.pth": (
            {"state_dict": state_dict_torch(other), "state_dict_ema": state_dict_torch(dit_sd)},
            "model",
            other,
        ),
    }
    for name, (obj, weights, want) in cases.items():
        torch.save(obj, tmp_path / name)
        got = io.read_torch(tmp_path / name, weights)
        assert all(np.array_equal(got[k], want[k]) for k in want), name
    torch.save({"epoch": 3, "optimizer": {"lr": 1.0}}, tmp_path / "nothing.pt")
    with pytest.raises(convert.ConversionError, match=r"nothing\.pt: no state dict found.*'epoch', 'optimizer'"):
        convert.from_torch(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="weights='best' is invalid"):
        convert.from_torch(tmp_path / "bare.pt", weights="best")


def test_truncated_and_corrupt_files(tmp_path, dit_sd):
    save_file(dit_sd, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    torch.save(state_dict_torch(dit_sd), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    for name in ("cut.safetensors", "junk.safetensors", "cut.pt", "junk.pt"):
        with pytest.raises(convert.ConversionError, match=rf"{name}: not a readable .*\(truncated or corrupt\?") as e:
            convert.from_torch(tmp_path / name)
        print(str(e.value)[:160])
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(convert.ConversionError, match="model.onnx: unknown checkpoint file type"):
        convert.from_torch(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="does-not-exist.pt does not exist"):
        convert.from_torch(tmp_path / "does-not-exist.pt")


def test_missing_unexpected_misshaped_keys_in_one_error(dit_sd):
    sd = dict(dit_sd)
    del sd["blocks.0.mlp.fc2.bias"]
    sd["blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["blocks.0.attn.proj.weight"] = np.zeros((384, 380), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_state_dict(sd, num_heads=6)
    msg = str(e.value)
    print(msg)
    assert "missing keys:\n  blocks.0.mlp.fc2.bias" in msg
    assert "unexpected keys:\n  blocks.0.attn.extra.weight (3, 3)" in msg
    assert "blocks.0.attn.proj.weight: expected (384, 384), found (384, 380)" in msg


def test_detection_and_override_errors(tmp_path, dit_sd):
    with pytest.raises(convert.ConversionError, match="cannot tell the model family and format"):
        convert.from_state_dict({"encoder.conv_in.weight": np.zeros((2, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"unknown DiTConfig override\(s\) \['heads'\]"):
        convert.from_state_dict(dit_sd, heads=6)
    with pytest.raises(ValueError, match="format='pytorch' is invalid"):
        convert.from_state_dict(dit_sd, format="pytorch")
    with pytest.raises(ValueError, match="hidden_size=384 is invalid: expected a multiple of num_heads=5"):
        convert.from_state_dict(dit_sd, num_heads=5)
    # folders: no config.json; a config.json of an unsupported diffusers class
    (tmp_path / "empty").mkdir()
    with pytest.raises(convert.ConversionError, match="a folder must be a diffusers model folder"):
        convert.from_torch(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    save_file(dit_sd, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(convert.ConversionError, match="describes a 'UNet2DConditionModel'"):
        convert.from_torch(tmp_path / "unet")


def test_shard_index_errors(tmp_path, dit_sd):
    keys = sorted(dit_sd)
    save_file({k: dit_sd[k] for k in keys[:5]}, str(tmp_path / "m-00001.safetensors"))
    save_file({k: dit_sd[k] for k in keys[5:]}, str(tmp_path / "m-00002.safetensors"))
    index = {"weight_map": {k: "m-00001.safetensors" if i < 5 else "m-00002.safetensors" for i, k in enumerate(keys)}}
    import json

    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    config, _ = convert.from_torch(tmp_path / "m.safetensors.index.json")
    assert config.hidden_size == 384
    (tmp_path / "m-00002.safetensors").unlink()
    with pytest.raises(convert.ConversionError, match="shard m-00002.safetensors listed in the index does not exist"):
        convert.from_torch(tmp_path / "m.safetensors.index.json")


def test_import_and_safetensors_conversion_without_torch(tmp_path, dit_sd):
    """``import dit_jax.convert`` and .safetensors conversion must not need torch (or diffusers)."""
    save_file(dit_sd, str(tmp_path / "dit.safetensors"))
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        sys.modules["diffusers"] = None
        import dit_jax, dit_jax.convert, dit_jax.checkpoint
        config, params = dit_jax.convert.from_torch({str(tmp_path / "dit.safetensors")!r})
        sd = dit_jax.convert.to_torch(config, params, format="original")
        print("ok", config.hidden_size, len(sd))
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ok 384 {len(dit_sd)}" in out.stdout


def test_detect_family_and_format():
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, num_layers=1, sample_size=8, num_embeds_ada_norm=4
    )
    dit_sd = state_dict_numpy(dit)
    pixart_cfg = dict(num_attention_heads=2, attention_head_dim=6, num_layers=1, sample_size=128, caption_channels=8)
    pixart_cfg["cross_attention_dim"] = 12
    pixart = PixArtTransformer2DModel(**pixart_cfg)
    pixart_sd = state_dict_numpy(pixart)
    orig_dit = state_dict_numpy(ref.OrigDiT(input_size=8, hidden_size=8, depth=1, num_heads=2))
    orig_pixart = state_dict_numpy(
        ref.OrigPixArtMS(input_size=8, hidden_size=12, depth=1, num_heads=2, caption_channels=8, model_max_length=4)
    )
    assert convert.detect(dit_sd) == ("dit", "diffusers")
    assert convert.detect(pixart_sd) == ("pixart", "diffusers")
    assert convert.detect(orig_dit) == ("dit", "original")
    assert convert.detect(orig_pixart) == ("pixart", "original")
    # an α-1024-style diffusers config: interpolation_scale / use_additional_conditions None → 2 and True
    hub_style = {"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single", **pixart_cfg}
    assert convert.detect(pixart_sd, hub_style) == ("pixart", "diffusers")
    config, _ = convert.from_state_dict(pixart_sd, diffusers_config=hub_style)
    assert config.micro_conditions and config.pe_interpolation == 2.0 and config.input_size == 128
    with pytest.raises(convert.ConversionError, match="describes a diffusers dit but the weights look like"):
        convert.from_state_dict(pixart_sd, diffusers_config={"_class_name": "DiTTransformer2DModel"})
