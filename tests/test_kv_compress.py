"""PixArt-Σ KV token compression against the torch reference (tests/torch_reference.py, MODELS.md §2.1).

Module level (``KVCompress``, ``SelfAttention`` with qk-norm, one ``PixArtBlock``) with a direct weight copy; the
full model with compression on a subset of layers (several scan stages) through ``dit_jax.convert.from_state_dict``;
``enable_kv_compress`` (Conv Avg Init) on a model trained without compression.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as ref
from parity import nhwc, randomize_, rel_err, state_dict_numpy, to_numpy

from dit_jax import models
from dit_jax.models.pixart import PixArtBlock
from dit_jax.nn.attention import KVCompress, SelfAttention

D, HEADS = 48, 4
DH = D // HEADS


# ---- direct weight copies for module-level tests (the full model goes through dit_jax.convert) -----------------


def _dense(lin: torch.nn.Linear, in_shape=None, out_shape=None) -> dict:
    kernel = to_numpy(lin.weight).T
    ins = tuple(in_shape) if in_shape else kernel.shape[:1]
    outs = tuple(out_shape) if out_shape else kernel.shape[1:]
    return {"kernel": kernel.reshape(ins + outs), "bias": to_numpy(lin.bias).reshape(outs)}


def _norm(ln: torch.nn.LayerNorm) -> dict:
    return {"scale": to_numpy(ln.weight), "bias": to_numpy(ln.bias)}


def _compress(attn: ref.AttentionKVCompress) -> dict:
    return {
        "sr": {"kernel": to_numpy(attn.sr.weight).transpose(2, 3, 1, 0), "bias": to_numpy(attn.sr.bias)},
        "norm": _norm(attn.norm),
    }


def _self_attention(attn: ref.AttentionKVCompress) -> dict:
    p = {"qkv": _dense(attn.qkv, out_shape=(3, HEADS, DH)), "proj": _dense(attn.proj, in_shape=(HEADS, DH))}
    if isinstance(attn.q_norm, torch.nn.LayerNorm):
        p["q_norm"], p["k_norm"] = _norm(attn.q_norm), _norm(attn.k_norm)
    if hasattr(attn, "sr"):
        p["compress"] = _compress(attn)
    return p


def _block(blk: ref.PixArtMSBlock) -> dict:
    ca = blk.cross_attn
    return {
        "scale_shift_table": to_numpy(blk.scale_shift_table),
        "attn": _self_attention(blk.attn),
        "cross_attn": {
            "q": _dense(ca.q_linear, out_shape=(HEADS, DH)),
            "kv": _dense(ca.kv_linear, out_shape=(2, HEADS, DH)),
            "proj": _dense(ca.proj, in_shape=(HEADS, DH)),
        },
        "mlp": {"fc1": _dense(blk.mlp.fc1), "fc2": _dense(blk.mlp.fc2)},
    }


GRIDS = {"square": (6, 6), "nonsquare": (6, 12)}  # token grids divisible by 2 and 3


# ---- KVCompress ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("op", ["conv", "avg", "discard"])
def test_kv_compress_matches_reference(op, ratio, grid):
    h, w = grid
    attn = randomize_(ref.AttentionKVCompress(D, HEADS, sampling=op, sr_ratio=ratio), seed=ratio)
    tokens = torch.randn(2, h * w, D, generator=torch.Generator().manual_seed(1))
    want = to_numpy(attn.downsample_2d(tokens, h, w))
    assert want.shape == (2, h * w // ratio**2, D)

    module = KVCompress(ratio, op, grid)
    params = {"params": _compress(attn)} if op == "conv" else {}
    got = jax.jit(module.apply)(params, to_numpy(tokens))
    err = rel_err(got, want)
    print(f"KVCompress op={op} R={ratio} grid={h}x{w}: max rel err {err:.1e}")
    assert got.shape == want.shape
    assert err < 1e-6


@pytest.mark.parametrize("ratio", [2, 3])
def test_original_ave_mode_is_discard(ratio):
    """The original 'ave' (nearest interpolation) is uniform striding, i.e. our ``discard``, not averaging."""
    tokens = torch.randn(1, 6 * 12, 8)
    modes = {
        m: ref.AttentionKVCompress(8, 2, sampling=m, sr_ratio=ratio).downsample_2d(tokens, 6, 12)
        for m in ("ave", "discard", "avg")
    }
    torch.testing.assert_close(modes["ave"], modes["discard"], rtol=0, atol=0)
    assert not torch.allclose(modes["ave"], modes["avg"])


def test_kv_compress_grid_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ratio 2 needs a token grid divisible by 2; got 5x6"):
        KVCompress(2, "avg", (5, 6)).init(jax.random.key(0), jnp.zeros((1, 30, D)))
    with pytest.raises(ValueError, match=r"ratio 3 needs a token grid divisible by 3; got 6x4"):
        KVCompress(3, "conv", (6, 4)).init(jax.random.key(0), jnp.zeros((1, 24, D)))


# ---- self-attention with qk-norm + compression, and a whole PixArt block --------------------------------------------


@pytest.mark.parametrize("op, ratio", [("conv", 2), ("avg", 3), ("discard", 2)])
def test_self_attention_qk_norm_and_compression(op, ratio):
    h, w = GRIDS["nonsquare"]
    attn = randomize_(ref.AttentionKVCompress(D, HEADS, sampling=op, sr_ratio=ratio, qk_norm=True), seed=3)
    x = torch.randn(2, h * w, D, generator=torch.Generator().manual_seed(4))
    want = to_numpy(attn(x, (h, w)))
    module = SelfAttention(HEADS, qk_norm=True, kv_compress=(ratio, op), grid=(h, w), backend="xla")
    got = jax.jit(module.apply)({"params": _self_attention(attn)}, to_numpy(x))
    err = rel_err(got, want)
    print(f"SelfAttention qk_norm op={op} R={ratio}: max rel err {err:.1e}")
    assert err < 1e-5


def test_pixart_block_with_compression_and_caption_mask():
    h, w = 4, 6
    blk = randomize_(ref.PixArtMSBlock(D, HEADS, sampling="conv", sr_ratio=2, qk_norm=True), seed=5)
    g = torch.Generator().manual_seed(6)
    x, y, t0 = (
        torch.randn(2, h * w, D, generator=g),
        torch.randn(2, 5, D, generator=g),
        torch.randn(2, 6 * D, generator=g),
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    want = to_numpy(blk(x, y, t0, mask, (h, w)))
    module = PixArtBlock(HEADS, 4 * D, (h, w), qk_norm=True, kv_compress=(2, "conv"), backend="xla")
    got = jax.jit(module.apply)({"params": _block(blk)}, to_numpy(x), to_numpy(y), mask.numpy(), to_numpy(t0))
    err = rel_err(got, want)
    print(f"PixArtBlock (conv R=2, qk-norm, caption mask): max rel err {err:.1e}")
    assert err < 1e-5


# ---- the full model: compression on a subset of layers, through the converter -------------------------------------

DEPTH = 4
KV_LAYERS = (1, 2)  # → three scan stages: [0], [1, 2], [3]
TINY = dict(input_size=8, patch_size=2, hidden_size=D, depth=DEPTH, num_heads=HEADS)
CAPTION_C, CAPTION_L = 24, 6


def _reference_model(seed, kv=None, skip=(), **kw) -> ref.OrigPixArtMS:
    m = ref.OrigPixArtMS(
        **TINY,
        caption_channels=CAPTION_C,
        model_max_length=CAPTION_L,
        pe_interpolation=0.5,
        kv_compress_config=kv,
        **kw,
    )
    return randomize_(m, seed, skip=skip).eval()


def _inputs(height, width, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 4, height, width).astype(np.float32)  # NCHW
    t = np.array([17.0, 801.5], np.float32)
    caption = rs.randn(2, CAPTION_L, CAPTION_C).astype(np.float32)
    mask = np.array([[1] * CAPTION_L, [1, 1, 1, 0, 0, 0]], np.int64)
    return x, t, caption, mask


def _run_reference(model, x, t, caption, mask, **kw):
    with torch.no_grad():
        out = model(*(torch.from_numpy(a) for a in (x, t, caption, mask)), **kw)
    return nhwc(to_numpy(out))


def _convert(model: torch.nn.Module, **overrides):
    """Original-format state dict → (config, params) with ``dit_jax.convert.from_state_dict`` (in memory)."""
    from dit_jax.convert import from_state_dict

    return from_state_dict(state_dict_numpy(model), format="original", **overrides)


_forward = jax.jit(lambda cfg, p, *a: models.build(cfg).apply({"params": p}, *a), static_argnums=0)


@pytest.mark.parametrize("ratio", [2, 3])
def test_pixart_with_compressed_layers_matches_reference(ratio):
    """qk-norm, conv compression on layers 1–2 of 4, a non-square grid and a caption mask; scanned and looped."""
    kv = {"sampling": "conv", "scale_factor": ratio, "kv_compress_layer": list(KV_LAYERS)}
    torch_model = _reference_model(7, kv, qk_norm=True)
    th, tw = (4, 6) if ratio == 2 else (3, 6)  # token grid
    x, t, caption, mask = _inputs(2 * th, 2 * tw)
    want = _run_reference(torch_model, x, t, caption, mask)

    config, params = _convert(torch_model, num_heads=HEADS, pe_interpolation=0.5)
    assert config.kv_compress_layers == KV_LAYERS and config.kv_compress_ratio == ratio and config.qk_norm
    config = config.replace(attention_backend="xla")
    for scan in (False, True):
        cfg, p = models.set_scan(config, params, scan)
        if scan:  # a heterogeneous stack is scanned as homogeneous stages
            assert sorted(k for k in p if k.startswith(("stage_", "blocks_"))) == ["stage_0", "stage_1", "stage_2"]
        got = _forward(cfg, p, nhwc(x), t, caption, mask)
        err = rel_err(got, want)
        print(f"PixArt conv R={ratio} layers {KV_LAYERS} scan={scan}: max rel err {err:.1e}")
        assert err < 1e-5


@pytest.mark.parametrize("op", ["avg", "discard"])
def test_pixart_parameter_free_ops_match_reference(op):
    """``avg``/``discard`` add no parameters: convert a plain model and switch compression on in the config."""
    kv = {"sampling": op, "scale_factor": 2, "kv_compress_layer": list(KV_LAYERS)}
    torch_model = _reference_model(8, kv)
    x, t, caption, mask = _inputs(8, 12)
    want = _run_reference(torch_model, x, t, caption, mask)
    config, params = _convert(torch_model, num_heads=HEADS, pe_interpolation=0.5)
    config = config.replace(
        kv_compress_layers=KV_LAYERS, kv_compress_ratio=2, kv_compress_op=op, attention_backend="xla"
    )
    got = _forward(config, params, nhwc(x), t, caption, mask)
    err = rel_err(got, want)
    print(f"PixArt {op} R=2 layers {KV_LAYERS}: max rel err {err:.1e}")
    assert err < 1e-5


def test_model_grid_not_divisible_is_a_clear_error():
    config = models.PixArtConfig(
        **TINY, caption_channels=CAPTION_C, caption_length=CAPTION_L, kv_compress_layers=KV_LAYERS, kv_compress_ratio=3
    )
    x = jnp.zeros((1, 8, 12, 4))  # 4x6 tokens: not divisible by 3
    args = (x, jnp.zeros(1), jnp.zeros((1, CAPTION_L, CAPTION_C)), jnp.ones((1, CAPTION_L)))
    with pytest.raises(ValueError, match="divisible by 3; got 4x6"):
        jax.eval_shape(lambda: models.build(config).init(jax.random.key(0), *args))


# ---- enable_kv_compress: weak-to-strong fine-tuning from a model trained without compression ------------------------


def test_enable_kv_compress_conv_avg_init():
    # A checkpoint "trained without compression": the reference with compression whose sr/norm keep Conv Avg Init,
    # minus those keys. Its conversion has no compression; enable_kv_compress must land on the reference.
    kv = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": list(KV_LAYERS)}
    torch_model = _reference_model(9, kv, skip=("attn.sr", "attn.norm"), qk_norm=True)
    plain = ref.OrigPixArtMS(
        **TINY, caption_channels=CAPTION_C, model_max_length=CAPTION_L, pe_interpolation=0.5, qk_norm=True
    )
    missing, unexpected = plain.load_state_dict(torch_model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == sorted(
        f"blocks.{i}.attn.{n}.{p}" for i in KV_LAYERS for n in ("sr", "norm") for p in ("weight", "bias")
    )
    x, t, caption, mask = _inputs(8, 12)
    want = _run_reference(torch_model, x, t, caption, mask)

    config, params = _convert(plain, num_heads=HEADS, pe_interpolation=0.5)
    assert config.kv_compress_layers == ()
    config = config.replace(attention_backend="xla")
    outs = {}
    for scan in (False, True):
        cfg, p = models.set_scan(config, params, scan)
        new_cfg, new_p = models.enable_kv_compress(cfg, p, KV_LAYERS, ratio=2)
        assert (
            new_cfg.kv_compress_layers == KV_LAYERS and new_cfg.kv_compress_op == "conv" and new_cfg.scan_blocks == scan
        )
        # the parameter tree is exactly what a freshly built compressed model expects
        abstract = nn.meta.unbox(models.abstract_params(new_cfg))
        assert jax.tree.structure(abstract) == jax.tree.structure(new_p)
        assert all(a.shape == np.shape(b) for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(new_p)))
        outs[scan] = np.asarray(_forward(new_cfg, new_p, nhwc(x), t, caption, mask))
        if not scan:
            for i in KV_LAYERS:
                c = new_p[f"blocks_{i}"]["attn"]["compress"]
                np.testing.assert_array_equal(c["sr"]["kernel"], np.full((2, 2, 1, D), 0.25, np.float32))
                np.testing.assert_array_equal(c["sr"]["bias"], 0.0)
                np.testing.assert_array_equal(c["norm"]["scale"], 1.0)
                np.testing.assert_array_equal(c["norm"]["bias"], 0.0)
            assert "compress" not in new_p["blocks_0"]["attn"] and "compress" not in new_p["blocks_3"]["attn"]
    np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-6)
    err = rel_err(outs[False], want)
    print(f"enable_kv_compress (Conv Avg Init) vs reference: max rel err {err:.1e}")
    assert err < 1e-5
    with pytest.raises(ValueError, match="already on"):
        models.enable_kv_compress(new_cfg, new_p, KV_LAYERS)
