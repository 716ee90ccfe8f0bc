"""Weight-only int8 (``dit_jax.quantize``): exact rounding, the kernels chosen, int8 forwards of every family close to
the float ones, memory of a jitted int8 forward, and ``pipelines.load(quantize=...)``.

Bounds. Quantisation: ``|w − q·scale| ≤ scale / 2`` per element, checked exactly in float64. Forwards (random
weights, float32 compute): the int8 forward equals, bit for bit, the float forward on the dequantised weights (the
weights are dequantised inside the matmul, nothing else changes), and its relative error ``‖int8 − float‖₂ /
‖float‖₂`` against the float weights is ≤ 3e-2 (measured 0.2–1.1e-2 on these tiny models, whose narrow fan-ins
of 16–48 give coarse per-channel scales); the same bound for a T5 text encoder's features. Pipeline (pixel-space
tiny DiT, 8 Euler steps on flow sigmas, images in [0, 1]): max abs image error ≤ 0.03 and mean ≤ 0.005 against the
float pipeline (measured 7.3e-3 and 1.2e-3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dit_jax import models, pipelines
from dit_jax import quantize as Q
from dit_jax.encoders.t5 import T5Config
from dit_jax.models.flux import FluxConfig
from dit_jax.models.mmdit import MMDiTConfig

TINY = Q.QuantizeConfig(min_size=0)  # every kernel of the tiny models (the default skips layers < 2^16 weights)
FORWARD_REL = 3e-2

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
    for bad in ("int4", "fp8", True, 8):
        with pytest.raises(ValueError, match=r"quantize=.* is invalid: expected None .*'int8'"):
            Q.quantize_config(bad)
    with pytest.raises(ValueError, match="mode='int4'"):
        Q.QuantizeConfig(mode="int4")
    params = random_params(CONFIGS["T5"])
    params["blocks_1"]["attention"]["q"]["kernel"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="blocks_1/attention/q/kernel has non-finite weights"):
        Q.quantize_params(params, TINY)
    with pytest.raises(TypeError, match="params tree"):
        Q.quantize_params([np.zeros((4, 4))], TINY)


# ---- forwards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_forward_is_the_float_forward_on_dequantised_weights(name):
    """The unchanged module on the quantised tree: bit-exact against the float forward on the dequantised weights,
    within ``FORWARD_REL`` of the float forward; the params are int8 (dtype and bytes)."""
    config = CONFIGS[name]
    params = random_params(config)
    qp = Q.quantize_params(params, TINY)
    kernels = Q.quantized_paths(qp)
    n_kernels = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel")
    assert len(kernels) == n_kernels  # min_size=0: every Dense and Conv kernel
    for leaf in jax.tree.leaves(qp, is_leaf=lambda x: isinstance(x, Q.Int8Kernel)):
        if isinstance(leaf, Q.Int8Kernel):
            assert leaf.values.dtype == np.int8 and leaf.nbytes == leaf.size + 4 * np.asarray(leaf.scale).size
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kernel_elems = sum(k.size for k in jax.tree.leaves(qp, is_leaf=lambda x: isinstance(x, Q.Int8Kernel))
                       if isinstance(k, Q.Int8Kernel))  # fmt: skip
    assert Q.nbytes(qp) < float_bytes - 2.5 * kernel_elems  # ≥ 2.5 of 4 bytes saved per kernel weight

    module, args = models.build(config), random_inputs(config)
    forward = jax.jit(lambda p, *a: jax.tree.leaves(module.apply({"params": p}, *a))[0])
    got = np.asarray(forward(qp, *args), np.float64)
    on_dequantised = np.asarray(forward(Q.dequantize_params(qp), *args), np.float64)
    want = np.asarray(forward(params, *args), np.float64)
    np.testing.assert_array_equal(got, on_dequantised)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{name}: {len(kernels)} int8 kernels, relative error {rel:.2e}")
    assert 0 < rel <= FORWARD_REL


def test_scanned_int8_forward_dequantises_one_layer_at_a_time():
    """``memory_analysis`` of the jitted int8 forward of a scanned stack: the arguments are the int8 bytes, the
    temporaries stay far below the float weights (one layer's dequantised weights, not the stack's)."""
    config = models.DiTConfig(input_size=4, patch_size=2, hidden_size=256, depth=8, num_heads=4, num_classes=10,
                              scan_blocks=True)  # fmt: skip
    shapes = nn.meta.unbox(models.abstract_params(config))
    qp = Q.quantize_params(shapes)
    module = models.build(config)
    forward = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))
    memory = forward.lower(qp, *config.dummy_inputs(1)).compile().memory_analysis()
    float_bytes, int8_bytes = Q.nbytes(shapes), Q.nbytes(qp)
    layer = Q.nbytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), shapes["stage_0"]))
    print(f"scanned DiT int8 forward: float params {float_bytes / 1e6:.1f} MB, int8 {int8_bytes / 1e6:.1f} MB, "
          f"arguments {memory.argument_size_in_bytes / 1e6:.1f} MB, temporaries {memory.temp_size_in_bytes / 1e6:.1f}"
          f" MB (one layer's float weights {layer / 1e6:.1f} MB)")  # fmt: skip
    assert memory.argument_size_in_bytes < int8_bytes + 1e5
    assert memory.temp_size_in_bytes < float_bytes / 4  # measured: about one layer's float weights


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
    for bad in ("int4", True):
        with pytest.raises(ValueError, match=r"quantize=.* is invalid"):
            pipelines.load(tmp_path / "nowhere", quantize=bad)  # the value fails before the path


def test_text_encoder_quantize_int8(tmp_path):
    """``load_text_encoder(folder, quantize=...)``: int8 T5 kernels sharded over the 8 devices (scales unsharded on
    the contracted axis), features within 3e-2 (relative) of the float encoder's."""
    from test_t5 import save_tiny_t5

    save_tiny_t5(tmp_path, pipeline=False, seed=2)
    float_enc = pipelines.load_text_encoder(tmp_path, max_length=16)
    int8_enc = pipelines.load_text_encoder(tmp_path, max_length=16, quantize=TINY)
    q = int8_enc.params["blocks_0"]["attention"]["q"]["kernel"]
    assert isinstance(q, Q.Int8Kernel) and q.values.dtype == jnp.int8 and q.values.shape == (32, 4, 8)
    assert q.values.sharding.spec[0] is not None and q.scale.sharding.spec[0] is None  # embed over fsdp
    assert isinstance(int8_enc.params["shared"], jax.Array)  # the embedding table stays float
    captions = ["a cat on the red sofa", "a photo of a dog"]
    want, mask = float_enc(captions)
    got, got_mask = int8_enc(captions)
    np.testing.assert_array_equal(mask, got_mask)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"tiny T5 text encoder, int8 vs float32: relative error {rel:.2e}")
    assert 0 < rel <= FORWARD_REL


def test_sample_cli_passes_quantize(monkeypatch, tmp_path):
    """``python -m dit_jax.sample --quantize int8`` hands ``quantize="int8"`` to ``pipelines.load``; other values
    are a usage error."""
    from dit_jax import sample

    seen = {}

    def fake_load(source, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(pipelines, "load", fake_load)
    argv = ["--pipeline", str(tmp_path), "--classes", "1", "--out", str(tmp_path / "x.png")]
    assert sample.main(argv + ["--quantize", "int8"]) == 1 and seen["quantize"] == "int8"
    seen.clear()
    assert sample.main(argv) == 1 and "quantize" not in seen
    with pytest.raises(SystemExit):
        sample._parser().parse_args(argv + ["--quantize", "int4"])
