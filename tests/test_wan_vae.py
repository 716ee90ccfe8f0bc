"""Wan causal 3-D VAE: parity with diffusers ``AutoencoderKLWan`` (random weights; chunked encode/decode, spatial
tiling), diffusers/original import and export, jit, errors.

Compilation dominates this file's time on CPU: eager ``encode``/``decode`` reuse one compiled program per chunk
shape whatever the video length, so the 1-, 5- and 9-frame cases share their programs.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_bit_exact, assert_trees_equal, randomize_encoder_, rel_err, state_dict_numpy, state_dict_torch

from dit_jax.convert.rules import ConversionError
from dit_jax.convert.wan_vae import (
    config_from_diffusers,
    config_to_diffusers,
    infer_config,
    wan_vae_from_torch,
    wan_vae_rules,
    wan_vae_to_torch,
)
from dit_jax.encoders.wan_vae import (
    PRESETS,
    AutoencoderKLWan,
    WanVAEConfig,
    decode,
    decode_tiled,
    encode,
    scale_latents,
    unscale_latents,
)

_STATS = dict(
    latents_mean=[0.3, -0.2, 0.5, -0.7],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)
# diffusers AutoencoderKLWan arguments
CONFIGS = {
    # FAMILIES.md "Wan 2.1 video": the tiny VAE (the Wan 2.1 layout: 4 levels, temporal factor 4, spatial 8)
    "tiny": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0] * 4,
        latents_std=[1] * 4,
    ),
    # encoder attention after each full-resolution resnet (shifting diffusers' flat block indices), growing widths
    # (shortcut convs), a wider decoder, no temporal resampling, non-trivial latent statistics
    "attention": dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=2,
        attn_scales=[1.0],
        temperal_downsample=[False],
        scale_factor_spatial=2,
        scale_factor_temporal=1,
        **_STATS,
    ),
}
# two levels (spatial and temporal factor 2): the smallest decoder, for what compiles a program per shape (jit, other
# chunk sizes, spatial tiles)
MINI = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1],
    num_res_blocks=1,
    temperal_downsample=[True],
    scale_factor_spatial=2,
    scale_factor_temporal=2,
    latents_mean=[0] * 4,
    latents_std=[1] * 4,
)
# the Wan 2.1 block layout (4 levels × 2 resnets) at reduced width: diffusers' original-key converter hard-codes it
WAN_LAYOUT = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, **_STATS)


def randomize_(model, seed: int = 0):
    """Every parameter drawn afresh: RMS-norm gammas 1 ± 0.1, biases ±0.1, weights N(0, 1/fan_in)."""
    import torch

    randomize_encoder_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_vae(cfg: dict, seed: int = 0):
    """A diffusers AutoencoderKLWan of ``cfg`` with every parameter drawn afresh.

    diffusers 0.42.1 calls the encoder's attention blocks (``attn_scales``) with the feature cache, which their
    ``forward(x)`` does not take (a diffusers bug: such a VAE cannot encode); here they ignore it.
    """
    from diffusers import AutoencoderKLWan as TorchWanVAE
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    model = randomize_(TorchWanVAE(**cfg), seed)
    for block in model.encoder.down_blocks:
        if isinstance(block, WanAttentionBlock):
            block.forward = functools.partial(lambda self, x, **_: WanAttentionBlock.forward(self, x), block)
    return model


@functools.cache
def reference(name: str):
    """(torch model, its numpy state dict, JAX config, JAX params) for ``CONFIGS[name]`` (or ``"mini"``), imported
    via config.json."""
    model = diffusers_vae(MINI if name == "mini" else CONFIGS[name])
    sd = state_dict_numpy(model)
    config, params = wan_vae_from_torch(sd, config=config_from_diffusers(dict(model.config)))
    return model, sd, config, jax.device_put(params)


def ncthw(x) -> np.ndarray:
    """B F H W C → B C F H W (torch's video layout)."""
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def bfhwc(x) -> np.ndarray:
    """B C F H W → B F H W C."""
    return np.asarray(x).transpose(0, 2, 3, 4, 1)


def _video(frames: int, size: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (1, 3, frames, size, size)).astype(np.float32)


# ---- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_parity_with_diffusers(name):
    """Posterior mean/logvar and chunked decode of 1-, 5- and 9-frame videos (1 + 4k) against diffusers."""
    import torch

    model, _, config, params = reference(name)
    vae = AutoencoderKLWan(config)
    s, t = config.spatial_factor, config.temporal_factor
    errs = []
    for frames in (1, 5, 9):
        x = _video(frames, 2 * s, frames)
        with torch.no_grad():
            post = model.encode(torch.from_numpy(x)).latent_dist
        mean, logvar = encode(vae, params, bfhwc(x))
        assert mean.shape == (1, 1 + (frames - 1) // t, 2, 2, 4) and mean.dtype == logvar.dtype == jnp.float32
        z = np.random.RandomState(10 + frames).randn(*post.mean.shape).astype(np.float32)
        with torch.no_grad():
            want = model.decode(torch.from_numpy(z)).sample.numpy()
        video = decode(vae, params, bfhwc(z))
        inside = float(np.mean(np.abs(want) < 1))
        assert video.shape == (1, frames, 2 * s, 2 * s, 3) and inside > 0.6  # clamping hides little
        errs.append(
            (
                rel_err(ncthw(mean), post.mean.numpy()),
                rel_err(ncthw(logvar), post.logvar.numpy()),
                rel_err(ncthw(video), want),
            )
        )
        print(f"{name} {frames} frames: rel err mean, logvar, decode " + ", ".join(f"{e:.1e}" for e in errs[-1]))
    assert np.max(errs) <= 1e-5


def test_jit_and_other_chunk_sizes_match_diffusers():
    """Jitted (later chunks in a ``lax.scan``), with other chunk sizes and a shorter last chunk (encode: 8 frames per
    step, 1 + 8; decode: 2 latent frames per step, 1 + 2 + 2 + 1), the result is diffusers'."""
    import torch

    model, _, config, params = reference("mini")
    vae = AutoencoderKLWan(config)
    x, z = _video(9, 4, 0), np.random.RandomState(1).randn(1, 4, 6, 2, 2).astype(np.float32)
    with torch.no_grad():
        want_mean = model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
        want_video = model.decode(torch.from_numpy(z)).sample.numpy()
    mean = jax.jit(lambda p, x: encode(vae, p, x, chunk_frames=8)[0])(params, bfhwc(x))
    video = jax.jit(lambda p, z: decode(vae, p, z, chunk=2))(params, bfhwc(z))
    errs = rel_err(ncthw(mean), want_mean), rel_err(ncthw(video), want_video)
    print(f"jit, other chunks: rel err encode {errs[0]:.1e}, decode {errs[1]:.1e}")
    assert mean.shape == (1, 5, 2, 2, 4) and video.shape == (1, 11, 4, 4, 3)
    assert max(errs) <= 1e-5


def test_bf16_compute_is_close():
    """bf16 compute (fp32 parameters, norm statistics and outputs) against diffusers' fp32 decode."""
    import torch

    model, _, config, params = reference("mini")
    z = np.random.RandomState(5).randn(1, 4, 1, 2, 2).astype(np.float32)
    with torch.no_grad():
        want = model.decode(torch.from_numpy(z)).sample.numpy()
    video = decode(AutoencoderKLWan(config.replace(dtype="bfloat16")), params, bfhwc(z))
    err = rel_err(ncthw(video), want)
    print(f"bf16 decode vs diffusers fp32: rel err {err:.1e}")
    assert video.dtype == jnp.float32 and 0 < err < 5e-2


def test_tiled_decode_equals_diffusers_tiling_and_is_close_to_untiled():
    """Spatial tiles (12-px tiles every 8 px on a 16-px video: 2×2 tiles, the last cut to 8 px) blended as
    diffusers' ``enable_tiling``: equal to diffusers' tiled decode. Against the untiled decode (diffusers', which
    the other tests show equal to ours) the difference is at the seams (each tile's zero padding, and its mid-block
    attention over the tile instead of the frame); measured with random weights here (clamped outputs): max
    |tiled − untiled| 2.5 × the output's std, mean 0.37× (see ``decode_tiled`` for larger videos)."""
    import torch

    model, _, config, params = reference("mini")
    vae = AutoencoderKLWan(config)
    z = np.random.RandomState(3).randn(1, 4, 2, 8, 8).astype(np.float32)
    with torch.no_grad():
        untiled = model.decode(torch.from_numpy(z)).sample.numpy()
        tiles = dict(tile_sample_min_height=12, tile_sample_min_width=12)
        model.enable_tiling(**tiles, tile_sample_stride_height=8, tile_sample_stride_width=8)
        try:
            want = model.decode(torch.from_numpy(z)).sample.numpy()
        finally:
            model.use_tiling = False
    tiled = jax.jit(lambda p, z: decode(vae, p, z, tile_size=12, tile_stride=8))(params, bfhwc(z))
    err = rel_err(ncthw(tiled), want)
    diff = np.abs(ncthw(tiled) - untiled) / float(np.std(untiled))
    print(
        f"tiled vs diffusers tiled: rel err {err:.1e}; vs untiled: max {diff.max():.2f}, mean {diff.mean():.3f} × std"
    )
    assert tiled.shape == (1, 3, 16, 16, 3)
    assert err <= 1e-5
    assert 0 < diff.mean() < 0.5 and diff.max() < 4.0
    fits = jax.make_jaxpr(lambda p, z: decode_tiled(vae, p, z, tile_size=16))(params, bfhwc(z))
    assert str(fits) == str(jax.make_jaxpr(lambda p, z: decode(vae, p, z))(params, bfhwc(z)))  # one tile: untiled


def test_latent_scaling_matches_wan_pipeline():
    _, _, config, _ = reference("attention")
    z = np.random.RandomState(0).randn(1, 2, 3, 3, 4).astype(np.float32)
    mean = np.asarray(_STATS["latents_mean"], np.float32)
    inv_std = 1.0 / np.asarray(_STATS["latents_std"], np.float32)
    np.testing.assert_allclose(scale_latents(config, z), (z - mean) * inv_std, rtol=1e-6)  # WanPipeline (I2V)
    np.testing.assert_allclose(unscale_latents(config, z), z / inv_std + mean, rtol=1e-6)  # WanPipeline decode
    np.testing.assert_allclose(unscale_latents(config, scale_latents(config, z)), z, atol=1e-5)


# ---- conversion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trips_are_bit_exact(name):
    _, sd, config, params = reference(name)
    assert_bit_exact(wan_vae_to_torch(config, params, "diffusers"), sd)
    if config.attn_scales:
        with pytest.raises(ConversionError, match="original Wan VAE format is supported for attn_scales=\\(\\) only"):
            wan_vae_to_torch(config, params, "original")
        return
    original = wan_vae_to_torch(config, params, "original")
    config2, params2 = wan_vae_from_torch(original, config=config)
    assert_trees_equal(params2, params)
    assert_bit_exact(wan_vae_to_torch(config2, params2, "original"), original)


def test_original_table_agrees_with_diffusers_single_file_converter():
    """diffusers' own original → diffusers conversion of our original-format export gives back its weights."""
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = diffusers_vae(WAN_LAYOUT, seed=1)
    sd = state_dict_numpy(model)
    config, params = wan_vae_from_torch(sd, **_STATS)  # config inferred from the diffusers keys
    assert config == config_from_diffusers(dict(model.config))
    original = wan_vae_to_torch(config, params, "original")
    assert (
        "decoder.upsamples.4.shortcut.weight" in original and "encoder.downsamples.2.time_conv.weight" not in original
    )
    assert original["encoder.middle.1.norm.gamma"].shape == (16, 1, 1) and "conv2.weight" in original
    converted = convert_wan_vae_to_diffusers({k: torch.from_numpy(v) for k, v in original.items()})
    assert_bit_exact({k: v.numpy() for k, v in converted.items()}, sd)
    config2, params2 = wan_vae_from_torch(original, **_STATS)  # inferred from the original keys
    assert config2 == config
    assert_trees_equal(params2, params)


def test_generic_from_torch_folders_and_files(tmp_path):
    """``dit_jax.convert.from_torch``/``to_torch``/``save_torch`` and model directories take a Wan VAE."""
    import torch

    from dit_jax import convert
    from dit_jax.checkpoint import load_model, save_model

    model, sd, config, params = reference("attention")
    model.save_pretrained(tmp_path / "pipe" / "vae")
    for source in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        config2, params2 = wan_vae_from_torch(source)
        assert config2 == config
        assert_trees_equal(params2, params)
    config3, params3 = convert.from_torch(tmp_path / "pipe" / "vae")
    assert config3 == config
    assert_trees_equal(params3, params)
    assert_bit_exact(convert.to_torch(config3, params3, format="diffusers"), sd)
    out = convert.save_torch(tmp_path / "export", config3, params3, format="diffusers")
    assert json.loads((out / "config.json").read_text())["attn_scales"] == [1.0]
    assert_bit_exact(convert.to_torch(*convert.from_torch(out), format="diffusers"), sd)

    tiny_model, _, tiny, tiny_params = reference("tiny")
    torch.save(state_dict_torch(wan_vae_to_torch(tiny, tiny_params, "original")), tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ConversionError, match="cannot infer latents_mean and latents_std of a 4-channel Wan VAE"):
        convert.from_torch(tmp_path / "Wan2.1_VAE.pth")
    config4, params4 = convert.from_torch(tmp_path / "Wan2.1_VAE.pth", latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    assert config4 == tiny
    assert_trees_equal(params4, tiny_params)
    assert config_from_diffusers(config_to_diffusers(tiny)) == tiny
    assert {k: v for k, v in config_to_diffusers(tiny).items() if k != "_class_name"}.items() <= dict(
        tiny_model.config
    ).items()

    save_model(tmp_path / "model_dir", config, params)
    config5, params5 = load_model(tmp_path / "model_dir")
    assert config5 == config
    assert_trees_equal(params5, params)


def test_conversion_errors_name_the_key():
    _, sd, config, params = reference("tiny")
    bad = {**sd, "encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)}
    with pytest.raises(
        ConversionError, match=r"mis-shaped keys:\n  encoder.conv_in.weight: expected \(8, 3, 3, 3, 3\)"
    ):
        wan_vae_from_torch(bad, config=config)
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.upsamplers.0.time_conv.bias"}
    with pytest.raises(ConversionError, match=r"missing keys:\n  decoder.up_blocks.1.upsamplers.0.time_conv.bias"):
        wan_vae_from_torch(missing, config=config)
    extra = {**sd, "decoder.extra.gamma": np.zeros(2, np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected keys:\n  decoder.extra.gamma \(2,\)"):
        wan_vae_from_torch(extra, config=config)
    with pytest.raises(ConversionError, match="not a Wan VAE state dict"):
        wan_vae_from_torch({"encoder.conv_in.weight": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match="is_residual=True \\(the Wan 2.2 VAE\\) is not supported"):
        config_from_diffusers({"_class_name": "AutoencoderKLWan", "is_residual": True})
    with pytest.raises(ConversionError, match="describes a 'AutoencoderKL', not an AutoencoderKLWan"):
        config_from_diffusers({"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="unknown Wan VAE key format 'onnx'"):
        wan_vae_to_torch(config, params, "onnx")


def test_config_registry_and_input_errors():
    from dit_jax.models import abstract_params, build, config_from_dict, count_params, preset

    wan = preset("Wan2.1-VAE")
    assert wan is PRESETS["Wan2.1-VAE"] and (wan.spatial_factor, wan.temporal_factor) == (8, 4)
    assert wan.latents_mean[:2] == (-0.7571, -0.7089) and wan.latents_std[-1] == 1.9160
    assert count_params(nn.meta.unbox(abstract_params(wan))) == 126_892_531  # diffusers AutoencoderKLWan()
    _, _, config, params = reference("attention")
    assert isinstance(build(config), AutoencoderKLWan)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    boxed = jax.tree.leaves(abstract_params(config), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxed)
    assert {r.flax for r in wan_vae_rules(config)} == set(_flat(nn.meta.unbox(abstract_params(config))))
    assert infer_config(wan_vae_to_torch(config, params), **_STATS) == config

    with pytest.raises(ValueError, match=r"temporal_downsample=\(True,\) is invalid: expected 3 flags"):
        WanVAEConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="dropout=0.1 is invalid"):
        WanVAEConfig(dropout=0.1)
    with pytest.raises(ValueError, match="latents_mean"):
        WanVAEConfig(z_dim=4)
    vae = AutoencoderKLWan(config)
    with pytest.raises(ValueError, match=r"videos has 4 frames; expected 1 \+ 4·k"):
        encode(AutoencoderKLWan(PRESETS["Wan2.1-VAE"]), params, jnp.zeros((1, 4, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"expected videos of shape \(B, F, H, W, 3\)"):
        encode(vae, params, jnp.zeros((1, 3, 5, 8, 8)))
    with pytest.raises(ValueError, match="size 6x7 is not a multiple of the VAE's factor 2"):
        encode(vae, params, jnp.zeros((1, 5, 6, 7, 3)))
    with pytest.raises(ValueError, match="chunk_frames=0 must be a positive multiple"):
        encode(vae, params, jnp.zeros((1, 5, 8, 8, 3)), chunk_frames=0)
    with pytest.raises(ValueError, match=r"tile_size=\(31, 31\) must be positive multiples"):
        decode(vae, params, jnp.zeros((1, 2, 8, 8, 4)), tile_size=31)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, path) if isinstance(v, dict) else {path: v})
    return out
