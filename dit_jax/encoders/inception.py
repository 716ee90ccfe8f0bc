"""InceptionV3 as FID measures images with it: pytorch-fid's port of the 2015-12-05 TensorFlow graph, in Flax.

Architecture (torchvision's ``Inception3`` layer names, which pytorch-fid's weights use): a stem of five
conv-BN-ReLU layers with two 3×3 stride-2 max-pools; ``Mixed_5b/5c/5d`` (A blocks), ``Mixed_6a`` (B),
``Mixed_6b…6e`` (C, 7×7 factorised), ``Mixed_7a`` (D), ``Mixed_7b/7c`` (E); global average pooling to 2048
features and ``fc`` to 1008 logits. The FID variant differs from torchvision's ImageNet net where the TF graph
did: the 3×3 average pools inside the A, C and first E block exclude the zero padding from the mean
(``count_include_pad=False``), and the last E block pools with a 3×3 max-pool. Every conv has no bias and is
followed by BatchNorm in inference mode with eps 1e-3 (the running statistics are stored as parameters ``mean``
and ``var`` beside ``scale`` and ``bias``: this network is never trained).

Inputs are NHWC RGB in [0, 1]; as pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)`` they are
resized bilinearly to 299 × 299 (half-pixel centres, ``align_corners=False``, no antialiasing — torch's
``F.interpolate``) and mapped to [−1, 1]. ``apply`` returns ``InceptionFeatures``:

- ``pool`` (B, 2048): the average-pooled ``Mixed_7c`` output, TF's ``pool_3`` (what FID compares);
- ``spatial`` (B, 2023): the first 7 channels of ``Mixed_6d.branch1x1``'s output (TF's ``mixed_6/conv``, 17 × 17)
  flattened in (h, w, c) order, as ADM's evaluator takes them for sFID;
- ``logits`` (B, 1008): ``fc(pool)``, the torch module's logits (with its bias).

Convolutions and the final matmul run in ``config.dtype`` (float32 by default, at full precision: no TF32 on GPUs).
Weights: pytorch-fid's ``pt_inception-2015-12-05-*.pth``, read by ``dit_jax.convert.inception.load_inception``.
"""

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, register
from dit_jax.nn.layers import compute_dtype, ones, partitioned, zeros

IMAGE_SIZE = 299  # the TF graph's input size
POOL_FEATURES = 2048
SPATIAL_SHAPE = (17, 17, 7)  # mixed_6/conv: 17 × 17 positions, its first 7 channels kept
SPATIAL_FEATURES = int(np.prod(SPATIAL_SHAPE))  # 2023


@dataclasses.dataclass(frozen=True, kw_only=True)
class InceptionConfig(ExecutionConfig):
    """The FID Inception's switches. ``num_classes`` 1008 (the TF graph's softmax); ``bn_eps`` 1e-3 (the TF graph's
    and pytorch-fid's); ``resize_input``: resize any input size to 299 × 299 (else inputs must be 299 × 299);
    ``normalize_input``: map [0, 1] inputs to [−1, 1] (else inputs are taken as already in [−1, 1])."""

    family: ClassVar[str] = "inception"

    num_classes: int = 1008
    bn_eps: float = 1e-3
    resize_input: bool = True
    normalize_input: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(self.num_classes > 0, "num_classes", self.num_classes, "a positive integer")
        check(self.bn_eps > 0, "bn_eps", self.bn_eps, "positive")
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (Inception blocks are not scanned)")

    def dummy_inputs(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        size = 8 if self.resize_input else IMAGE_SIZE
        return (np.zeros((batch, size, size, 3), np.float32),)


class InceptionFeatures(NamedTuple):
    """What FID, sFID and the Inception Score read: ``pool`` (B, 2048), ``spatial`` (B, 2023), ``logits`` (B, 1008)."""

    pool: jax.Array
    spatial: jax.Array
    logits: jax.Array


# ---- input resize ----------------------------------------------------------------------------------------------


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights ``(i0, i1, w0, w1)`` of torch's bilinear resize along one axis
    (``align_corners=False``): source position ``(i + 0.5)·in/out − 0.5`` clamped at 0, computed in float32 as torch
    does for float32 images, so the weights are torch's to the bit."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src ≥ 0
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H, W, C) → (B, height, width, C): torch ``F.interpolate(mode="bilinear", align_corners=False)`` without
    antialiasing (also when shrinking), separable: along the width, then the height, as torch's CPU kernel sums."""
    b, h, w, c = x.shape
    if (h, w) == (height, width):
        return x
    i0, i1, w0, w1 = _linear_taps(w, width)
    x = x[:, :, i0] * w0[None, None, :, None] + x[:, :, i1] * w1[None, None, :, None]
    i0, i1, w0, w1 = _linear_taps(h, height)
    return x[:, i0] * w0[None, :, None, None] + x[:, i1] * w1[None, :, None, None]


# ---- layers ----------------------------------------------------------------------------------------------------


def _precision(dtype) -> jax.lax.Precision:
    """Full-precision float32 convolutions and matmuls (XLA may otherwise use TF32 on GPUs)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode over the last axis: ``(x − mean)/√(var + eps)·scale + bias``, in float32 (as
    torch's ``eval()`` BatchNorm folds it: ``x·α + β`` with ``α = scale/√(var + eps)``, ``β = bias − mean·α``)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", partitioned(ones, ("channels",)), (c,), jnp.float32)
        bias = self.param("bias", partitioned(zeros, ("channels",)), (c,), jnp.float32)
        mean = self.param("mean", partitioned(zeros, ("channels",)), (c,), jnp.float32)
        var = self.param("var", partitioned(ones, ("channels",)), (c,), jnp.float32)
        alpha = scale * jax.lax.rsqrt(var + self.eps)
        beta = bias - mean * alpha
        return (x.astype(jnp.float32) * alpha + beta).astype(x.dtype)


class BasicConv(nn.Module):
    """Conv (no bias) → FrozenBatchNorm → ReLU: torchvision's ``BasicConv2d`` (parameters ``conv``, ``bn``)."""

    features: int
    kernel: tuple[int, int]
    config: InceptionConfig
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.config.dtype)
        (ph, pw), s = self.padding, self.stride
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(s, s),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            precision=_precision(dtype),
            kernel_init=partitioned(
                nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), (None, None, None, "channels")
            ),  # fmt: skip
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(self.config.bn_eps, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3 stride-1 average over the window's in-image pixels only (torch ``count_include_pad=False``)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
    """Base of the mixed blocks: ``conv(name, features, kernel, stride, padding)`` makes a named ``BasicConv``."""

    config: InceptionConfig

    def conv(self, name: str, features: int, kernel: int | tuple[int, int], stride: int = 1, padding=0) -> BasicConv:
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (padding, padding) if isinstance(padding, int) else padding
        return BasicConv(features, kernel, self.config, stride, padding, name=name)


class InceptionA(_Block):
    """``Mixed_5b/5c/5d`` (35 × 35): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1 (``pool_features``)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """``Mixed_6a`` (35 → 17): 3×3/2 | 1×1→3×3→3×3/2 | max-pool 3×3/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(_Block):
    """``Mixed_6b…6e`` (17 × 17): 1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | avg-pool→1×1; ``c7`` inner channels.

    ``tap``: also return the ``branch1x1`` output (``Mixed_6d``'s is TF's ``mixed_6/conv``, the sFID features)."""

    c7: int = 128
    tap: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        c7, h, w = self.c7, (1, 7), (7, 1)
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, h, padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, w, padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, w, padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, h, padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, w, padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, h, padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
        return (out, b1) if self.tap else out


class InceptionD(_Block):
    """``Mixed_7a`` (17 → 8): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool 3×3/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(_Block):
    """``Mixed_7b/7c`` (8 × 8): 1×1 | 1×1→(1×3 ‖ 3×1) | 1×1→3×3→(1×3 ‖ 3×1) | pool→1×1. ``max_pool``: the pool
    branch max-pools (the FID graph's last block) instead of averaging without the padding (its first)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate(
            [self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
             self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)  # fmt: skip
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(self.conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate(
            [self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
             self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)  # fmt: skip
        pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception: ``apply({"params": p}, images)`` with NHWC RGB images in [0, 1] → ``InceptionFeatures``."""

    config: InceptionConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> InceptionFeatures:
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images of shape (B, H, W, 3), got {images.shape}")
        x = images.astype(jnp.float32)
        if cfg.resize_input:
            x = resize_bilinear(x, IMAGE_SIZE, IMAGE_SIZE)  # B 299 299 3
        elif x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"resize_input=False needs {IMAGE_SIZE}×{IMAGE_SIZE} images, got {x.shape[1:3]}")
        if cfg.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(compute_dtype(cfg.dtype))

        def conv(name, features, kernel, stride=1, padding=0):
            return BasicConv(features, (kernel, kernel), cfg, stride, (padding, padding), name=name)

        x = conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)  # B 149 149 32
        x = conv("Conv2d_2a_3x3", 32, 3)(x)  # B 147 147 32
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)  # B 147 147 64
        x = _max_pool_3x3(x, 2)  # B 73 73 64
        x = conv("Conv2d_3b_1x1", 80, 1)(x)  # B 73 73 80
        x = conv("Conv2d_4a_3x3", 192, 3)(x)  # B 71 71 192
        x = _max_pool_3x3(x, 2)  # B 35 35 192
        x = InceptionA(cfg, pool_features=32, name="Mixed_5b")(x)  # B 35 35 256
        x = InceptionA(cfg, pool_features=64, name="Mixed_5c")(x)  # B 35 35 288
        x = InceptionA(cfg, pool_features=64, name="Mixed_5d")(x)  # B 35 35 288
        x = InceptionB(cfg, name="Mixed_6a")(x)  # B 17 17 768
        x = InceptionC(cfg, c7=128, name="Mixed_6b")(x)
        x = InceptionC(cfg, c7=160, name="Mixed_6c")(x)
        x, mixed_6 = InceptionC(cfg, c7=160, tap=True, name="Mixed_6d")(x)  # mixed_6: B 17 17 192
        x = InceptionC(cfg, c7=192, name="Mixed_6e")(x)  # B 17 17 768
        x = InceptionD(cfg, name="Mixed_7a")(x)  # B 8 8 1280
        x = InceptionE(cfg, name="Mixed_7b")(x)  # B 8 8 2048
        x = InceptionE(cfg, max_pool=True, name="Mixed_7c")(x)  # B 8 8 2048
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # B 2048
        spatial = mixed_6[..., : SPATIAL_SHAPE[-1]].astype(jnp.float32).reshape(x.shape[0], -1)  # B 2023
        logits = nn.Dense(
            cfg.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("channels", "classes")),
            bias_init=partitioned(zeros, ("classes",)),
            name="fc",
        )(pool)  # B 1008
        return InceptionFeatures(pool, spatial, logits)


class InceptionFamily(Family):
    """The FID Inception as a registered family (model directories, ``build``, ``convert.from_torch``); not a
    diffusion model."""

    name = "inception"
    display_name = "Inception-v3 (FID)"
    config_class = InceptionConfig
    module_class = InceptionV3
    conversion = "dit_jax.convert.inception"


FAMILY = register(InceptionFamily())
