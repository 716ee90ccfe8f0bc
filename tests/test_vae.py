"""AutoencoderKL: parity with diffusers (random weights), diffusers/LDM import and export, sharding, bf16, errors."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import (
    assert_bit_exact,
    assert_trees_equal,
    nchw,
    nhwc,
    randomize_encoder_,
    rel_err,
    state_dict_numpy,
    state_dict_torch,
)

from dit_jax.convert.rules import ConversionError
from dit_jax.convert.vae import config_to_diffusers, vae_from_torch, vae_rules, vae_to_torch
from dit_jax.encoders.vae import (
    PRESETS,
    AutoencoderKL,
    VAEConfig,
    sample_posterior,
    scale_latents,
    unscale_latents,
    vae_preset,
)
from dit_jax.parallel.rules import DEFAULT_RULES

# diffusers AutoencoderKL arguments (all DownEncoderBlock2D / UpDecoderBlock2D)
CONFIGS = {
    # MODELS.md §7: tests/models/autoencoders/test_models_autoencoder_kl.py
    "tiny": dict(block_out_channels=(2, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2),
    # the SD3 pipeline-test VAE with 16 latent channels: no quant convs, one block
    "sd3_16ch": dict(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5035,
        shift_factor=0.0609,
    ),
    # the real SD/SDXL/SD3/Flux block layout (4 blocks, 2 layers, 32 groups) at reduced widths
    "realistic": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32),
    "no_mid_attention": dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        mid_block_add_attention=False,
    ),
}


def diffusers_vae(name: str, seed: int = 0, **extra):
    """A diffusers AutoencoderKL of ``CONFIGS[name]`` with every parameter drawn afresh (norm scales 1 ± 0.1, biases
    ±0.1, weights N(0, 1/fan_in))."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    cfg = {**CONFIGS[name], **extra}
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    model = TorchVAE(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        sample_size=32,
        **cfg,
    )
    return randomize_encoder_(model, seed).eval()


@functools.cache
def reference(name: str):
    """(torch model, its numpy state dict, JAX config, JAX params) for ``CONFIGS[name]``, imported via config.json."""
    model = diffusers_vae(name)
    sd = state_dict_numpy(model)
    config, params = vae_from_torch(sd, config=_config_of(model))
    return model, sd, config, params


def _config_of(model) -> VAEConfig:
    from dit_jax.convert.vae import config_from_diffusers

    return config_from_diffusers(dict(model.config))


@functools.cache
def jitted(config: VAEConfig):
    """Jitted (encode, decode) of ``config``, shared by tests so each compiles once."""
    vae = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    return encode, decode


# ---- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name):
    import torch

    model, _, config, params = reference(name)
    encode, decode = jitted(config)
    f = config.downsample_factor
    rs = np.random.RandomState(1)
    x = rs.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rs.randn(2, config.latent_channels, 32 // f, 32 // f).astype(np.float32)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x)).latent_dist
        want_mean, want_logvar = post.mean.numpy(), post.logvar.numpy()
        want_image = model.decode(torch.from_numpy(z)).sample.numpy()
    mean, logvar = encode(params, nhwc(x))
    image = decode(params, nhwc(z))
    errs = [rel_err(nchw(mean), want_mean), rel_err(nchw(logvar), want_logvar), rel_err(nchw(image), want_image)]
    print(f"{name}: rel err encode mean {errs[0]:.1e}, logvar {errs[1]:.1e}, decode {errs[2]:.1e}")
    assert mean.dtype == logvar.dtype == image.dtype == jnp.float32
    assert image.shape == (2, 32, 32, 3) and mean.shape == (2, 32 // f, 32 // f, config.latent_channels)
    assert max(errs) <= 1e-5


def test_logvar_is_clamped_like_diffusers():
    import torch

    model = diffusers_vae("tiny")
    with torch.no_grad():
        model.quant_conv.bias[4:] += 60.0  # logvar far above the clamp (20)
    config, params = vae_from_torch(state_dict_numpy(model), config=_config_of(model))
    x = np.random.RandomState(0).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(x)).latent_dist.logvar.numpy()
    _, logvar = AutoencoderKL(config).apply({"params": params}, nhwc(x), method="encode")
    assert np.all(want == 20.0) and np.array_equal(nchw(logvar), want)


def test_bf16_compute_is_close_to_fp32():
    _, _, config, params = reference("realistic")
    rs = np.random.RandomState(1)
    x = rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rs.randn(2, 4, 4, 4).astype(np.float32)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        encode, decode = jitted(config.replace(dtype=dtype))
        outs[dtype] = (encode(params, x)[0], decode(params, z))
    for i, what in enumerate(("encode", "decode")):
        got, want = outs["bfloat16"][i], outs["float32"][i]
        assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
        err = rel_err(got, want)
        print(f"bf16 vs fp32 {what}: rel err {err:.2e}")
        assert 0 < err < 5e-2


def test_sharded_batch_equals_unsharded():
    _, _, config, params = reference("tiny")
    vae = AutoencoderKL(config)
    x = np.random.RandomState(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    enc = lambda p, x: vae.apply({"params": p}, x, method="encode")[0]
    dec = lambda p, z: vae.apply({"params": p}, z, method="decode")
    want_z = jax.jit(enc)(params, x)
    want_image = jax.jit(dec)(params, want_z)

    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = nn.get_partition_spec(jax.eval_shape(lambda k: vae.init(k, *config.dummy_inputs(1)), jax.random.key(0)))
    param_sharding = nn.logical_to_mesh_sharding(specs["params"], mesh, DEFAULT_RULES)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        p = jax.device_put(params, param_sharding)
        z = jax.jit(enc, in_shardings=(param_sharding, batch))(p, jax.device_put(x, batch))
        image = jax.jit(dec, in_shardings=(param_sharding, batch))(p, z)
    assert len(image.sharding.device_set) == 8 and image.sharding.spec[0] is not None
    errs = float(jnp.abs(z - want_z).max()), float(jnp.abs(image - want_image).max())
    print(f"sharded vs unsharded: max abs err encode {errs[0]:.1e}, decode {errs[1]:.1e}")
    assert max(errs) < 1e-5


# ---- config, presets, registry ------------------------------------------------------------------------------


def test_presets_and_latent_scaling():
    assert PRESETS["sd"].scaling_factor == PRESETS["sd-vae-ft-mse"].scaling_factor == 0.18215
    assert PRESETS["sd-vae-ft-ema"].scaling_factor == 0.18215 and PRESETS["sdxl"].scaling_factor == 0.13025
    sd3, flux = vae_preset("sd3"), vae_preset("flux")
    assert (sd3.latent_channels, sd3.use_quant_conv, sd3.scaling_factor, sd3.shift_factor) == (
        16,
        False,
        1.5305,
        0.0609,
    )
    assert (flux.latent_channels, flux.use_post_quant_conv, flux.scaling_factor, flux.shift_factor) == (
        16,
        False,
        0.3611,
        0.1159,
    )
    z = jnp.asarray(np.random.RandomState(0).randn(2, 4, 4, 16).astype(np.float32))
    np.testing.assert_allclose(scale_latents(flux, z), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(flux, scale_latents(flux, z)), z, atol=1e-6)
    stats = vae_preset("sd3", latents_mean=tuple(range(16)), latents_std=tuple(1.0 + np.arange(16) / 8))
    np.testing.assert_allclose(unscale_latents(stats, scale_latents(stats, z)), z, atol=1e-5)
    s = sample_posterior(z, jnp.full_like(z, -2.0), jax.random.key(0))
    assert s.shape == z.shape and 0.2 < float(jnp.std(s - z)) < 0.5  # exp(-1) ≈ 0.37
    with pytest.raises(ValueError, match="unknown VAE preset 'sd4'"):
        vae_preset("sd4")


def test_registry_build_and_config_round_trip():
    from dit_jax.models import abstract_params, build, config_from_dict

    config = VAEConfig(**CONFIGS["tiny"])
    assert isinstance(build(config), AutoencoderKL)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    boxed = jax.tree.leaves(abstract_params(config), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxed)
    assert all(b.value.dtype == jnp.float32 for b in boxed)
    params = nn.meta.unbox(abstract_params(config))
    assert {r.flax for r in vae_rules(config)} == set(_flat(params)) == {r.flax for r in vae_rules(config, "ldm")}


def test_checkpoint_save_load(tmp_path):
    from dit_jax.checkpoint import load_model, save_model

    _, _, config, params = reference("tiny")
    save_model(tmp_path / "vae", config, params)
    config2, params2 = load_model(tmp_path / "vae")
    assert config2 == config
    assert_trees_equal(params2, params)


def test_import_order_independent():
    code = "import dit_jax.encoders.vae as v, dit_jax.models as m; assert m.FAMILIES['vae'][0] is v.VAEConfig"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ---- conversion ----------------------------------------------------------------------------------------------


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, path) if isinstance(v, dict) else {path: v})
    return out


@pytest.mark.parametrize("name", ["tiny", "realistic", "sd3_16ch"])
def test_round_trips_are_bit_exact(name):
    _, sd, config, params = reference(name)
    back = vae_to_torch(config, params, "diffusers")
    assert_bit_exact(back, sd)
    ldm = vae_to_torch(config, params, "ldm")
    config2, params2 = vae_from_torch(ldm, config=config)
    assert_trees_equal(params2, params)
    again = vae_to_torch(config2, params2, "ldm")
    assert_bit_exact(again, ldm)


def test_ldm_table_agrees_with_diffusers_single_file_converter():
    """diffusers' own LDM → diffusers conversion of our LDM export gives back the original diffusers weights."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model, sd, config, params = reference("realistic")
    ldm = vae_to_torch(config, params, "ldm")
    assert "decoder.up.0.block.2.conv2.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert np.array_equal(ldm["decoder.up.3.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    converted = convert_ldm_vae_checkpoint(
        {f"first_stage_model.{k}": torch.from_numpy(v) for k, v in ldm.items()}, dict(model.config)
    )
    converted = {k: v.numpy() for k, v in converted.items()}
    assert_bit_exact(converted, sd)


def test_ldm_single_file_import_equals_diffusers_import(tmp_path):
    """A full SD3-style checkpoint (first_stage_model.* among other keys) as .safetensors and an LDM .ckpt."""
    import torch
    from safetensors.numpy import save_file

    _, _, config, params = reference("realistic")
    ldm = vae_to_torch(config, params, "ldm")
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = np.zeros((3, 2), np.float32)
    full["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = np.ones(2, np.float32)
    save_file(full, str(tmp_path / "sd3_full.safetensors"))
    config2, params2 = vae_from_torch(tmp_path / "sd3_full.safetensors")
    assert_trees_equal(params2, params)
    assert config2.block_out_channels == config.block_out_channels and config2.layers_per_block == 2
    assert (config2.scaling_factor, config2.shift_factor) == (1.5305, 0.0609)  # revealed by the MM-DiT keys

    ckpt = {"state_dict": state_dict_torch(ldm), "global_step": 7}
    ckpt["state_dict"]["loss.logvar"] = torch.zeros(())  # LDM training checkpoints keep the loss nets
    torch.save(ckpt, tmp_path / "kl-f8.ckpt")
    with pytest.warns(UserWarning, match="bare 4-channel VAE"):
        config3, params3 = vae_from_torch(tmp_path / "kl-f8.ckpt")
    assert_trees_equal(params3, params)
    assert config3.scaling_factor == 0.18215
    config4, _ = vae_from_torch(tmp_path / "kl-f8.ckpt", preset="sdxl")
    assert config4.scaling_factor == 0.13025 and config4.sample_size == 1024


def test_diffusers_folder_and_pipeline_folder(tmp_path):
    model, _, config, params = reference("sd3_16ch")
    model.save_pretrained(tmp_path / "vae_only")
    model.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    for folder in (tmp_path / "vae_only", tmp_path / "pipe"):
        config2, params2 = vae_from_torch(folder)
        assert config2 == config
        assert_trees_equal(params2, params)
    assert config.scaling_factor == 1.5035 and config.shift_factor == 0.0609 and not config.use_quant_conv
    assert config_to_diffusers(config)["shift_factor"] == 0.0609


def test_generic_from_torch_and_to_torch_handle_the_vae(tmp_path):
    """``dit_jax.convert.from_torch`` / ``to_torch`` / ``save_torch`` and the convert CLI take a VAE like any family."""
    from dit_jax import convert
    from dit_jax.checkpoint import load_model
    from dit_jax.convert.__main__ import main as convert_main

    model, sd, config, params = reference("sd3_16ch")
    model.save_pretrained(tmp_path / "vae_only")
    config2, params2 = convert.from_torch(tmp_path / "vae_only")
    assert config2 == config
    assert_trees_equal(params2, params)
    assert_bit_exact(convert.to_torch(config2, params2, format="diffusers"), sd)
    ldm = convert.to_torch(config2, params2, format="original")
    assert_bit_exact(ldm, vae_to_torch(config, params, "ldm"))
    prefixed = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    config3, params3 = convert.from_state_dict(prefixed, preset="sd3", norm_num_groups=config.norm_num_groups)
    assert_trees_equal(params3, params)
    sd3 = PRESETS["sd3"]
    assert (config3.scaling_factor, config3.shift_factor) == (sd3.scaling_factor, sd3.shift_factor)
    out = convert.save_torch(tmp_path / "vae_export", config2, params2, format="diffusers")
    assert_bit_exact(convert.to_torch(*convert.from_torch(out), format="diffusers"), sd)
    assert convert_main([str(tmp_path / "vae_only"), str(tmp_path / "vae_dir")]) == 0
    config4, params4 = load_model(tmp_path / "vae_dir")
    assert config4 == config
    assert_trees_equal(params4, params)


def test_config_inferred_from_ldm_keys_matches_config_json():
    _, sd, config, params = reference("realistic")
    ldm = vae_to_torch(config, params, "ldm")
    inferred, _ = vae_from_torch(ldm, preset="sd", sample_size=config.sample_size)
    assert inferred == config
    inferred, _ = vae_from_torch(sd, preset="sd", sample_size=config.sample_size)  # diffusers keys, no config.json
    assert inferred == config


def test_conversion_errors_name_the_key(tmp_path):
    _, sd, config, params = reference("tiny")
    bad = dict(sd)
    bad["encoder.conv_in.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"mis-shaped keys:\n  encoder.conv_in.weight: expected \(2, 3, 3, 3\)"):
        vae_from_torch(bad, config=config)
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}
    with pytest.raises(ConversionError, match=r"missing keys:\n  decoder.up_blocks.1.resnets.0.conv2.bias"):
        vae_from_torch(missing, config=config)
    extra = {**sd, "encoder.extra.weight": np.zeros(2, np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected keys:\n  encoder.extra.weight \(2,\)"):
        vae_from_torch(extra, config=config)
    with pytest.raises(ConversionError, match="not an AutoencoderKL state dict"):
        vae_from_torch({"model.diffusion_model.x_embedder.proj.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"block_out_channels=\(2, 4\) is invalid: expected positive multiples of "):
        vae_from_torch(sd, preset="sd")  # 2-channel blocks need norm_num_groups=2; the default 32 cannot hold
    with pytest.raises(ValueError, match="unknown VAE key format 'onnx'"):
        vae_to_torch(config, params, "onnx")
    with pytest.raises(FileNotFoundError):
        vae_from_torch(tmp_path / "nope.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        vae_from_torch(tmp_path / "folder")


def test_config_and_input_errors():
    with pytest.raises(ValueError, match=r"block_out_channels=\(30,\) is invalid"):
        VAEConfig(block_out_channels=(30,))
    with pytest.raises(ValueError, match="act_fn='relu' is invalid"):
        VAEConfig(act_fn="relu")
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig(latents_mean=(0.0, 1.0))
    _, _, config, params = reference("tiny")
    vae = AutoencoderKL(config)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, H, W, 3\) \(NHWC\), got \(1, 3, 16, 16\)"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), method="encode")
    with pytest.raises(ValueError, match="image size 15x16 is not a multiple of the VAE's factor 2"):
        vae.apply({"params": params}, jnp.zeros((1, 15, 16, 3)), method="encode")


def test_mid_attention_query_chunks_and_remat_are_exact(monkeypatch):
    """Large latents attend in row chunks (exact); remat changes memory, not values; ``method=vae.decode`` works."""
    from dit_jax.encoders import vae as vae_lib

    _, _, config, params = reference("tiny")
    z = jnp.asarray(np.random.RandomState(0).randn(2, 8, 6, 4).astype(np.float32))
    want = AutoencoderKL(config).apply({"params": params}, z, method=AutoencoderKL(config).decode)
    assert vae_lib._rows_per_chunk(2, 8, 6) == 8  # the whole latent in one chunk
    monkeypatch.setattr(vae_lib, "_LOGITS_BUDGET", 4 * 2 * 6 * 48 * 2)  # two rows of queries per chunk
    assert vae_lib._rows_per_chunk(2, 8, 6) == 2
    chunked = AutoencoderKL(config).apply({"params": params}, z, method="decode")
    remat = AutoencoderKL(config.replace(remat="full")).apply({"params": params}, z, method="decode")
    errs = float(jnp.abs(chunked - want).max()), float(jnp.abs(remat - want).max())
    print(f"row-chunked attention vs one chunk: {errs[0]:.1e}; remat: {errs[1]:.1e}")
    assert max(errs) < 1e-5
