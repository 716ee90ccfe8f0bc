"""Tiled VAE encode/decode: exact where it can be, within the documented bound on a realistic layout, sharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.encoders import AutoencoderKL, VAEConfig, decode_tiled, encode_tiled
from dit_jax.encoders.tiling import _cores, _ramp, _tile_starts


def _random_params(config: VAEConfig, seed: int = 0):
    """Random float32 params: kernels N(0, 1/fan_in), norm scales 1 ± 0.1, biases ±0.1 (nothing at an init value)."""
    vae = AutoencoderKL(config)
    shapes = jax.eval_shape(lambda k: vae.init(k, *config.dummy_inputs(1))["params"], jax.random.key(0))
    rs = np.random.RandomState(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.value.shape
        if name == "kernel":
            return (rs.randn(*shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        return ((name == "scale") + 0.1 * rs.randn(*shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _smooth(shape, seed=0) -> jax.Array:
    """Low-frequency waves plus a little noise: statistics that differ from tile to tile, like a photograph."""
    b, h, w, c = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rs = np.random.RandomState(seed)
    waves = [
        np.sin(2 * np.pi * (rs.uniform(0.3, 2) * xx + rs.uniform(0.3, 2) * yy) + rs.uniform(0, 6)) for _ in range(c)
    ]
    x = 0.8 * np.stack(waves, -1)[None] + 0.1 * rs.randn(b, h, w, c)
    return jnp.asarray(x.clip(-1, 1).astype(np.float32))


def _err(got, want) -> float:
    return float(jnp.abs(got - want).max() / jnp.std(want))


# f = 2 and one layer per block: the receptive field (≤ 8 image px per side) fits inside a quarter of the overlap, so
# with whole-image GroupNorm statistics, tiling is exact up to float rounding.
SMALL = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=96)


def test_tile_geometry():
    assert _tile_starts(100, 40, 30) == [0, 30, 60] and _tile_starts(30, 40, 30) == [0]
    starts = _tile_starts(64, 48, 12)  # last tile moved back to end at 64
    assert starts == [0, 12, 16]
    cores = _cores(starts, 48, 64, 2)
    spans = [(s + a, s + b) for s, (a, b) in zip(starts, cores)]
    assert spans[0][0] == 0 and spans[-1][1] == 64 and all(p[1] == q[0] for p, q in zip(spans, spans[1:]))
    w = _ramp(32, 16, 16)
    assert w.min() > 0 and w.max() == 1 and np.array_equal(w, w[::-1]) and w[:4].max() < 1e-5  # outer quarter unused
    # two tiles overlapping by 16: their ramps cross-fade to a partition of unity over the overlap
    total = np.zeros(48)
    total[:32] += w
    total[16:] += w
    assert np.allclose(total[16:32], 1.0, atol=1e-5)
    edge = _ramp(32, None, 16)  # no ramp on the image border
    assert np.all(edge[:16] == 1) and np.array_equal(edge[16:], w[16:])


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_tiled_is_exact_with_whole_image_statistics(direction):
    params = _random_params(SMALL)
    vae = AutoencoderKL(SMALL)
    if direction == "encode":
        x = _smooth((2, 80, 72, 3))  # 2×2 tiles of 64² (the last ones moved back to the edge)
        want = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])(params, x)
        tiled = lambda p, x, n: encode_tiled(vae, p, x, tile_size=64, overlap=0.75, norm_passes=n)[0]
    else:
        x = _smooth((2, 64, 56, 4))  # 3×2 latent tiles of 48²
        want = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, x)
        tiled = lambda p, z, n: decode_tiled(vae, p, z, tile_size=96, overlap=0.75, norm_passes=n)
    exact = jax.jit(lambda p, x: tiled(p, x, None))(params, x)
    per_tile = jax.jit(lambda p, x: tiled(p, x, 0))(params, x)
    errs = _err(exact, want), _err(per_tile, want)
    print(f"{direction} f=2: max |tiled - untiled| / std: exact statistics {errs[0]:.1e}, per-tile {errs[1]:.1e}")
    assert exact.shape == want.shape
    assert errs[0] < 1e-4 and errs[1] > 1e-2


def test_realistic_layout_within_documented_bound():
    """SD block layout (4 blocks × 2 layers, 32 groups) at widths 32-64-64-64, 160² image, 128-px tiles (2×2)."""
    config = VAEConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=32, sample_size=128)
    params = _random_params(config)
    vae = AutoencoderKL(config)
    x = _smooth((1, 160, 160, 3))
    mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])(params, x)
    image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, mean)
    err = {}
    for n, label in ((None, "exact"), (0, "per-tile")):
        got = jax.jit(lambda p, x, n=n: encode_tiled(vae, p, x, norm_passes=n)[0])(params, x)
        err["encode", label] = _err(got, mean), float(jnp.abs(got - mean).mean() / jnp.std(mean))
        got = jax.jit(lambda p, z, n=n: decode_tiled(vae, p, z, norm_passes=n))(params, mean)
        err["decode", label] = _err(got, image), float(jnp.abs(got - image).mean() / jnp.std(image))
    print(
        "realistic layout, |tiled - untiled| / std (max, mean):", {k: f"{a:.1e}, {b:.1e}" for k, (a, b) in err.items()}
    )
    for what, bound in (("encode", 0.05), ("decode", 0.25)):  # the bounds in the docstrings
        (exact_max, exact_mean), (tile_max, tile_mean) = err[what, "exact"], err[what, "per-tile"]
        assert exact_max < bound and exact_mean < 1e-2
        assert exact_max < 0.2 * tile_max and exact_mean < 0.05 * tile_mean


def test_tiled_decode_sharded_over_the_batch():
    params = _random_params(SMALL)
    vae = AutoencoderKL(SMALL)
    z = _smooth((8, 48, 40, 4))  # 2×2 latent tiles of 32²
    fn = jax.jit(lambda p, z: decode_tiled(vae, p, z, tile_size=64, overlap=0.5, norm_passes=1))
    want = fn(params, z)
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        got = fn(params, jax.device_put(z, NamedSharding(mesh, P(("data", "fsdp")))))
    err = float(jnp.abs(got - want).max())
    print(f"sharded tiled decode vs unsharded: max abs err {err:.1e}")
    assert len(got.sharding.device_set) == 8 and err < 1e-5


def test_small_inputs_are_not_tiled_and_bad_arguments():
    params = _random_params(SMALL)
    vae = AutoencoderKL(SMALL)
    x = _smooth((1, 96, 64, 3))
    want = vae.apply({"params": params}, x, method="encode")
    got = encode_tiled(vae, params, x)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="tile_size=33 must be a positive multiple of the VAE's downsample factor 2"):
        encode_tiled(vae, params, x, tile_size=33)
    with pytest.raises(ValueError, match=r"overlap=1.0 must be in \[0, 1\)"):
        decode_tiled(vae, params, x[..., :4], overlap=1.0)
    with pytest.raises(ValueError, match="norm_passes=-1"):
        decode_tiled(vae, params, x[..., :4], norm_passes=-1)


def test_pipeline_decodes_tile_by_tile_when_asked():
    """``pipe.enable_vae_tiling(...)``: the pipeline's decode is ``decode_tiled`` of the unscaled latents (the same
    images as calling it by hand), close to the untiled decode (whole-image statistics: within 1e-3 of it on this
    small layout), recompiled for new settings; ``disable_vae_tiling`` restores the untiled decode. Pixel-space
    pipelines and bad tile sizes are one clear error."""
    from dit_jax import diffusion, models, pipelines
    from dit_jax.encoders.vae import unscale_latents

    dit = models.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                           num_classes=4, learn_sigma=False)  # fmt: skip
    params = nn.meta.unbox(jax.eval_shape(lambda k: models.build(dit).init(k, *dit.dummy_inputs(1))["params"],
                                          jax.random.key(0)))  # fmt: skip
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params)  # the decode alone is tested
    vae_params = _random_params(SMALL)
    kw = dict(model_config=dit, params=params, schedule=diffusion.FlowSchedule(), method="euler")
    pipe = pipelines.ClassConditionalPipeline(**kw, vae_config=SMALL, vae_params=vae_params)
    z = np.asarray(_smooth((2, 48, 40, 4), seed=3))  # 2×2 latent tiles of 32² at tile_size 64
    untiled = pipe.decode(z)
    pipe.enable_vae_tiling(64, overlap=0.5)
    tiled = pipe.decode(z)
    vae = AutoencoderKL(SMALL)
    by_hand = jax.jit(lambda p, z: decode_tiled(vae, p, unscale_latents(SMALL, z), tile_size=64, overlap=0.5))
    want = np.clip(np.asarray(by_hand(vae_params, z)) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(tiled, want, rtol=0, atol=1e-6)
    err = float(np.abs(tiled - untiled).max())
    print(f"pipeline decode, tiled vs untiled (whole-image statistics): max abs {err:.1e}")
    assert 0 < err < 1e-3  # measured 2.0e-4 (images in [0, 1])
    pipe.enable_vae_tiling(64, overlap=0.5, norm_passes=0)  # per-tile statistics: a new function, other images
    assert float(np.abs(pipe.decode(z) - untiled).max()) > 10 * err
    pipe.disable_vae_tiling()
    np.testing.assert_array_equal(pipe.decode(z), untiled)
    with pytest.raises(ValueError, match="tile_size=33 must be a positive multiple"):
        pipe.enable_vae_tiling(33)
    pixels = pipelines.ClassConditionalPipeline(**{**kw, "model_config": dit.replace(in_channels=3)})
    with pytest.raises(ValueError, match="enable_vae_tiling: a pixel-space model has no VAE"):
        pixels.enable_vae_tiling()
