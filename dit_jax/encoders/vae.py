"""AutoencoderKL (the SD/SDXL 4-channel and SD3/Flux 16-channel latent VAE) in Flax; tiling is in ``tiling.py``.

Matches diffusers ``AutoencoderKL`` (MODELS.md §6): GroupNorm eps 1e-6 with statistics in fp32, SiLU, downsampling
by a right/bottom zero pad + 3×3 stride-2 conv, nearest ×2 upsampling + 3×3 conv, a resnet–attention–resnet mid
block whose attention has one head of width ``channels``, and 1×1 quant/post-quant convs. Images are NHWC in
[−1, 1]; ``encode`` returns the posterior ``(mean, logvar)`` with logvar clamped to [−30, 20] as diffusers does.
Parameter paths mirror diffusers names (``encoder/down_blocks_0/resnets_1/conv2``); ``dit_jax.convert.vae`` maps
them to diffusers and LDM keys.
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
from dit_jax.nn.stack import REMAT_POLICIES
from dit_jax.parallel.rules import constrain

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this range
_ACT = ("act_batch", None, None, None)  # B H W C activations: only the batch is sharded


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig(ExecutionConfig):
    """Every architecture and numerics switch of an AutoencoderKL. Defaults: the SD 1.x VAE (kl-f8, 4 channels).

    ``scaling_factor``/``shift_factor`` (and optional per-channel ``latents_mean``/``latents_std``) map posterior
    means to diffusion latents, see ``scale_latents``. ``sample_size`` is the training image size; it is the default
    tile size of ``encode_tiled``/``decode_tiled`` (diffusers' ``tile_sample_min_size``).
    """

    family: ClassVar[str] = "vae"

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    sample_size: int = 512
    force_upcast: bool = True  # informational: diffusers runs this VAE in fp32 because fp16 overflows

    def __post_init__(self):
        super().__post_init__()
        check(len(self.block_out_channels) > 0, "block_out_channels", self.block_out_channels, "at least one block")
        for c in self.block_out_channels:
            check(
                c > 0 and c % self.norm_num_groups == 0,
                "block_out_channels",
                self.block_out_channels,
                f"positive multiples of norm_num_groups={self.norm_num_groups}",
            )
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        check(self.act_fn == "silu", "act_fn", self.act_fn, "'silu' (the only activation AutoencoderKL uses)")
        check(self.norm_eps > 0, "norm_eps", self.norm_eps, "positive")
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (VAE blocks are not scanned)")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            check(v is None or len(v) == self.latent_channels, name, v, f"None or {self.latent_channels} values")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for the real VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def dummy_inputs(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        s = 2 * self.downsample_factor
        return (np.zeros((batch, s, s, self.in_channels), np.float32),)


_REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
_16CH = dict(_REAL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(**_REAL, scaling_factor=0.18215, sample_size=512),
    "sd-vae-ft-ema": VAEConfig(**_REAL, scaling_factor=0.18215, sample_size=256),
    "sd-vae-ft-mse": VAEConfig(**_REAL, scaling_factor=0.18215, sample_size=256),
    "sdxl": VAEConfig(**_REAL, scaling_factor=0.13025, sample_size=1024),
    "sd3": VAEConfig(**_16CH, scaling_factor=1.5305, shift_factor=0.0609),
    "flux": VAEConfig(**_16CH, scaling_factor=0.3611, shift_factor=0.1159),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """The named VAE preset (``sd``, ``sd-vae-ft-ema``, ``sd-vae-ft-mse``, ``sdxl``, ``sd3``, ``flux``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ---- latent scaling -------------------------------------------------------------------------------------------


def _latent_stats(config: VAEConfig, dtype) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(config.latents_mean if config.latents_mean is not None else 0.0, dtype)
    std = jnp.asarray(config.latents_std if config.latents_std is not None else 1.0, dtype)
    return mean, std


def scale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """Posterior sample/mean → diffusion latents: ``(z − shift)·scale`` (``(z − μ_c)·scale/σ_c`` with channel stats)."""
    mean, std = _latent_stats(config, z.dtype)
    return (z - mean - config.shift_factor) * config.scaling_factor / std


def unscale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents → decoder input: the inverse of ``scale_latents``."""
    mean, std = _latent_stats(config, latents.dtype)
    return latents * std / config.scaling_factor + config.shift_factor + mean


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar/2)·ε`` from the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# ---- layers ---------------------------------------------------------------------------------------------------


def _conv_init():
    """torch Conv2d's default kaiming_uniform(a=√5): U(±1/√fan_in)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features: int, kernel: int, *, dtype, stride: int = 1, padding="SAME", name: str | None = None) -> nn.Conv:
    """A k×k conv with float32 parameters, logical names (None, None, None, channels) and ``dtype`` compute."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(_conv_init(), (None, None, None, "channels")),
        bias_init=partitioned(zeros, ("channels",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """torch GroupNorm over NHWC (explicit eps, affine); statistics in fp32, result in the input dtype.

    For tiled encode/decode (``dit_jax.encoders.tiling``), statistics can be shared across tiles: given variables
    ``norm_stats/{mean,var}`` (B, G) it normalises with those instead of the tile's own, and with ``norm_sums``
    mutable it records the count, mean and sum of squared deviations (``n``, ``mean``, ``m2``) of its input over the
    tile's core (``tiling/core``: int32 [y0, y1, x0, x1, th, tw] in tile-input pixels), from which the
    whole-image statistics are accumulated tile by tile.
    """

    num_groups: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        if c % g:
            raise ValueError(f"{self.name}: {c} channels are not divisible into {g} groups")
        scale = self.param("scale", partitioned(ones, ("channels",)), (c,), jnp.float32)
        bias = self.param("bias", partitioned(zeros, ("channels",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        if self.has_variable("tiling", "core") and self.is_mutable_collection("norm_sums"):
            self._record(x32)
        if self.has_variable("norm_stats", "mean"):
            mean = self.get_variable("norm_stats", "mean")[:, None, None, :, None]
            var = self.get_variable("norm_stats", "var")[:, None, None, :, None]
        else:
            mean = x32.mean((1, 2, 4), keepdims=True)
            var = jnp.square(x32 - mean).mean((1, 2, 4), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * scale + bias).astype(x.dtype)

    def _record(self, x32: jax.Array) -> None:
        """Count, mean and Σ(x − mean)² over the tile's core (layer pixel iy covers tile-input rows [iy·th/h, …))."""
        _, h, w, _, cg = x32.shape
        y0, y1, x0, x1, th, tw = (self.get_variable("tiling", "core")[i] for i in range(6))
        iy, ix = jnp.arange(h) * th, jnp.arange(w) * tw
        my = ((iy >= y0 * h) & (iy < y1 * h)).astype(jnp.float32)
        mx = ((ix >= x0 * w) & (ix < x1 * w)).astype(jnp.float32)
        m = (my[:, None] * mx[None, :])[None, :, :, None, None]
        n = m.sum() * cg
        mean = (x32 * m).sum((1, 2, 4)) / jnp.maximum(n, 1.0)
        m2 = (jnp.square(x32 - mean[:, None, None, :, None]) * m).sum((1, 2, 4))
        self.put_variable("norm_sums", "n", n)
        self.put_variable("norm_sums", "mean", mean)
        self.put_variable("norm_sums", "m2", m2)


class ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1 x)))))``; a 1×1 ``conv_shortcut`` on x when the width changes."""

    out_channels: int
    num_groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(self.num_groups, self.eps, name="norm1")(x))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(GroupNorm(self.num_groups, self.eps, name="norm2")(h))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        return constrain(x.astype(self.dtype) + h, _ACT)


class MidAttention(nn.Module):
    """Single-head self-attention over all H·W positions (head width = channels), GroupNorm first, residual.

    Queries are processed in chunks of whole rows when the fp32 logits would exceed ``_LOGITS_BUDGET`` bytes
    (exact: the softmax is over keys), so large latents (2K/4K images) attend globally in bounded memory.
    """

    num_groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = GroupNorm(self.num_groups, self.eps, name="group_norm")(x)
        proj = functools.partial(dense, c, (None, "channels"), dtype=self.dtype)
        q, k, v = (proj(name=n)(h) for n in ("to_q", "to_k", "to_v"))  # B H W C
        kv = (k.reshape(b, hh * ww, 1, c), v.reshape(b, hh * ww, 1, c))
        attend = lambda qr: dot_product_attention(qr.reshape(b, -1, 1, c), *kv, backend=self.backend)  # scale c^-½
        rows = _rows_per_chunk(b, hh, ww)
        if rows == hh:
            out = attend(q)
        else:
            chunks = q.reshape(b, hh // rows, rows, ww, c).swapaxes(0, 1)  # n B rows W C
            out = jax.lax.map(attend, chunks).swapaxes(0, 1)  # B n rows·W 1 C
        out = proj(name="to_out")(out.reshape(b, hh, ww, c))
        return constrain(x.astype(self.dtype) + out, _ACT)


_LOGITS_BUDGET = 1 << 30  # bytes of fp32 attention logits per chunk


def _rows_per_chunk(b: int, h: int, w: int) -> int:
    """The most query rows (a divisor of h) whose fp32 logits against all h·w keys fit ``_LOGITS_BUDGET``."""
    per_row = 4 * b * w * h * w
    fits = [r for r in range(1, h + 1) if h % r == 0 and r * per_row <= _LOGITS_BUDGET]
    return max(fits) if fits else 1


class MidBlock(nn.Module):
    """resnet → attention (optional) → resnet at the lowest resolution."""

    channels: int
    num_groups: int
    eps: float
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = _maybe_remat(ResnetBlock, self.remat)
        x = resnet(self.channels, self.num_groups, self.eps, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            attn = _maybe_remat(MidAttention, self.remat)
            x = attn(self.num_groups, self.eps, self.dtype, self.backend, name="attentions_0")(x)
        return resnet(self.channels, self.num_groups, self.eps, self.dtype, name="resnets_1")(x)


def _maybe_remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    return cls if policy == "none" else nn.remat(cls, policy=REMAT_POLICIES[policy])


class DownBlock(nn.Module):
    """``num_layers`` resnets, then (unless last) a right/bottom zero pad and a 3×3 stride-2 conv."""

    channels: int
    num_layers: int
    add_downsample: bool
    num_groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = _maybe_remat(ResnetBlock, self.remat)
        for j in range(self.num_layers):
            x = resnet(self.channels, self.num_groups, self.eps, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # asymmetric: right/bottom only
            x = conv(self.channels, 3, dtype=self.dtype, stride=2, padding="VALID", name="downsample")(x)
        return x


class UpBlock(nn.Module):
    """``num_layers`` resnets, then (unless last) nearest ×2 upsampling and a 3×3 conv."""

    channels: int
    num_layers: int
    add_upsample: bool
    num_groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = _maybe_remat(ResnetBlock, self.remat)
        for j in range(self.num_layers):
            x = resnet(self.channels, self.num_groups, self.eps, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            b, h, w, c = x.shape
            x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
            x = conv(self.channels, 3, dtype=self.dtype, name="upsample")(constrain(x, _ACT))
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in) → moments (B, H/f, W/f, 2·latent) before ``quant_conv``.

    ``features`` (conv_in + down blocks, the full-resolution part) and ``head`` (mid block + output, at latent
    resolution) are separate so that tiled encoding can tile the first and run the second on the whole latent.
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        norm = dict(num_groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        widths = cfg.block_out_channels
        self.conv_in = conv(widths[0], 3, dtype=dtype)
        self.down_blocks = [
            DownBlock(ch, cfg.layers_per_block, i < len(widths) - 1, **norm, dtype=dtype, remat=cfg.remat)
            for i, ch in enumerate(widths)
        ]
        self.mid_block = MidBlock(
            widths[-1],
            **norm,
            add_attention=cfg.mid_block_add_attention,
            dtype=dtype,
            backend=cfg.attention_backend,
            remat=cfg.remat,
        )
        self.conv_norm_out = GroupNorm(**norm)
        self.conv_out = conv(2 * cfg.latent_channels, 3, dtype=dtype)

    def features(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(constrain(x.astype(compute_dtype(self.config.dtype)), _ACT))
        for block in self.down_blocks:
            x = block(x)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class Decoder(nn.Module):
    """Latent (B, h, w, latent) after ``post_quant_conv`` → image (B, h·f, w·f, out).

    ``low`` (conv_in + mid block, at latent resolution) and ``high`` (up blocks + output) are separate so that
    tiled decoding runs the first on the whole latent and tiles the second.
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        norm = dict(num_groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        widths = tuple(reversed(cfg.block_out_channels))
        self.conv_in = conv(widths[0], 3, dtype=dtype)
        self.mid_block = MidBlock(
            widths[0],
            **norm,
            add_attention=cfg.mid_block_add_attention,
            dtype=dtype,
            backend=cfg.attention_backend,
            remat=cfg.remat,
        )
        self.up_blocks = [
            UpBlock(ch, cfg.layers_per_block + 1, i < len(widths) - 1, **norm, dtype=dtype, remat=cfg.remat)
            for i, ch in enumerate(widths)
        ]
        self.conv_norm_out = GroupNorm(**norm)
        self.conv_out = conv(cfg.out_channels, 3, dtype=dtype)

    def low(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(constrain(z.astype(compute_dtype(self.config.dtype)), _ACT))
        return self.mid_block(x)

    def high(self, x: jax.Array) -> jax.Array:
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.high(self.low(z))


class AutoencoderKL(nn.Module):
    """``apply({"params": p}, x, method="encode") -> (mean, logvar)``; ``method="decode"``: latent → image.

    x: images (B, H, W, in_channels) in [−1, 1], H and W multiples of ``config.downsample_factor``. Outputs are
    float32 whatever the compute dtype. ``__call__`` reconstructs: ``decode(encode(x)[0])``. For large images see
    ``dit_jax.encoders.tiling.encode_tiled``/``decode_tiled``.
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = conv(2 * cfg.latent_channels, 1, dtype=dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(cfg.latent_channels, 1, dtype=dtype) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images → posterior ``(mean, logvar)``, each (B, H/f, W/f, latent_channels) float32."""
        _check_input(x, self.config.in_channels, self.config.downsample_factor, "image")
        return self.encode_head(self.encoder.features(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) → images (B, h·f, w·f, out_channels) float32."""
        return self.decode_high(self.decode_low(z))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])

    # the two halves of encode/decode, for tiling
    def encode_features(self, x: jax.Array) -> jax.Array:
        """Images → encoder features at latent resolution (before the mid block)."""
        return self.encoder.features(x)

    def encode_head(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder features → ``(mean, logvar)`` (mid block, output conv, quant conv, logvar clamp)."""
        moments = self.encoder.head(h)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        n = self.config.latent_channels
        return moments[..., :n], jnp.clip(moments[..., n:], *LOGVAR_RANGE)

    def decode_low(self, z: jax.Array) -> jax.Array:
        """Latents → decoder features after the mid block (latent resolution)."""
        _check_input(z, self.config.latent_channels, 1, "latent")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(compute_dtype(self.config.dtype)))
        return self.decoder.low(z)

    def decode_high(self, h: jax.Array) -> jax.Array:
        """Decoder features after the mid block → images float32 (up blocks and output conv)."""
        return self.decoder.high(h).astype(jnp.float32)


def _check_input(x: jax.Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"expected {what}s of shape (B, H, W, {channels}) (NHWC), got {x.shape}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{what} size {x.shape[1]}x{x.shape[2]} is not a multiple of the VAE's factor {multiple}")


class VAEFamily(Family):
    """The AutoencoderKL as a registered family (model directories, ``build``); not a diffusion model."""

    name = "vae"
    display_name = "VAE"
    config_class = VAEConfig
    module_class = AutoencoderKL
    conversion = "dit_jax.convert.vae"


FAMILY = register(VAEFamily())
