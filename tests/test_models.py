"""DiT and PixArt models: presets, configs, scan/remat layouts, bf16, sharded forward, error paths.

Parity with the torch originals is in test_kv_compress.py (PixArt with compression) and the convert tests.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from parity import assert_trees_equal, rel_err

from dit_jax import models
from dit_jax.models import DiTConfig, PixArtConfig
from dit_jax.parallel import logical_rules

# Tiny configs shared by the tests below (one compile per config and variant).
DIT = DiTConfig(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=4, num_classes=10)
PIXART = PixArtConfig(
    input_size=8,
    patch_size=2,
    hidden_size=48,
    depth=4,
    num_heads=4,
    caption_channels=24,
    caption_length=6,
    micro_conditions=True,
    qk_norm=True,
    pe_interpolation=0.5,
    kv_compress_layers=(1, 2),  # three homogeneous stages: [0], [1, 2], [3]
    kv_compress_ratio=2,
    kv_compress_op="conv",
)
BATCH = 4  # divisible by data × fsdp = 4 of the test mesh


def randomize(params, seed: int):
    """Random values for every leaf (zero-initialised adaLN/output layers included), ~unit-scale activations."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rs = np.random.RandomState(seed)  # numpy: no per-shape compiles
    out = []
    for path, x in leaves:
        names = [getattr(p, "key", "") for p in path]
        noise = rs.standard_normal(x.shape).astype(np.float32)
        if names[-1] == "kernel":
            fan_in = np.prod(x.shape[:-1]) if (x.ndim == 4 or "proj" in names) else x.shape[-x.ndim]
            if x.ndim == 5:  # scanned stage: leading layer axis
                fan_in = np.prod(x.shape[1:-1]) if "proj" in names else x.shape[1]
            out.append(noise / np.sqrt(fan_in))
        elif names[-1] == "scale":
            out.append(1 + 0.2 * noise)
        elif names[-1] in ("embedding", "y_embedding"):
            out.append(noise / np.sqrt(x.shape[-1]))
        else:  # biases, scale_shift_table
            out.append(0.2 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def dit_inputs(batch=BATCH, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, 8, 8, 4).astype(np.float32)
    t = rs.uniform(0, 1000, batch).astype(np.float32)
    y = rs.randint(0, DIT.num_classes + 1, batch).astype(np.int32)  # includes the null class sometimes
    return x, t, y


def pixart_inputs(batch=BATCH, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, 8, 12, 4).astype(np.float32)  # non-square: 4x6 tokens
    t = rs.uniform(0, 1000, batch).astype(np.float32)
    caption = rs.randn(batch, 6, 24).astype(np.float32)
    mask = np.ones((batch, 6), np.int32)
    mask[1, 3:] = 0
    mask[-1, 1:] = 0
    resolution = np.tile(np.array([[64.0, 96.0]], np.float32), (batch, 1))
    aspect = np.full((batch, 1), 64 / 96, np.float32)
    return x, t, caption, mask, resolution, aspect


@jax.jit
def _noop(x):
    return x


_apply = jax.jit(lambda cfg, p, *a: models.build(cfg).apply({"params": p}, *a), static_argnums=0)


def random_params(cfg, seed):
    """Random parameters of the right tree and shapes without compiling an init (``abstract_params``)."""
    return randomize(nn.meta.unbox(models.abstract_params(cfg)), seed)


@pytest.fixture(scope="module")
def dit_params():
    return random_params(DIT, 1)


@pytest.fixture(scope="module")
def pixart_params():
    return random_params(PIXART, 2)


@pytest.fixture(scope="module")
def dit_ref(dit_params):
    return np.asarray(_apply(DIT, dit_params, *dit_inputs()))


@pytest.fixture(scope="module")
def pixart_ref(pixart_params):
    return np.asarray(_apply(PIXART, pixart_params, *pixart_inputs()))


# ---- presets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, depth, width, heads", [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16), ("XL", 28, 1152, 16)]
)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_presets(size, depth, width, heads, patch):
    c = models.preset(f"DiT-{size}/{patch}")
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (depth, width, heads, patch)
    assert (c.input_size, c.in_channels, c.out_channels, c.num_classes) == (32, 4, 8, 1000)
    assert (c.timestep_freq_shift, c.mlp_norm_eps) == (0.0, 1e-6)  # the original's numerics


def test_dit_xl2_parameter_count():
    """The original's 675,129,632 minus its stored 256×1152 positional table, which we compute instead."""
    n = models.count_params(models.abstract_params(models.preset("DiT-XL/2")))
    assert n == 674_834_720 == 675_129_632 - 256 * 1152


def _count_without_null_caption(name):
    p = nn.meta.unbox(models.abstract_params(models.preset(name)))
    return models.count_params(p) - p["y_embedder"]["y_embedding"].size


@pytest.mark.parametrize(
    "name, size, length, interp, micro",
    [
        ("PixArt-XL-2-256x256", 256, 120, 1.0, False),
        ("PixArt-XL-2-512x512", 512, 120, 1.0, False),
        ("PixArt-XL-2-1024-MS", 1024, 120, 2.0, True),
        ("PixArt-Sigma-XL-2-256x256", 256, 300, 0.5, False),
        ("PixArt-Sigma-XL-2-512-MS", 512, 300, 1.0, False),
        ("PixArt-Sigma-XL-2-1024-MS", 1024, 300, 2.0, False),
        ("PixArt-Sigma-XL-2-2K-MS", 2048, 300, 4.0, False),
    ],
)
def test_pixart_presets(name, size, length, interp, micro):
    c = models.preset(name)
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.caption_channels) == (28, 1152, 16, 2, 4096)
    assert c.input_size == size // 8 and c.caption_length == length
    assert c.pe_interpolation == interp and c.micro_conditions == micro
    assert c.kv_compress_layers == () and c.learned_null_caption


def test_pixart_parameter_counts():
    """MODELS.md §2.1: 610.9M for Σ, 611.3M for α-1024 with micro-conditions (buffers not counted)."""
    sigma = _count_without_null_caption("PixArt-Sigma-XL-2-1024-MS")
    alpha = _count_without_null_caption("PixArt-XL-2-1024-MS")
    print(f"PixArt-Σ {sigma:,}  PixArt-α-1024-MS {alpha:,}")
    assert round(sigma / 1e5) == 6109 and round(alpha / 1e5) == 6113
    assert alpha - sigma == 2 * ((256 + 1) * 384 + (384 + 1) * 384)  # csize + ar embedders
    # KV compression on layers 14–27 adds a depthwise R×R conv and a LayerNorm per layer; with R = 3 the 64×64
    # token grid of the training size is not divisible by R, which must not stop building the parameters.
    for r in (2, 3):
        kv = models.preset("PixArt-Sigma-XL-2-1024-MS", kv_compress_layers=tuple(range(14, 28)), kv_compress_ratio=r)
        extra = models.count_params(models.abstract_params(kv)) - sigma - 300 * 4096
        assert extra == 14 * (1152 * r * r + 1152 + 2 * 1152)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'DiT-XXL/2'.*Known presets: \[.*'DiT-B/2'"):
        models.preset("DiT-XXL/2")
    with pytest.raises(ValueError, match=r"Did you mean \['DiT-XL/2'\]"):
        models.preset("dit-xl/2")
    assert models.preset("DiT-S/2", depth=3).depth == 3


# ---- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, changes, match",
    [
        (DiTConfig, dict(hidden_size=50, num_heads=4), "hidden_size=50 .*multiple of num_heads=4"),
        (DiTConfig, dict(hidden_size=6, num_heads=3), "hidden_size=6 .*multiple of 4"),
        (DiTConfig, dict(input_size=9), "input_size=9 .*multiple of patch_size=2"),
        (DiTConfig, dict(depth=0), "depth=0 .*positive"),
        (DiTConfig, dict(dtype="float8"), "dtype='float8'"),
        (DiTConfig, dict(remat="everything"), "remat='everything'"),
        (
            DiTConfig,
            dict(attention_backend="cudnnn"),
            r"attention_backend='cudnnn' .*\['auto', 'blockwise', 'cpu', 'cudnn', 'dense', 'pallas', 'xla'",
        ),
        (PixArtConfig, dict(attention_backend="flash"), "attention_backend='flash'"),
        (PixArtConfig, dict(kv_compress_op="max"), "kv_compress_op='max' .*'conv', 'avg', 'discard'"),
        (PixArtConfig, dict(kv_compress_ratio=1), "kv_compress_ratio=1 .*>= 2"),
        (PixArtConfig, dict(kv_compress_layers=(3, 28)), r"kv_compress_layers=\(3, 28\) .*\[0, 28\)"),
        (PixArtConfig, dict(micro_conditions=True, hidden_size=1024), "hidden_size=1024 .*multiple of 3"),
        (PixArtConfig, dict(caption_channels=None), "cross_attention_dim=None"),
    ],
)
def test_config_validation(cls, changes, match):
    with pytest.raises(ValueError, match=match):
        cls(**changes)
    with pytest.raises(ValueError, match=match):  # replace() validates too
        cls().replace(**changes)


@pytest.mark.parametrize("config", [models.preset("DiT-XL/2"), DIT.replace(dtype="bfloat16", remat="dots"), PIXART])
def test_config_json_round_trip(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert d["family"] == config.family
    back = models.config_from_dict(d)
    assert back == config and type(back) is type(config)
    assert isinstance(back.kv_compress_layers, tuple) if isinstance(back, PixArtConfig) else True


def test_config_from_dict_errors():
    with pytest.raises(ValueError, match="unknown model family 'unet'"):
        models.config_from_dict({"family": "unet"})
    with pytest.raises(ValueError, match=r"unknown DiTConfig field\(s\) \['hidden'\]"):
        models.config_from_dict({"family": "dit", "hidden": 3})
    with pytest.raises(ValueError, match="family 'pixart' does not match DiTConfig"):
        DiTConfig.from_dict(PIXART.to_dict())


def test_dit_init_is_adaln_zero():
    """Fresh parameters follow the original init: zero adaLN and output layers, so the model starts at zero."""
    params = models.init_params(DIT, 0)
    assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(models.abstract_params(DIT)))
    for i in range(DIT.depth):
        np.testing.assert_array_equal(params[f"blocks_{i}"]["adaLN_modulation"]["linear"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["final_layer"]["linear"]["kernel"], 0.0)
    assert np.std(params["blocks_0"]["attn"]["qkv"]["kernel"]) > 0.05  # xavier, not zero
    np.testing.assert_array_equal(_apply(DIT, params, *dit_inputs()), 0.0)


# ---- layouts: scan, remat --------------------------------------------------------------------------------------


def test_dit_scan_equals_loop(dit_params, dit_ref):
    cfg, p = models.set_scan(DIT, dit_params, True)
    assert "stage_0" in p and "blocks_0" not in p and p["stage_0"]["mlp"]["fc1"]["kernel"].shape[0] == DIT.depth
    err = rel_err(_apply(cfg, p, *dit_inputs()), dit_ref)
    print(f"DiT scan vs loop: max rel err {err:.1e}")
    assert err < 1e-6
    back_cfg, back = models.set_scan(cfg, p, False)
    assert back_cfg == DIT
    assert_trees_equal(back, dit_params)


def test_pixart_scan_equals_loop(pixart_params, pixart_ref):
    cfg, p = models.set_scan(PIXART, pixart_params, True)
    assert sorted(k for k in p if k.startswith("stage_")) == ["stage_0", "stage_1", "stage_2"]
    assert "compress" in p["stage_1"]["attn"] and "compress" not in p["stage_0"]["attn"]
    err = rel_err(_apply(cfg, p, *pixart_inputs()), pixart_ref)
    print(f"PixArt (KV compression on 1-2 of 4) scan vs loop: max rel err {err:.1e}")
    assert err < 1e-6


def _loss_and_grad(cfg, p, *args):
    def loss(p):
        return jnp.mean(jnp.square(models.build(cfg).apply({"params": p}, *args)))

    return jax.jit(jax.value_and_grad(loss))(p)


def test_remat_equals_no_remat(dit_params):
    args = dit_inputs()
    want_loss, want_grad = _loss_and_grad(DIT, dit_params, *args)
    for remat, scan in [("full", False), ("dots", True)]:
        cfg, p = models.set_scan(DIT.replace(remat=remat), dit_params, scan)
        loss, grad = _loss_and_grad(cfg, p, *args)
        grad = models.set_scan(cfg, grad, False)[1]
        errs = jax.tree.leaves(jax.tree.map(rel_err, grad, want_grad))
        print(f"DiT remat={remat} scan={scan}: loss {float(loss):.6f} vs {float(want_loss):.6f}, grad {max(errs):.1e}")
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert max(errs) < 1e-5


# ---- bf16 ------------------------------------------------------------------------------------------------------


def test_bf16_within_tolerance(dit_params, pixart_params, dit_ref, pixart_ref):
    """Compute in bf16 (params stay fp32; norms and softmax in fp32) vs fp32.

    Tolerance: max |bf16 − fp32| / max |fp32| < 3e-2. Measured on these random tiny models (CPU): DiT 6.3e-3,
    PixArt (qk-norm, conv KV compression, micro-conditions, caption mask) 1.1e-2 — bf16's 8-bit mantissa
    (2⁻⁸ ≈ 4e-3 per rounding) accumulated over a few blocks; the bound leaves ~3× headroom for other seeds.
    """
    for name, cfg, params, args, want in [
        ("DiT", DIT, dit_params, dit_inputs(), dit_ref),
        ("PixArt", PIXART, pixart_params, pixart_inputs(), pixart_ref),
    ]:
        got = _apply(cfg.replace(dtype="bfloat16"), params, *args)
        assert got.dtype == jnp.float32  # outputs are returned in fp32
        err = rel_err(got, want)
        print(f"{name} bf16 vs fp32: max rel err {err:.1e}")
        assert 0 < err < 3e-2


# ---- sharded forward -------------------------------------------------------------------------------------------


def _sharded_apply(cfg, params, args):
    """Forward over the (data=2, fsdp=2, tensor=2) mesh of the 8 test devices with the default logical rules."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = logical_rules()
    specs = models.logical_param_specs(cfg)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    params = jax.device_put(params, shardings)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(a, batch) for a in args]
    # the parameters really are split over the devices
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, *a: models.build(cfg).apply({"params": p}, *a))
        hlo = fn.lower(params, *args).as_text()
        out = fn(params, *args)
    assert "sharding_constraint" in hlo or "@Sharding" in hlo  # the logical activation constraints were applied
    return out


def test_dit_sharded_equals_unsharded(dit_params, dit_ref):
    out = _sharded_apply(DIT, dit_params, dit_inputs())
    err = rel_err(out, dit_ref)
    print(f"DiT sharded (data=2, fsdp=2, tensor=2) vs unsharded: max rel err {err:.1e}")
    assert err < 1e-5


def test_pixart_sharded_equals_unsharded(pixart_params, pixart_ref):
    """qk-norm, caption mask, micro-conditions and KV compression on a subset, scanned stages."""
    cfg, p = models.set_scan(PIXART, pixart_params, True)
    out = _sharded_apply(cfg, p, pixart_inputs())
    err = rel_err(out, pixart_ref)
    print(f"PixArt sharded (data=2, fsdp=2, tensor=2) vs unsharded: max rel err {err:.1e}")
    assert err < 1e-5


# ---- PixArt conditioning and error paths ---------------------------------------------------------------------------


def test_pixart_conditioning_is_used(pixart_params, pixart_ref):
    """Caption mask, micro-conditions and the learned null caption each change the output."""
    x, t, caption, mask, res, ar = pixart_inputs()
    caption2 = caption.copy()
    caption2[1, 3:] += 5.0  # masked tokens of row 1 only
    out = np.asarray(_apply(PIXART, pixart_params, x, t, caption2, mask, res, ar))
    np.testing.assert_allclose(out, pixart_ref, rtol=0, atol=1e-5)  # masked tokens are ignored
    out = np.asarray(_apply(PIXART, pixart_params, x, t, caption, mask, res * 2, ar))
    assert rel_err(out, pixart_ref) > 1e-3

    drop = np.array([True, False, False, True])
    apply_drop = jax.jit(lambda p, *a: models.build(PIXART).apply({"params": p}, *a, drop_caption=drop))
    dropped = apply_drop(pixart_params, x, t, caption, mask, res, ar)
    null = np.broadcast_to(pixart_params["y_embedder"]["y_embedding"], caption.shape)
    manual = _apply(PIXART, pixart_params, x, t, np.where(drop[:, None, None], null, caption), mask, res, ar)
    np.testing.assert_allclose(dropped, manual, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dropped)[1:3], pixart_ref[1:3], rtol=0, atol=1e-5)


def _trace_pixart(cfg, *args, **kwargs):
    """Trace init + forward without compiling (errors are raised while tracing)."""
    return jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), *args, **kwargs))


def test_pixart_error_paths():
    x, t, caption, mask, res, ar = pixart_inputs(batch=2)
    with pytest.raises(ValueError, match="micro-conditioned: pass resolution"):
        _trace_pixart(PIXART, x, t, caption, mask)
    with pytest.raises(ValueError, match=r"caption_mask shape \(2, 5\) does not match captions \(2, 6\)"):
        _trace_pixart(PIXART, x, t, caption, mask[:, :5], res, ar)
    with pytest.raises(ValueError, match="micro-condition of batch 3 does not divide the batch 2"):
        _trace_pixart(PIXART, x, t, caption, mask, np.concatenate([res, res[:1]]), ar)
    _trace_pixart(PIXART, x, t, caption, mask, res[:1], ar[:1])  # one row is broadcast over the batch
    no_null = dataclasses.replace(PIXART, learned_null_caption=False, micro_conditions=False)
    with pytest.raises(ValueError, match="no learned null caption"):
        _trace_pixart(no_null, x, t, caption, mask, drop_caption=np.array([True, False]))
    with pytest.raises(ValueError, match="caption length 5 differs from the learned null caption's 6"):
        _trace_pixart(PIXART, x, t, caption[:, :5], mask[:, :5], res, ar, drop_caption=np.array([True, False]))
