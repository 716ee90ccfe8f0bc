"""The Wan 2.1 causal 3-D VAE (diffusers ``AutoencoderKLWan``) in Flax, with chunked/cached time and spatial tiling.

Videos are channels-last ``(B, F, H, W, C)`` in [−1, 1]. Every temporal convolution is causal: a kernel of 3 frames
sees the current frame and the two before it, zeros before the first frame. Everything else (the channel RMS norms,
the per-frame single-head attention, the 2-D resampling convs) acts on one frame at a time, so a video can be
processed in chunks of frames as long as each causal conv remembers the last frames of its input stream. That memory
is the ``"cache"`` variable collection: one ``frames`` array per causal conv (the last 2 input frames, or the last
1 for the stride-2 temporal downsampler), zeros before the first chunk. ``encode``/``decode`` thread it from chunk to
chunk (a Python loop over one compiled step when called eagerly, a ``lax.scan`` under ``jax.jit``), so a long
video holds one chunk of activations plus the caches, and the result equals diffusers' chunked computation (first
frame alone, then 4 frames per chunk to encode; one latent frame at a time to decode). ``decode_tiled`` also
splits each frame into overlapping spatial tiles, as diffusers' ``enable_tiling``.

The first chunk is special, as in diffusers: the temporal downsampler passes the first frame through (and caches
it), the temporal upsampler leaves the first latent frame undoubled (its cache stays zeros). So ``1 + 4k`` frames
encode to ``1 + k`` latent frames and decode back to ``1 + 4k`` (for the Wan 2.1 layout, temporal factor 4).

Parameter paths mirror diffusers names (``encoder/down_blocks_3/conv1``, ``decoder/up_blocks_1/upsampler/time_conv``);
``dit_jax.convert.wan_vae`` maps them to diffusers and original Wan (``Wan2.1_VAE.pth``) keys.
"""

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, register
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.layers import compute_dtype, dense, ones, partitioned, zeros
from dit_jax.parallel.rules import constrain

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this range
_ACT = ("act_batch", None, None, None, None)  # B F H W C activations: only the batch is sharded
ENCODE_CHUNK = 4  # video frames per encode step after the first frame (diffusers' choice)

# diffusers' AutoencoderKLWan defaults: the per-channel statistics of Wan 2.1 latents
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanVAEConfig(ExecutionConfig):
    """Every architecture and numerics switch of an ``AutoencoderKLWan`` (defaults: the Wan 2.1 VAE).

    ``temporal_downsample`` is diffusers' ``temperal_downsample`` (one flag per downsampling level; the decoder
    upsamples in time where the encoder downsampled, reversed). ``attn_scales``: spatial scales (1, 1/2, …) whose
    encoder levels add a self-attention block after each residual block (diffusers adds none to the decoder).
    ``latents_mean``/``latents_std`` (``z_dim`` values) normalise latents for the diffusion model (``scale_latents``).
    ``norm_eps`` is the ``F.normalize`` clamp of the RMS norms. Only inference: ``dropout`` must be 0.
    """

    family: ClassVar[str] = "wan_vae"

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    norm_eps: float = 1e-12

    def __post_init__(self):
        super().__post_init__()
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        dec = self.decoder_base_dim
        check(dec is None or dec > 0, "decoder_base_dim", dec, "None or positive")
        mult = self.dim_mult
        check(len(mult) > 0 and all(m > 0 for m in mult), "dim_mult", mult, "at least one positive multiplier")
        n = len(mult) - 1
        levels = f"{n} flags (one per downsampling level of dim_mult={mult})"
        check(len(self.temporal_downsample) == n, "temporal_downsample", self.temporal_downsample, levels)
        check(self.dropout == 0.0, "dropout", self.dropout, "0.0 (this port is for inference)")
        check(self.norm_eps > 0, "norm_eps", self.norm_eps, "positive")
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (VAE blocks are not scanned)")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            check(len(v) == self.z_dim, name, v, f"z_dim={self.z_dim} values")
        check(all(s > 0 for s in self.latents_std), "latents_std", self.latents_std, "positive values")

    @property
    def spatial_factor(self) -> int:
        """Video pixels per latent pixel along H and W (8 for Wan 2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan 2.1)."""
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a video of ``frames`` frames (``1 + (frames − 1) / temporal_factor``)."""
        return 1 + (frames - 1) // self.temporal_factor

    def dummy_inputs(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        s = 2 * self.spatial_factor
        return (np.zeros((batch, 1, s, s, self.in_channels), np.float32),)


PRESETS: dict[str, WanVAEConfig] = {"Wan2.1-VAE": WanVAEConfig()}


def wan_vae_preset(name: str = "Wan2.1-VAE", **overrides) -> WanVAEConfig:
    """The named Wan VAE preset (``Wan2.1-VAE``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Wan VAE preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ---- latent scaling -------------------------------------------------------------------------------------------


def scale_latents(config: WanVAEConfig, z: jax.Array) -> jax.Array:
    """Posterior mean/sample (…, z_dim) → diffusion latents ``(z − μ_c) / σ_c`` (WanPipeline's normalisation)."""
    mean = jnp.asarray(config.latents_mean, z.dtype)
    return (z - mean) * (1.0 / jnp.asarray(config.latents_std, z.dtype))


def unscale_latents(config: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents → decoder input ``latents · σ_c + μ_c`` (the inverse of ``scale_latents``)."""
    return latents * jnp.asarray(config.latents_std, latents.dtype) + jnp.asarray(config.latents_mean, latents.dtype)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar/2)·ε`` from the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# ---- layers ---------------------------------------------------------------------------------------------------


def _conv_init():
    """torch Conv's default kaiming_uniform(a=√5): U(±1/√fan_in)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _frames(module: nn.Module, x: jax.Array, n: int) -> nn.Variable:
    """The module's cache of the last ``n`` frames of its input stream (zeros before the first frame)."""
    b, _, h, w, c = x.shape
    return module.variable("cache", "frames", jnp.zeros, (b, n, h, w, c), x.dtype)


class CausalConv3d(nn.Module):
    """A 3-D conv (B F H W C) that is causal in time: it convolves ``[cached frames, x]`` without time padding.

    ``cache`` frames (default ``kt − 1``: zeros before the first frame = diffusers' causal left padding) are kept in
    the ``"cache"`` collection and replaced by the last ``cache`` frames of ``[cached frames, x]``. Spatial padding
    is symmetric (``k // 2``). ``mode``: ``"conv"``; ``"store"`` (only cache x, return it: the temporal downsampler on
    the first frame); ``"skip"`` (return x untouched, cache unchanged: the temporal upsampler on the first frame).
    """

    features: int
    kernel: tuple[int, int, int]
    stride_t: int = 1
    cache: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mode: str = "conv") -> jax.Array:
        kt, kh, kw = self.kernel
        n = kt - 1 if self.cache is None else self.cache
        kernel = self.param(
            "kernel",
            partitioned(_conv_init(), (None, None, None, None, "channels")),
            (kt, kh, kw, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", partitioned(zeros, ("channels",)), (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        if n:
            cached = _frames(self, x, n)
            if mode == "skip":
                return x
            x = jnp.concatenate([cached.value.astype(x.dtype), x], axis=1)  # B n+F H W C
            cached.value = x[:, -n:]
            if mode == "store":
                return x[:, n:]
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=(self.stride_t, 1, 1),
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + bias.astype(self.dtype)


def conv2d(features: int, *, dtype, stride: int = 1, padding="SAME", name: str | None = None) -> nn.Conv:
    """A per-frame 3×3 conv with float32 parameters and logical names (None, None, None, channels)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(_conv_init(), (None, None, None, "channels")),
        bias_init=partitioned(zeros, ("channels",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """``x / max(‖x‖₂, eps) · √C · scale`` over channels (diffusers ``WanRMS_norm``, ``F.normalize``); fp32
    statistics, result in the input dtype."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", partitioned(ones, ("channels",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), -1, keepdims=True))
        y = x32 / jnp.maximum(norm, self.eps) * (c**0.5) * scale
        return y.astype(x.dtype)


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1 x)))))``; causal 3×3×3 convs, a 1×1×1 shortcut when the
    width changes."""

    out_dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = x
        if x.shape[-1] != self.out_dim:
            h = CausalConv3d(self.out_dim, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        x = nn.silu(RMSNorm(self.eps, name="norm1")(x))
        x = CausalConv3d(self.out_dim, (3, 3, 3), dtype=self.dtype, name="conv1")(x)
        x = nn.silu(RMSNorm(self.eps, name="norm2")(x))
        x = CausalConv3d(self.out_dim, (3, 3, 3), dtype=self.dtype, name="conv2")(x)
        return constrain(x + h, _ACT)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame over its H·W positions (head width = channels), RMS norm
    first, residual. ``to_qkv`` is one (C, 3C) projection, split q | k | v."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, hh, ww, c = x.shape
        x = x.astype(self.dtype)
        h = RMSNorm(self.eps, name="norm")(x)
        qkv = dense(3 * c, (None, "channels"), dtype=self.dtype, name="to_qkv")(h)  # B F H W 3C
        q, k, v = (t.reshape(b * f, hh * ww, 1, c) for t in jnp.split(qkv, 3, axis=-1))
        out = dot_product_attention(q, k, v, backend=self.backend)  # scale c^-½
        out = dense(c, (None, "channels"), dtype=self.dtype, name="proj")(out.reshape(b, f, hh, ww, c))
        return constrain(x + out, _ACT)


class Downsample(nn.Module):
    """Per frame: right/bottom zero pad + 3×3 stride-2 conv (``resample``); with ``temporal``, then a causal
    (3, 1, 1) stride-2 conv over [last frame of the previous chunk, x] (``time_conv``; the first frame passes)."""

    dim: int
    temporal: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))  # asymmetric: right/bottom
        x = conv2d(self.dim, dtype=self.dtype, stride=2, padding="VALID", name="resample")(x)
        if self.temporal:
            time_conv = CausalConv3d(self.dim, (3, 1, 1), stride_t=2, cache=1, dtype=self.dtype, name="time_conv")
            x = time_conv(x, "store" if first else "conv")
        return x


class Upsample(nn.Module):
    """With ``temporal``: a causal (3, 1, 1) conv to 2·C channels whose halves become two consecutive frames
    (``time_conv``; skipped for the first frame); then per frame nearest ×2 and a 3×3 conv to ``out_dim``."""

    dim: int
    out_dim: int
    temporal: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        x = x.astype(self.dtype)
        b, f, h, w, c = x.shape
        if self.temporal:
            time_conv = CausalConv3d(2 * self.dim, (3, 1, 1), dtype=self.dtype, name="time_conv")
            x = time_conv(x, "skip" if first else "conv")
            if not first:  # B F H W (2 C) → B (F 2) H W C: channel half s is frame 2t + s
                x = x.reshape(b, f, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * f, h, w, c)
        f = x.shape[1]
        x = jnp.broadcast_to(x[:, :, :, None, :, None], (b, f, h, 2, w, 2, c)).reshape(b, f, 2 * h, 2 * w, c)
        return conv2d(self.out_dim, dtype=self.dtype, name="resample")(constrain(x, _ACT))


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResidualBlock(self.dim, self.eps, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.eps, self.dtype, self.backend, name="attentions_0")(x)
        return ResidualBlock(self.dim, self.eps, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    """Video chunk (B, F, H, W, in) → moments (B, F', H/s, W/s, 2·z_dim) before ``quant_conv``.

    ``down_blocks_{n}`` is diffusers' flat list: per level ``num_res_blocks`` residual blocks (each followed by an
    attention block where the level's scale is in ``attn_scales``), then a downsampler except on the last level.
    """

    config: WanVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        cfg = self.config
        dtype, eps = compute_dtype(cfg.dtype), cfg.norm_eps
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x = CausalConv3d(dims[0], (3, 3, 3), dtype=dtype, name="conv_in")(constrain(x.astype(dtype), _ACT))
        n, scale = 0, 1.0
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, eps, dtype, name=f"down_blocks_{n}")(x)
                n += 1
                if scale in cfg.attn_scales:
                    x = AttentionBlock(eps, dtype, cfg.attention_backend, name=f"down_blocks_{n}")(x)
                    n += 1
            if i < len(cfg.dim_mult) - 1:
                x = Downsample(out_dim, cfg.temporal_downsample[i], dtype, name=f"down_blocks_{n}")(x, first)
                n += 1
                scale /= 2.0
        x = MidBlock(dims[-1], eps, dtype, cfg.attention_backend, name="mid_block")(x)
        x = nn.silu(RMSNorm(eps, name="norm_out")(x))
        return CausalConv3d(2 * cfg.z_dim, (3, 3, 3), dtype=dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latent chunk (B, f, h, w, z_dim) after ``post_quant_conv`` → video (B, F, h·s, w·s, out).

    ``up_blocks_{i}``: ``num_res_blocks + 1`` residual blocks and, except on the last level, an ``upsampler``
    (temporal where the encoder downsampled in time) whose conv halves the width.
    """

    config: WanVAEConfig

    @nn.compact
    def __call__(self, z: jax.Array, first: bool) -> jax.Array:
        cfg = self.config
        dtype, eps = compute_dtype(cfg.dtype), cfg.norm_eps
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        x = CausalConv3d(dims[0], (3, 3, 3), dtype=dtype, name="conv_in")(constrain(z.astype(dtype), _ACT))
        x = MidBlock(dims[0], eps, dtype, cfg.attention_backend, name="mid_block")(x)
        for i, out_dim in enumerate(dims[1:]):
            up = i < len(cfg.dim_mult) - 1
            block = UpBlock(out_dim, cfg.num_res_blocks, up and temporal_up[i], up, eps, dtype, name=f"up_blocks_{i}")
            x = block(x, first)
        x = nn.silu(RMSNorm(eps, name="norm_out")(x))
        return CausalConv3d(cfg.out_channels, (3, 3, 3), dtype=dtype, name="conv_out")(x)


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then (if ``upsample``) the upsampler to ``out_dim // 2`` channels."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    upsample: bool
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, self.eps, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            up = Upsample(self.out_dim, self.out_dim // 2, self.temporal, self.dtype, name="upsampler")
            x = up(x, first)
        return x


class AutoencoderKLWan(nn.Module):
    """The Wan VAE, one chunk of frames per call; its causal convs keep their last frames in the ``"cache"``
    collection (apply with ``mutable=["cache"]``). Use ``encode``/``decode`` below, which drive the chunks.

    ``encode_chunk``: video frames (B, F, H, W, in) → moments (B, F', H/s, W/s, 2·z_dim) float32 (after
    ``quant_conv``); ``decode_chunk``: latents (B, f, h, w, z_dim) → video frames float32, unclamped. ``first``
    marks the chunk holding frame 0 (exactly one frame). ``__call__`` reconstructs frame 0 of a video; it
    initialises every parameter (the temporal resampling convs too, which frame 0 skips).
    """

    config: WanVAEConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), dtype=dtype)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), dtype=dtype)

    def encode_chunk(self, x: jax.Array, first: bool = False) -> jax.Array:
        return self.quant_conv(self.encoder(x, first)).astype(jnp.float32)

    def decode_chunk(self, z: jax.Array, first: bool = False) -> jax.Array:
        return self.decoder(self.post_quant_conv(z), first).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = self.encode_chunk(x[:, :1], True)[..., : self.config.z_dim]
        return self.decode_chunk(mean, True)


# ---- chunked encode / decode ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "method", "first"))
def _step(config: WanVAEConfig, method: str, first: bool, params, cache, frames: jax.Array):
    """One chunk through ``AutoencoderKLWan.<method>`` → ``(output, cache)``; ``cache=None`` starts from zeros.
    Jitted once per (config, method, chunk shape), whatever the video length."""
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    out, state = AutoencoderKLWan(config).apply(variables, frames, first, method=method, mutable=["cache"])
    return out, state["cache"]


def _chunked(config: WanVAEConfig, params, x: jax.Array, method: str, chunk: int) -> jax.Array:
    """``method`` over frame 0 alone, then over chunks of ``chunk`` frames (a shorter last chunk at the end),
    threading the causal-conv cache; the outputs concatenated along time.

    Called eagerly it loops in Python over one compiled step, so videos of any length reuse the same two programs
    (first chunk, later chunks); traced (inside ``jax.jit``) it runs the steps in a ``lax.scan``.
    """
    traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((params, x)))
    if not traced:
        params = jax.device_put(params)  # numpy params: moved once, not once per step
        if not isinstance(x, jax.Array):
            x = np.asarray(x)  # a host video stays on the host: one chunk at a time is moved to the device
    b, rest = x.shape[0], x[:, 1:]
    out, cache = _step(config, method, True, params, None, x[:, :1])
    outs = [out]
    n = rest.shape[1] // chunk
    if n and traced:
        steps = rest[:, : n * chunk].reshape(b, n, chunk, *rest.shape[2:]).swapaxes(0, 1)  # n B chunk H W C

        def body(cache, frames):
            out, cache = _step(config, method, False, params, cache, frames)
            return cache, out

        cache, ys = jax.lax.scan(body, cache, steps)  # ys: n B T H W C
        outs.append(ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:]))
    else:
        for k in range(n):
            if isinstance(rest, np.ndarray):
                frames = rest[:, k * chunk : (k + 1) * chunk]
            else:
                frames = jax.lax.dynamic_slice_in_dim(rest, k * chunk, chunk, axis=1)  # one program for every k
            out, cache = _step(config, method, False, params, cache, frames)
            outs.append(out)
    if rest.shape[1] > n * chunk:
        outs.append(_step(config, method, False, params, cache, rest[:, n * chunk :])[0])
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _check(x: jax.Array, channels: int, spatial: int, temporal: int, what: str) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(f"expected {what} of shape (B, F, H, W, {channels}) (channels-last), got {x.shape}")
    if (x.shape[1] - 1) % temporal:
        raise ValueError(f"{what} has {x.shape[1]} frames; expected 1 + {temporal}·k (the VAE's temporal factor)")
    if x.shape[2] % spatial or x.shape[3] % spatial:
        raise ValueError(f"{what} size {x.shape[2]}x{x.shape[3]} is not a multiple of the VAE's factor {spatial}")


def encode(
    vae: AutoencoderKLWan, params, video: jax.Array, *, chunk_frames: int = ENCODE_CHUNK
) -> tuple[jax.Array, jax.Array]:
    """Video (B, 1 + t·k, H, W, in) in [−1, 1] → posterior ``(mean, logvar)``, each (B, 1 + k, H/s, W/s, z_dim)
    float32 (t, s: the temporal and spatial factors, 4 and 8 for Wan 2.1); jit-able.

    Frame 0 is encoded alone, then ``chunk_frames`` frames per step (diffusers: 4), so activations are those of one
    chunk. The result does not depend on ``chunk_frames`` (a multiple of t) beyond float rounding. logvar is clamped
    to [−30, 20] as diffusers does.
    """
    cfg = vae.config
    t = cfg.temporal_factor
    if chunk_frames <= 0 or chunk_frames % t:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of the temporal factor {t}")
    _check(video, cfg.in_channels, cfg.spatial_factor, t, "videos")
    return _posterior(_chunked(cfg, params, video, "encode_chunk", chunk_frames), cfg.z_dim)


@functools.partial(jax.jit, static_argnames="z_dim")
def _posterior(moments: jax.Array, z_dim: int) -> tuple[jax.Array, jax.Array]:
    """Moments → ``(mean, logvar)``, logvar clamped as diffusers' ``DiagonalGaussianDistribution``."""
    return moments[..., :z_dim], jnp.clip(moments[..., z_dim:], *LOGVAR_RANGE)


def decode(
    vae: AutoencoderKLWan,
    params,
    z: jax.Array,
    *,
    chunk: int = 1,
    tile_size: int | tuple[int, int] | None = None,
    tile_stride: int | tuple[int, int] | None = None,
    clamp: bool = True,
) -> jax.Array:
    """Unscaled latents (B, f, h, w, z_dim) → video (B, 1 + t·(f − 1), h·s, w·s, out) float32, clamped to [−1, 1]
    like diffusers (``clamp=False`` keeps the raw output); jit-able.

    Latent frame 0 is decoded alone, then ``chunk`` latent frames per step (diffusers: 1): memory is one chunk's
    activations, the caches and the output. ``tile_size`` (video pixels; diffusers ``enable_tiling`` default 256)
    decodes spatial tiles of that size every ``tile_stride`` pixels (default ¾ of the tile: 192) and blends them as
    ``decode_tiled`` describes; a latent no larger than one tile is decoded whole.
    """
    cfg = vae.config
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be positive")
    _check(z, cfg.z_dim, 1, 1, "latents")
    if tile_size is None:
        out = _chunked(cfg, params, z, "decode_chunk", chunk)
    else:
        out = decode_tiled(vae, params, z, tile_size=tile_size, tile_stride=tile_stride, chunk=chunk, clamp=False)
    return jnp.clip(out, -1.0, 1.0) if clamp else out


# ---- spatial tiling (decode) ----------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@functools.partial(jax.jit, static_argnames=("extent", "axis"))
def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """b with its first ``extent`` rows along ``axis`` faded in linearly from the last ``extent`` rows of a
    (weight of b: i / extent for row i), as diffusers' ``blend_v``/``blend_h``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = jnp.asarray((np.arange(extent) / extent).astype(np.float32).reshape(shape))
    one_minus = jnp.asarray((1.0 - np.arange(extent) / extent).astype(np.float32).reshape(shape))
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([tail * one_minus + head * w, rest], axis=axis)


def decode_tiled(
    vae: AutoencoderKLWan,
    params,
    z: jax.Array,
    *,
    tile_size: int | tuple[int, int] = 256,
    tile_stride: int | tuple[int, int] | None = None,
    chunk: int = 1,
    clamp: bool = True,
) -> jax.Array:
    """``decode`` over overlapping spatial tiles, as diffusers' ``AutoencoderKLWan.enable_tiling``: jit-able.

    Latent tiles of ``tile_size / s`` start every ``tile_stride / s`` latent pixels (the last ones are cut at the
    edge); each is decoded over time with its own cache; each decoded tile's first ``tile_size − tile_stride`` rows
    (columns) are cross-faded linearly with the tile above (to the left, both already blended), and its first
    ``tile_stride`` pixels are kept. Sizes are video pixels (H, W) or one int, multiples of the spatial factor s;
    ``tile_stride`` defaults to ¾ of the tile (diffusers: 256 and 192).

    Differences from the untiled decode come from the seams, where a tile's zero padding changes its output, and
    from the mid-block attention, which attends within the tile instead of the whole frame. Measured |tiled −
    untiled| in units of the untiled output's std (random weights, which amplify differences; fp32 CPU; 2 latent
    frames): 128² video, 64-px tiles every 48 px: max 3.8, mean 0.32; 256², 128-px tiles every 96 px: max 3.3,
    mean 0.16. Trained weights are smoother, but seams can show; prefer the untiled ``decode`` when memory allows.
    """
    cfg = vae.config
    s = cfg.spatial_factor
    tile = _pair(tile_size)
    stride = _pair(tile_stride) if tile_stride is not None else tuple(t * 3 // 4 // s * s for t in tile)
    for name, v in (("tile_size", tile), ("tile_stride", stride)):
        if min(v) <= 0 or v[0] % s or v[1] % s:
            raise ValueError(f"{name}={v} must be positive multiples of the VAE's spatial factor {s}")
    if stride[0] > tile[0] or stride[1] > tile[1]:
        raise ValueError(f"tile_stride={stride} must not exceed tile_size={tile}")
    _check(z, cfg.z_dim, 1, 1, "latents")
    height, width = z.shape[2], z.shape[3]
    (th, tw), (sh, sw) = (tile[0] // s, tile[1] // s), (stride[0] // s, stride[1] // s)
    if height <= th and width <= tw:
        out = _chunked(cfg, params, z, "decode_chunk", chunk)
    else:
        above, rows = None, []
        for i in range(0, height, sh):
            row = []
            for j in range(0, width, sw):
                t = _chunked(cfg, params, z[:, :, i : i + th, j : j + tw], "decode_chunk", chunk)
                if above is not None:
                    t = _blend(above[len(row)], t, tile[0] - stride[0], axis=2)
                if row:
                    t = _blend(row[-1], t, tile[1] - stride[1], axis=3)
                row.append(t)
            rows.append(jnp.concatenate([t[:, :, : stride[0], : stride[1]] for t in row], axis=3))
            above = row
        out = jnp.concatenate(rows, axis=2)[:, :, : height * s, : width * s]
    return jnp.clip(out, -1.0, 1.0) if clamp else out


class WanVAEFamily(Family):
    """The Wan causal video VAE as a registered family (model directories, ``build``); not a diffusion model."""

    name = "wan_vae"
    display_name = "Wan VAE"
    config_class = WanVAEConfig
    module_class = AutoencoderKLWan
    conversion = "dit_jax.convert.wan_vae"
    presets = PRESETS


FAMILY = register(WanVAEFamily())
