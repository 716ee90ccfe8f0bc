"""Weight-only int8 and int4 (``dit_jax.quantize``): exact rounding, int4 packing, the kernels chosen, quantised
forwards of every family close to the float ones, memory of a jitted quantised forward, and
``pipelines.load(quantize=...)``.

Bounds. Quantisation: ``|w − q·scale| ≤ scale / 2`` per element, checked exactly in float64. Forwards (random
weights, float32 compute): the int8 forward equals, bit for bit, the float forward on the dequantised weights (the
weights are dequantised inside the matmul, nothing else changes), and its relative error ``‖int8 − float‖₂ /
‖float‖₂`` against the float weights is ≤ 3e-2 (measured 0.2–1.1e-2 on these tiny models, whose narrow fan-ins
of 16–48 give coarse per-channel scales); the same bound for a T5 text encoder's features. Pipeline (pixel-space
tiny DiT, 8 Euler steps on flow sigmas, images in [0, 1]): max abs image error ≤ 0.03 and mean ≤ 0.005 against the
float pipeline (measured 7.3e-3 and 1.2e-3).

int4 (group size 16 here: the tiny widths of 32–192 make 2–12 groups per column, and the kernels whose last
contracted axis 16 does not divide fall back to one scale per output channel): the same bit-exactness, the same exact
half-step bound, a forward error ≤ 0.3 (measured 0.03–0.16: each weight is off by up to 1/14 of its group's
largest, against 1/254 in int8) and always above int8's; a tiny Flux-dev pipeline (int4 transformer, the default
int8 text encoders): images within 0.05 (max) and 0.01 (mean) of float32 (measured 5.1e-3 and 8.0e-4) and further
than int8's (3.7e-4 and 5.3e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import models, pipelines
from dit_jax import quantize as Q
from dit_jax.encoders.t5 import T5Config
from dit_jax.models.flux import FluxConfig
from dit_jax.models.mmdit import MMDiTConfig

TINY = Q.QuantizeConfig(min_size=0)  # every kernel of the tiny models (the default skips layers < 2^16 weights)
TINY4 = Q.QuantizeConfig(mode="int4", min_size=0, group_size=16)  # int4, groups that fit the tiny widths
FORWARD_REL = 3e-2
FORWARD_REL4 = 0.3

CONFIGS = {
    "DiT (scanned)": models.DiTConfig(
        input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=4, num_classes=10, scan_blocks=True
    ),
    "PixArt (KV compression conv)": models.PixArtConfig(
        input_size=8,
        patch_size=2,
        hidden_size=48,
        depth=2,
        num_heads=4,
        caption_channels=24,
        caption_length=6,
        micro_conditions=True,
        qk_norm=True,
        kv_compress_layers=(1,),
        kv_compress_ratio=2,
        kv_compress_op="conv",
    ),
    "SD3.5 (scanned)": MMDiTConfig(
        input_size=8,
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
        scan_blocks=True,
    ),
    "Flux": FluxConfig(
        input_size=8,
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single=1,
        context_dim=16,
        pooled_dim=12,
        axes_dims=(4, 6, 6),
    ),
    "T5": T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
}


def random_params(config, seed: int = 0) -> dict:
    """Random float32 params of ``config`` from its shapes alone (no init compile); zero-initialised layers too."""
    shapes = nn.meta.unbox(models.abstract_params(config))
    rng = np.random.default_rng(seed)

    def draw(x):
        fan_in = int(np.prod(x.shape[:-1])) if x.ndim >= 2 else 1
        return rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)) if x.ndim >= 2 else 0.1, x.shape).astype(np.float32)

    return jax.tree.map(draw, shapes)


def random_inputs(config, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for a in config.dummy_inputs(2):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) and a.ndim >= 2:
            a = rng.normal(size=a.shape).astype(a.dtype)
        elif config.family == "t5" and a.ndim == 2 and not a.any():
            a = rng.integers(0, config.vocab_size, a.shape).astype(a.dtype)  # token ids
        out.append(a)
    return out


# ---- rounding ----------------------------------------------------------------------------------------------------


def exact_error_bound(w, qk) -> None:
    """|w − q·s| ≤ s/2 in float64 (exact: q·s and the difference are exact there), q = round-half-even(w/s)."""
    w64, q, s = np.asarray(w, np.float64), np.asarray(qk.values), np.asarray(qk.scale, np.float64)
    assert q.dtype == np.int8 and np.asarray(qk.scale).dtype == np.float32
    assert q.min() >= -127 and q.max() <= 127
    assert np.all(np.abs(w64 - q * s) <= s / 2)
    safe = np.where(s > 0, s, 1.0)
    np.testing.assert_array_equal(q, np.clip(np.rint(w64 / safe), -127, 127))  # f64 quotient: rounds exactly


@pytest.mark.parametrize(
    "shape, axes", [((64, 96), (0,)), ((3, 16, 4, 8), (1,)), ((2, 2, 4, 24), (0, 1, 2)), ((4, 8, 32), (1, 2))]
)
def test_quantise_dequantise_error_is_at_most_half_a_step(shape, axes):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[-1])).astype(np.float32)
    first = tuple(slice(None) if i in axes else 0 for i in range(len(shape)))
    w[first] = 0.0  # an all-zero output channel: scale 0, q 0
    qk = Q.quantize_array(w, axes)
    assert qk.shape == shape and qk.scale.shape == tuple(1 if i in axes else n for i, n in enumerate(shape))
    exact_error_bound(w, qk)
    assert not np.asarray(qk.values)[first].any() and not np.asarray(qk.scale)[first].any()
    # scale = fl32(absmax / 127); the absmax element of every other channel maps to ±127
    absmax = np.abs(w).max(axis=axes, keepdims=True).astype(np.float64)
    np.testing.assert_array_equal(qk.scale, (absmax / 127).astype(np.float32))
    peak = np.abs(np.asarray(qk.values)).max(axis=axes).ravel()
    assert peak[0] == 0 and np.all(peak[1:] == 127)
    # a jax.Array is quantised where it lives, to the same numbers
    on_device = Q.quantize_array(jnp.asarray(w), axes)
    np.testing.assert_array_equal(np.asarray(on_device.values), qk.values)
    np.testing.assert_array_equal(np.asarray(on_device.scale), qk.scale)


def test_near_half_steps_round_as_the_exact_quotient():
    """Weights at, and one ulp either side of, (k + 1/2)·scale: a plain fp32 quotient rounds some of them to the
    wrong integer (an error of more than half a step); the quantiser decides them exactly."""
    scale = np.float32(0.0123456)
    ties = ((np.arange(-127, 127) + 0.5) * np.float64(scale)).astype(np.float32)
    w = np.concatenate([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    w = np.stack([w, np.full_like(w, 127 * scale)])  # row 1 sets the channel absmax: scale = fl32(127·s / 127)
    qk = Q.quantize_array(w, (0,))
    exact_error_bound(w, qk)
    exact_error_bound(w, Q.quantize_array(jnp.asarray(w), (0,)))  # and with XLA
    s = np.asarray(qk.scale)
    naive = np.rint(w / s)  # fp32 quotient
    assert (naive != np.asarray(qk.values)).sum() > 0  # the case exists: the exact decision matters


def test_large_host_arrays_take_the_xla_path_to_the_same_numbers():
    """Host arrays of 2^20 elements and more are quantised by XLA on the host CPU: the same numbers as NumPy's."""
    w = np.random.default_rng(3).standard_normal((2, 512, 1024)).astype(np.float32)
    qk = Q.quantize_array(w, (1,))
    assert isinstance(qk.values, np.ndarray) and w.size >= Q.NUMPY_BELOW
    scale = Q._scale(Q._absmax(w, (1,), np))
    np.testing.assert_array_equal(qk.scale, scale)
    np.testing.assert_array_equal(qk.values, Q._codes(w, scale, np))
    exact_error_bound(w, qk)


# ---- int4: packing and rounding ----------------------------------------------------------------------------------


def expanded_scale(qk: Q.Int4Kernel) -> np.ndarray:
    """An int4 kernel's scales in float64, repeated over their groups: one per weight (broadcastable)."""
    a, s = qk.axis % qk.ndim, np.asarray(qk.scale, np.float64)
    return np.repeat(s, qk.shape[a] // s.shape[a], axis=a)


def exact_error_bound4(w, qk: Q.Int4Kernel) -> None:
    """|w − q·s| ≤ s/2 in float64 (exact), q = round-half-even(w/s) in [−7, 7], packed uint8 of half the weights."""
    w64, q, s = np.asarray(w, np.float64), np.asarray(qk.codes()), expanded_scale(qk)
    assert np.asarray(qk.packed).dtype == np.uint8 and np.asarray(qk.scale).dtype == np.float32
    assert np.asarray(qk.packed).size == np.prod(qk.shape) // qk.shape[qk.axis] * -(-qk.shape[qk.axis] // 2)
    assert q.shape == w64.shape and q.min() >= -7 and q.max() <= 7
    assert np.all(np.abs(w64 - q * s) <= s / 2)
    np.testing.assert_array_equal(q, np.clip(np.rint(w64 / np.where(s > 0, s, 1.0)), -7, 7))


def test_int4_pack_unpack_round_trip():
    """Every code in [−7, 7], even and odd lengths, the packed axis anywhere: unpack(pack(q)) == q with NumPy and XLA
    (the same bytes), two codes a byte (offset binary, the even position in the low nibble)."""
    rng = np.random.default_rng(0)
    for shape, axis in [((16, 6), 0), ((3, 7, 5), 1), ((2, 4, 9), 2), ((1,), 0)]:
        q = rng.integers(-7, 8, shape).astype(np.int8)
        packed = Q._pack(q, axis, np)
        assert packed.dtype == np.uint8 and packed.shape[axis] == -(-shape[axis] // 2)
        np.testing.assert_array_equal(Q._unpack(packed, axis, shape[axis], np), q)
        # XLA (what runs inside jit): the same bytes and codes
        np.testing.assert_array_equal(np.asarray(Q._pack_jit(jnp.asarray(q), axis)), packed)
        unpack = jax.jit(Q._unpack, static_argnums=(1, 2))
        np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(packed), axis, shape[axis])), q)
    q = np.arange(-7, 8, dtype=np.int8)  # 15 codes: one zero code pads the last byte
    packed = Q._pack(q, 0, np)
    np.testing.assert_array_equal(packed & 15, (q[0::2] + 8).astype(np.uint8))
    np.testing.assert_array_equal(packed >> 4, np.append(q[1::2] + 8, 8).astype(np.uint8))


@pytest.mark.parametrize(
    "shape, axes, group, groups",
    [
        ((64, 96), (0,), 16, 4),  # Dense: 4 groups of 16 inputs per output column
        ((3, 32, 4, 8), (1,), 16, 2),  # a scanned qkv kernel (layers, in, heads, head_dim): the layer axis is kept
        ((2, 2, 5, 24), (0, 1, 2), 16, 1),  # Conv with 5 input channels: one scale per output channel over 2·2·5
        ((4, 8, 32), (0, 1), 4, 2),  # (heads, head_dim, width) out-projection: groups along head_dim, per head
        ((7, 6), (0,), 64, 1),  # an odd contracted axis: packed with one zero code appended
        ((96, 8), (0,), None, 1),  # group_size None: per output channel
    ],
)
def test_int4_error_is_at_most_half_a_step(shape, axes, group, groups):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[-1])).astype(np.float32)
    w[..., 0] = 0.0  # all-zero output column: scale 0, q 0
    qk = Q.quantize_array(w, axes, "int4", group)
    a = axes[-1]
    assert isinstance(qk, Q.Int4Kernel) and qk.shape == shape and qk.axis == a - len(shape)
    full = groups > 1 or (group is not None and shape[a] == group)  # grouped: the other contracted axes kept
    want_scale = tuple(groups if i == a else (n if i not in axes or full else 1) for i, n in enumerate(shape))
    assert qk.scale.shape == want_scale
    exact_error_bound4(w, qk)
    assert not np.asarray(qk.codes())[..., 0].any() and not np.asarray(qk.scale)[..., 0].any()
    # scale = fl32(absmax / 7) per group; the absmax element of every nonzero group maps to ±7
    wg = np.abs(w.astype(np.float64)).reshape(*shape[:a], groups, shape[a] // groups, *shape[a + 1 :])
    reduce = (a + 1,) if full else (*axes[:-1], a + 1)
    absmax = wg.max(axis=reduce, keepdims=True).squeeze(a + 1)
    np.testing.assert_array_equal(qk.scale, (absmax / 7).astype(np.float32))
    codes = np.abs(np.asarray(qk.codes())).reshape(wg.shape).max(axis=reduce).ravel()
    assert np.all(codes[np.asarray(qk.scale).ravel() > 0] == 7)
    # dequantised: fl32(q·scale); a jax.Array is quantised where it lives, to the same bytes
    dequantised = np.asarray(qk.codes()).astype(np.float32) * expanded_scale(qk).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(qk.dequantize()), dequantised)
    on_device = Q.quantize_array(jnp.asarray(w), axes, "int4", group)
    np.testing.assert_array_equal(np.asarray(on_device.packed), qk.packed)
    np.testing.assert_array_equal(np.asarray(on_device.scale), qk.scale)


def test_int4_near_half_steps_and_large_host_arrays(monkeypatch):
    """Weights at and one ulp either side of (k + 1/2)·scale round as the exact quotient; host arrays of 2^20
    elements and more (quantised by XLA on the host CPU) give the same bytes as NumPy."""
    scale = np.float32(0.0123456)
    ties = ((np.arange(-7, 7) + 0.5) * np.float64(scale)).astype(np.float32)
    w = np.stack([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)], axis=1)
    w = np.concatenate([w, np.full((1, 3), 7 * scale, np.float32)])  # (15, 3): 7·scale sets each column's absmax
    exact_error_bound4(w, Q.quantize_array(w, (0,), "int4", 15))
    exact_error_bound4(w, Q.quantize_array(jnp.asarray(w), (0,), "int4", 15))
    w = np.random.default_rng(3).standard_normal((2, 512, 1024)).astype(np.float32)
    qk = Q.quantize_array(w, (1,), "int4")
    assert isinstance(qk.packed, np.ndarray) and w.size >= Q.NUMPY_BELOW and qk.scale.shape == (2, 8, 1024)
    monkeypatch.setattr(Q, "NUMPY_BELOW", 1 << 30)
    small = Q.quantize_array(w, (1,), "int4")  # NumPy
    np.testing.assert_array_equal(qk.packed, small.packed)
    np.testing.assert_array_equal(qk.scale, small.scale)
    exact_error_bound4(w, qk)


# ---- which kernels -----------------------------------------------------------------------------------------------


def test_default_rules_and_scale_layouts():
    """Kernels of at least 2^16 weights per layer; embeddings, norms, biases and small kernels (the patch embedding,
    the output projection) stay float; a scanned stack keeps its layer axis in the scale; output channels follow
    the bias (a (heads, head_dim, width) out-projection gets one scale per output column)."""
    config = models.DiTConfig(input_size=8, patch_size=2, hidden_size=256, depth=2, num_heads=4, num_classes=10,
                              scan_blocks=True)  # fmt: skip
    shapes = nn.meta.unbox(models.abstract_params(config))
    qp = Q.quantize_params(shapes)  # shapes only: what a memory plan needs
    blocks = [f"stage_0/{k}" for k in ("adaLN_modulation/linear", "attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")]
    kernels = blocks + ["final_layer/adaLN_modulation/linear", "t_embedder/linear_1", "t_embedder/linear_2"]
    assert Q.quantized_paths(qp) == sorted(f"{k}/kernel" for k in kernels)
    assert Q.select(shapes) == sorted(f"{k}/kernel" for k in kernels)
    assert Q.quantize_params(qp) is qp  # quantised already
    assert isinstance(qp["x_embedder"]["proj"]["kernel"], jax.ShapeDtypeStruct)  # 2·2·4·256 < 2^16
    assert isinstance(qp["y_embedder"]["embedding"], jax.ShapeDtypeStruct)
    qkv, proj = qp["stage_0"]["attn"]["qkv"]["kernel"], qp["stage_0"]["attn"]["proj"]["kernel"]
    assert qkv.values.shape == (2, 256, 3, 4, 64) and qkv.values.dtype == jnp.int8
    assert qkv.scale.shape == (2, 1, 3, 4, 64) and qkv.scale.dtype == jnp.float32
    assert proj.scale.shape == (2, 1, 1, 256)  # (layers, heads, head_dim, width): per output column
    # a bias-free kernel reduces over its first axis only (T5's (heads, kv, embed) out-projection: finer)
    assert Q.contracted_axes("blocks_0/attention/o/kernel", (4, 8, 32), None) == (0,)
    assert Q.contracted_axes("stage_1/ff/wi/kernel", (3, 32, 48), None) == (1,)
    assert Q.contracted_axes("x_embedder/proj/kernel", (2, 2, 4, 256), (256,)) == (0, 1, 2)
    # rules: targets narrow, exclude removes, min_size lowers the bar
    only_mlp = Q.quantize_params(shapes, Q.QuantizeConfig(targets=(r"/mlp/",)))
    assert Q.quantized_paths(only_mlp) == ["stage_0/mlp/fc1/kernel", "stage_0/mlp/fc2/kernel"]
    no_mod = Q.select(shapes, Q.QuantizeConfig(exclude=("adaLN", "t_embedder")))
    assert no_mod == ["stage_0/attn/proj/kernel", "stage_0/attn/qkv/kernel", "stage_0/mlp/fc1/kernel",
                      "stage_0/mlp/fc2/kernel"]  # fmt: skip
    assert len(Q.select(shapes, TINY)) == len(kernels) + 2  # + patch embedding and output projection
    # bytes: int8 values + fp32 scales; what stays float is counted as it is
    assert Q.nbytes(qp) < Q.nbytes(shapes) / 3.5


def test_errors_name_the_problem():
    shapes = nn.meta.unbox(models.abstract_params(CONFIGS["DiT (scanned)"]))
    with pytest.raises(ValueError, match="no kernel to quantise.*min_size=65536"):
        Q.quantize_params(shapes)  # every kernel of the tiny model is below the default size
    with pytest.raises(ValueError, match=r"target 'attn/qkvx' matches no kernel"):
        Q.quantize_params(shapes, Q.QuantizeConfig(min_size=0, targets=("attn/qkvx",)))
    with pytest.raises(ValueError, match="not a regular expression"):
        Q.QuantizeConfig(exclude=("(",))
    with pytest.raises(ValueError, match="min_size=-1"):
        Q.QuantizeConfig(min_size=-1)
    for bad in ("int2", "fp8", True, 8):
        with pytest.raises(ValueError, match=r"quantize=.* is invalid: expected None .*'int8', 'int4'"):
            Q.quantize_config(bad)
    with pytest.raises(ValueError, match="mode='int2'"):
        Q.QuantizeConfig(mode="int2")
    for bad in (1, 0, -64, True, 1.5, "64"):
        with pytest.raises(ValueError, match=r"group_size=.* is invalid: expected an integer ≥ 2 .* or None"):
            Q.QuantizeConfig(mode="int4", group_size=bad)
    params = random_params(CONFIGS["T5"])
    params["blocks_1"]["attention"]["q"]["kernel"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="blocks_1/attention/q/kernel has non-finite weights"):
        Q.quantize_params(params, TINY)
    with pytest.raises(TypeError, match="params tree"):
        Q.quantize_params([np.zeros((4, 4))], TINY)


# ---- forwards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_forward_is_the_float_forward_on_dequantised_weights(name):
    """The unchanged module on the int8 and the int4 tree: bit-exact against the float forward on the dequantised
    weights, within ``FORWARD_REL`` (int8) and ``FORWARD_REL4`` (int4, and further than int8) of the float forward;
    the params are int8 / packed int4 (dtype and bytes)."""
    config = CONFIGS[name]
    params = random_params(config)
    n_kernels = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel")
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    module, args = models.build(config), random_inputs(config)
    forward = jax.jit(lambda p, *a: jax.tree.leaves(module.apply({"params": p}, *a))[0])
    want = np.asarray(forward(params, *args), np.float64)
    rel = {}
    for mode, qconfig, node, bound, saved in [("int8", TINY, Q.Int8Kernel, FORWARD_REL, 2.5),
                                              ("int4", TINY4, Q.Int4Kernel, FORWARD_REL4, 3.0)]:  # fmt: skip
        qp = Q.quantize_params(params, qconfig)
        kernels = [k for k in jax.tree.leaves(qp, is_leaf=Q._is_kernel) if Q._is_kernel(k)]
        assert len(kernels) == len(Q.quantized_paths(qp)) == n_kernels  # min_size=0: every Dense and Conv kernel
        assert all(isinstance(k, node) for k in kernels)
        for k in kernels:
            codes = k.values if mode == "int8" else k.packed
            assert codes.dtype == (np.int8 if mode == "int8" else np.uint8)
            assert k.nbytes == (k.size if mode == "int8" else codes.size) + 4 * np.asarray(k.scale).size
        kernel_elems = sum(k.size for k in kernels)
        assert Q.nbytes(qp) < float_bytes - saved * kernel_elems  # ≥ 2.5 (int8) or 3 (int4) of 4 bytes saved

        got = np.asarray(forward(qp, *args), np.float64)
        on_dequantised = np.asarray(forward(Q.dequantize_params(qp), *args), np.float64)
        np.testing.assert_array_equal(got, on_dequantised)
        rel[mode] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        print(f"{name}: {len(kernels)} {mode} kernels, relative error {rel[mode]:.2e}")
        assert 0 < rel[mode] <= bound
    assert rel["int4"] > rel["int8"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_scanned_quantized_forward_dequantises_one_layer_at_a_time(mode):
    """``memory_analysis`` of the jitted int8/int4 forward of a scanned stack: the arguments are the quantised
    bytes, the temporaries stay far below the float weights (one layer's dequantised weights, not the stack's)."""
    config = models.DiTConfig(input_size=4, patch_size=2, hidden_size=256, depth=8, num_heads=4, num_classes=10,
                              scan_blocks=True)  # fmt: skip
    shapes = nn.meta.unbox(models.abstract_params(config))
    qp = Q.quantize_params(shapes, mode)
    module = models.build(config)
    forward = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))
    memory = forward.lower(qp, *config.dummy_inputs(1)).compile().memory_analysis()
    float_bytes, q_bytes = Q.nbytes(shapes), Q.nbytes(qp)
    layer = Q.nbytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), shapes["stage_0"]))
    print(f"scanned DiT {mode} forward: float params {float_bytes / 1e6:.1f} MB, {mode} {q_bytes / 1e6:.1f} MB, "
          f"arguments {memory.argument_size_in_bytes / 1e6:.1f} MB, temporaries {memory.temp_size_in_bytes / 1e6:.1f}"
          f" MB (one layer's float weights {layer / 1e6:.1f} MB)")  # fmt: skip
    assert q_bytes < float_bytes / (3.5 if mode == "int8" else 5)
    assert memory.argument_size_in_bytes < q_bytes + 1e5
    assert memory.temp_size_in_bytes < float_bytes / 4  # measured: about one layer's float weights


def test_int4_scanned_and_unscanned_layouts_agree():
    """Quantising then stacking the layers (``set_scan``) gives the very bytes of quantising the stacked layers (the
    packed axis is never the layer axis), and the scanned int4 forward equals the unscanned one."""
    config = CONFIGS["DiT (scanned)"]
    params = random_params(config)
    flat_config, flat = models.set_scan(config, params, False)
    q_scanned, q_flat = Q.quantize_params(params, TINY4), Q.quantize_params(flat, TINY4)
    restacked = models.set_scan(flat_config, q_flat, True)[1]
    assert jax.tree.structure(restacked) == jax.tree.structure(q_scanned)  # Int4Kernel axis/length included
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(q_scanned), strict=True):
        np.testing.assert_array_equal(a, b)
    qkv = q_scanned["stage_0"]["attn"]["qkv"]["kernel"]  # (layers, in, …): packed on the input axis
    assert qkv.shape == (2, 48, 3, 4, 12) and qkv.packed.shape == (2, 24, 3, 4, 12) and qkv.scale.shape[:2] == (2, 3)
    args = random_inputs(config)
    scanned = jax.jit(lambda p, *a: models.build(config).apply({"params": p}, *a))(q_scanned, *args)
    looped = jax.jit(lambda p, *a: models.build(flat_config).apply({"params": p}, *a))(q_flat, *args)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), rtol=1e-5, atol=1e-5)


# ---- pipelines ---------------------------------------------------------------------------------------------------


def test_pipeline_load_quantize_int8(tmp_path):
    """``load(model_dir, quantize=...)`` of a pixel-space DiT (8 Euler steps on flow sigmas): int8 transformer,
    images within 0.03 (max) and 0.005 (mean) of the float pipeline's; other values are one error before anything
    loads."""
    from dit_jax.checkpoint import save_model

    config = models.DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=4,
                              num_classes=10)  # fmt: skip
    params = random_params(config)
    params["final_layer"]["linear"]["kernel"] *= 0.25  # velocities of about unit size: images mostly inside [0, 1]
    save_model(tmp_path / "dit", config, params)
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}  # random weights: bounded velocities
    float_pipe = pipelines.load(tmp_path / "dit", scheduler=flow)
    int8_pipe = pipelines.load(tmp_path / "dit", scheduler=flow, quantize=TINY)
    n_kernels = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(float_pipe.params) if p[-1].key == "kernel")
    assert len(Q.quantized_paths(int8_pipe.params)) == n_kernels
    kw = dict(num_inference_steps=8, guidance_scale=4.0, seed=0)
    want, got = float_pipe([1, 2, 3], **kw), int8_pipe([1, 2, 3], **kw)  # images in [0, 1]
    err = np.abs(got - want)
    print(f"DiT pixel-space pipeline, int8 vs float32: image max abs {err.max():.2e}, mean abs {err.mean():.2e}")
    assert 0 < err.max() <= 0.03 and err.mean() <= 0.005
    assert ((want > 0) & (want < 1)).mean() > 0.5  # clipping hides no difference
    for bad in ("int2", True):
        with pytest.raises(ValueError, match=r"quantize=.* is invalid"):
            pipelines.load(tmp_path / "nowhere", quantize=bad)  # the value fails before the path


def save_tiny_flux(root) -> tuple:
    """A tiny random Flux-dev: a model directory, CLIP and T5 text-encoder model directories with their tokenizers
    beside them, and a 16-channel VAE ``(config, params)`` whose output layer keeps images mostly inside [0, 1]."""
    from test_pipelines_mmdit import clip_tokenizer
    from test_t5 import tiny_tokenizer

    from dit_jax.checkpoint import save_model
    from dit_jax.encoders import VAEConfig
    from dit_jax.encoders.clip import CLIPTextConfig

    flux = FluxConfig(input_size=8, in_channels=16, out_channels=16, hidden_size=64, num_heads=2, depth=1,
                      depth_single=1, context_dim=32, pooled_dim=16, axes_dims=(8, 12, 12))  # fmt: skip
    clip = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, projection_dim=None)  # fmt: skip
    for seed, (name, config, tokenizer) in enumerate(
        [("transformer", flux, None), ("clip", clip, clip_tokenizer()), ("t5", CONFIGS["T5"], tiny_tokenizer())]
    ):
        save_model(root / name, config, random_params(config, seed))
        if tokenizer is not None:
            tokenizer.save_pretrained(root / name)
    vae = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                    shift_factor=0.1159)  # fmt: skip
    vae_params = random_params(vae, 3)
    vae_params["decoder"]["conv_out"]["kernel"] *= 0.4
    return root / "transformer", {"clip": root / "clip", "t5": root / "t5"}, (vae, vae_params)


def test_flux_pipeline_load_quantize_int4(tmp_path):
    """``load(flux_dir, quantize=int4 config)``: int4 transformer kernels, int8 text encoders (int4's default for
    them); images (4 Euler steps, 32×48) within 0.05 (max) and 0.01 (mean) of the float pipeline's and further from
    them than int8's (the VAE stays float: one decoder decodes the three pipelines' latents)."""
    model, encoders, vae = save_tiny_flux(tmp_path)
    pipes = {
        "float": pipelines.load(model, vae=vae, text_encoders=encoders),
        "int4": pipelines.load(model, vae=vae, text_encoders=encoders, quantize=TINY4),
    }
    int4 = pipes["int4"]
    kernels = [k for k in jax.tree.leaves(int4.params, is_leaf=Q._is_kernel) if Q._is_kernel(k)]
    assert kernels and all(isinstance(k, Q.Int4Kernel) for k in kernels)
    for enc in int4.encoders.values():  # the text encoders: int8, what quantize=TINY gives them too (shared below)
        assert {type(k) for k in jax.tree.leaves(enc.params, is_leaf=Q._is_kernel) if Q._is_kernel(k)} == {Q.Int8Kernel}
    assert Q.text_encoder_config(TINY4) == Q.QuantizeConfig(min_size=0, group_size=16)  # int8 ignores group_size
    assert Q.text_encoder_config("int4") == Q.QuantizeConfig() and Q.text_encoder_config(TINY) is TINY
    pipes["int8"] = pipelines.load(model, vae=vae, text_encoders=int4.encoders, quantize=TINY)
    kw = dict(num_inference_steps=4, height=32, width=48, seed=0, max_sequence_length=16)
    latents = {
        k: p(["a cat on the red sofa", "a photo of a dog"], output_type="latent", **kw) for k, p in pipes.items()
    }
    images = {k: pipes["float"].decode(z) for k, z in latents.items()}
    want = images["float"]
    assert ((want > 0) & (want < 1)).mean() > 0.5  # clipping hides no difference
    err = {k: np.abs(images[k] - want) for k in ("int8", "int4")}
    for k, e in err.items():
        print(f"tiny Flux-dev pipeline, {k} vs float32: image max abs {e.max():.2e}, mean abs {e.mean():.2e}")
    assert 0 < err["int4"].max() <= 0.05 and err["int4"].mean() <= 0.01
    assert err["int4"].mean() > err["int8"].mean()


def test_text_encoder_quantize_int8_and_int4(tmp_path):
    """``load_text_encoder(folder, quantize=...)``: int8 and int4 T5 kernels sharded over the 8 devices (int8 scales
    unsharded on the contracted axis; int4 packed codes sharded on the halved embed axis, its 2 groups unsharded:
    8 devices do not divide them), features within ``FORWARD_REL`` (int8) and ``FORWARD_REL4`` (int4, further)
    relative of the float encoder's. The folder's kernels are quantised as they are read (``t5_from_torch(...,
    quantize=)``), bit for bit what ``quantize_params`` makes of the float import."""
    from test_t5 import save_tiny_t5

    from dit_jax.convert.t5 import t5_from_torch

    save_tiny_t5(tmp_path, pipeline=False, seed=2)
    _, float_params = t5_from_torch(tmp_path)
    for quantize in (TINY, TINY4):
        as_read = t5_from_torch(tmp_path, quantize=quantize)[1]
        assert Q.quantized_paths(as_read) == Q.quantized_paths(Q.quantize_params(float_params, quantize)) != []
        jax.tree.map(np.testing.assert_array_equal, as_read, Q.quantize_params(float_params, quantize))
    float_enc = pipelines.load_text_encoder(tmp_path, max_length=16)
    int8_enc = pipelines.load_text_encoder(tmp_path, max_length=16, quantize=TINY)
    int4_enc = pipelines.load_text_encoder(tmp_path, max_length=16, quantize=TINY4)
    q = int8_enc.params["blocks_0"]["attention"]["q"]["kernel"]
    assert isinstance(q, Q.Int8Kernel) and q.values.dtype == jnp.int8 and q.values.shape == (32, 4, 8)
    assert q.values.sharding.spec[0] is not None and q.scale.sharding.spec[0] is None  # embed over fsdp
    assert isinstance(int8_enc.params["shared"], jax.Array)  # the embedding table stays float
    q4 = int4_enc.params["blocks_0"]["attention"]["q"]["kernel"]
    assert isinstance(q4, Q.Int4Kernel) and q4.shape == (32, 4, 8) and q4.axis == -3
    assert q4.packed.dtype == jnp.uint8 and q4.packed.shape == (16, 4, 8) and q4.scale.shape == (2, 4, 8)
    assert q4.packed.sharding.spec[0] == "fsdp" and q4.packed.sharding.shard_shape(q4.packed.shape)[0] == 2
    assert q4.scale.sharding.spec[0] is None
    captions = ["a cat on the red sofa", "a photo of a dog"]
    want, mask = float_enc(captions)
    rel = {}
    for mode, enc, bound in [("int8", int8_enc, FORWARD_REL), ("int4", int4_enc, FORWARD_REL4)]:
        got, got_mask = enc(captions)
        np.testing.assert_array_equal(mask, got_mask)
        rel[mode] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        print(f"tiny T5 text encoder, {mode} vs float32: relative error {rel[mode]:.2e}")
        assert 0 < rel[mode] <= bound
    assert rel["int4"] > rel["int8"]


def test_int4_shardings_leave_out_mesh_axes_that_do_not_divide():
    """``quantized_shardings`` of int4 kernels: the packed axis keeps the kernel's mesh axis while the mesh divides
    its halved size, the group axis while it divides the group count; size-1 scale axes are never sharded."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    tree = {"a": np.zeros((256, 16), np.float32), "b": np.zeros((8, 16), np.float32),
            "c": np.zeros((2, 2, 6, 16), np.float32)}  # fmt: skip
    qp = {k: Q.quantize_array(w, (0,) if w.ndim == 2 else (0, 1, 2), "int4", 16) for k, w in tree.items()}
    specs = {"a": P("fsdp", "tensor"), "b": P("fsdp", "tensor"), "c": P(None, None, "fsdp", "tensor")}
    out = Q.quantized_shardings(qp, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    a, b, c = out["a"], out["b"], out["c"]
    assert isinstance(a, Q.Int4Kernel) and (a.axis, a.length) == (qp["a"].axis, 256)
    assert a.packed.spec == P("fsdp", "tensor") and a.scale.spec == P("fsdp", "tensor")  # 128 and 16 rows: divided
    assert b.packed.spec == P("fsdp", "tensor") and b.scale.spec == P(None, "tensor")  # 4 rows; 1 group
    assert c.packed.spec == P(None, None, None, "tensor") and c.scale.spec == P(None, None, None, "tensor")  # 3; 1
    placed = jax.device_put(qp, out)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(placed[k].packed), qp[k].packed)
    assert Q.quantized_shardings(qp, {k: P(*s) for k, s in specs.items()})["b"].scale == P(None, "tensor")


def test_sample_cli_passes_quantize(monkeypatch, tmp_path):
    """``python -m dit_jax.sample --quantize int8`` (or ``int4``) hands ``quantize="int8"`` (``"int4"``) to
    ``pipelines.load``; other values are a usage error."""
    from dit_jax import sample

    seen = {}

    def fake_load(source, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(pipelines, "load", fake_load)
    argv = ["--pipeline", str(tmp_path), "--classes", "1", "--out", str(tmp_path / "x.png")]
    assert sample.main(argv + ["--quantize", "int8"]) == 1 and seen["quantize"] == "int8"
    assert sample.main(argv + ["--quantize", "int4"]) == 1 and seen["quantize"] == "int4"
    seen.clear()
    assert sample.main(argv) == 1 and "quantize" not in seen
    with pytest.raises(SystemExit):
        sample._parser().parse_args(argv + ["--quantize", "int2"])


def save_bf16_flux_folder(folder, config, params) -> None:
    """A diffusers transformer folder of ``params`` in bf16 (as FLUX.1 and SD3.5 ship): config.json + weights."""
    import json

    import torch
    from safetensors.torch import save_file

    from dit_jax import convert

    folder.mkdir()
    state_dict = convert.to_torch(config, params, format="diffusers")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in state_dict.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(convert.diffusers_config(config)))


def traced_peak(fn):
    """``fn()`` and the peak of the NumPy/Python memory it allocated (tracemalloc; memory-mapped file pages and XLA's
    own buffers are not counted)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("quantize", [TINY, TINY4], ids=["int8", "int4"])
def test_checkpoints_are_quantised_as_they_are_read(tmp_path, quantize):
    """``from_torch(..., quantize=)`` of a bf16 safetensors folder equals ``quantize_params`` of the float import bit
    for bit, looped and scanned, and never holds the float32 model: the file is memory-mapped and each kernel is
    converted and quantised on its own, so the import's peak stays below half the float32 params (measured: int8
    0.40×, int4 0.34×; here each kernel's own rounding temporaries are a larger share than in a full-size model),
    where the float import's peak is at least the float32 params themselves."""
    from dit_jax.convert import from_torch

    config = FluxConfig(input_size=8, in_channels=16, out_channels=16, hidden_size=128, num_heads=2, depth=2,
                        depth_single=40, context_dim=64, pooled_dim=32, axes_dims=(8, 28, 28))  # fmt: skip
    save_bf16_flux_folder(tmp_path / "transformer", config, random_params(config))
    (_, want), float_peak = traced_peak(lambda: from_torch(tmp_path / "transformer"))
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(want))
    (_, got), peak = traced_peak(lambda: from_torch(tmp_path / "transformer", quantize=quantize))
    print(f"{quantize.mode}: float32 params {float_bytes / 2**20:.1f} MiB; import peak {peak / 2**20:.1f} MiB "
          f"({peak / float_bytes:.2f}×), float import peak {float_peak / 2**20:.1f} MiB")  # fmt: skip
    assert float_peak >= float_bytes
    assert peak < 0.5 * float_bytes
    reference = Q.quantize_params(want, quantize)
    assert Q.quantized_paths(got) == Q.quantized_paths(reference) != []
    jax.tree.map(np.testing.assert_array_equal, got, reference)
    _, scanned = from_torch(tmp_path / "transformer", quantize=quantize, scan_blocks=True)
    _, want_scanned = models.set_scan(config, want, True)
    jax.tree.map(np.testing.assert_array_equal, scanned, Q.quantize_params(want_scanned, quantize))
    with pytest.raises(ValueError, match="matches no kernel"):
        from_torch(tmp_path / "transformer", quantize=Q.QuantizeConfig(targets=("no_such_layer",)))
