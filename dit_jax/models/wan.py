"""Wan 2.1 text-to-video: a DiT over spacetime patches of a causal 3-D VAE latent, full 3-D self-attention with
3-axis RoPE, cross-attention to UMT5 text, and one shared timestep projection modulating every block.

Matches the Wan-AI ``WanModel`` and diffusers ``WanTransformer3DModel`` (FAMILIES.md "Wan 2.1 video"). Latents are
channels-last video ``(B, F, H, W, C)``; a ``(pt, p, p)`` patch (Conv3d with stride = kernel, (1, 2, 2) in every
released model) becomes one token, tokens in (frame, row, column) order. Per block:

- self-attention on ``LayerNorm(x)·(1 + scale) + shift`` with q/k/v/o Linears, q and k RMS-normalised over the whole
  inner dim (across heads, eps 1e-6) and rotated by RoPE (head channels split t = d − 4⌊d/6⌋, h = w = 2⌊d/6⌋, each
  axis its own frequencies 1/θ^(2i/d_axis), interleaved pairs); ``x += gate · out``;
- cross-attention from ``LayerNorm_affine(x)`` to the projected text (no mask, no RoPE), ``x += out``;
- tanh-GELU FFN on ``LayerNorm(x)·(1 + c_scale) + c_shift``, ``x += c_gate · out``.

(shift, scale, gate, c_shift, c_scale, c_gate) = the block's ``scale_shift_table`` (6, D) + ``time_projection(SiLU(
temb))`` (B, 6, D), in float32 whatever the compute dtype; the head adds its (2, D) table to ``temb`` itself for
(shift, scale). The timestep embedding and projection also run in float32 (diffusers keeps the embedder in float32
but rounds its output to the compute dtype before the projection). ``t`` is the diffusers timestep in [0, 1000].

Parameter layout: ``patch_embedding`` kernel (pt, p, p, C, D), like a Flax Conv3D kernel; per block ``self_attn`` and
``cross_attn`` with ``q``/``k``/``v`` kernels (D, H, Dh), ``o`` (H, Dh, D) and ``norm_q``/``norm_k`` scales (D,);
``cross_norm`` (the cross-attention LayerNorm: original ``norm3``, diffusers ``norm2``) and ``ffn`` ``fc1``/``fc2``.
"""

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, TextSlot, register
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.embeddings import CaptionProjection, TimestepEmbedder
from dit_jax.nn.layers import LayerNorm, compute_dtype, dense, layer_norm, modulate, ones, partitioned, zeros
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.rope import apply_rope, grid_ids, rope_frequencies
from dit_jax.nn.stack import run_blocks
from dit_jax.parallel.rules import constrain

TEXT_TOKENS = 512  # WanPipeline's max_sequence_length and the original's text_len: UMT5 features zero-padded to it
_ACT = ("act_batch", "act_length", "act_embed")
_ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanConfig(ExecutionConfig):
    """Every architecture switch of a Wan 2.1 transformer. Defaults: Wan2.1-T2V-14B (diffusers' defaults).

    ``patch_size`` is the spatial patch (h = w) and ``patch_size_t`` the temporal one (diffusers ``patch_size=(pt,
    p, p)``); ``hidden_size`` = heads × head_dim; ``ffn_dim`` the FFN width; ``text_dim`` the UMT5 width;
    ``freq_dim`` the timestep sinusoid width. ``input_size``/``input_frames`` are the latent side and frame count of
    the default (square) training clip (480 px, 81 frames); no parameter depends on them. ``rope_max_seq_len`` bounds
    the positions per axis (diffusers precomputes that many). ``qk_norm`` (original ``qk_norm``; diffusers always
    normalises) and ``cross_attn_norm`` (an affine LayerNorm before the cross-attention) are on in every release.
    """

    family: ClassVar[str] = "wan"

    input_size: int = 60
    input_frames: int = 21
    patch_size: int = 2
    patch_size_t: int = 1
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 5120
    num_heads: int = 40
    depth: int = 40
    ffn_dim: int = 13824
    text_dim: int = 4096
    freq_dim: int = 256
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    theta: float = 10000.0
    rope_max_seq_len: int = 1024

    def __post_init__(self):
        super().__post_init__()
        positive = ("input_size", "input_frames", "patch_size", "patch_size_t", "in_channels", "out_channels")
        positive += ("hidden_size", "num_heads", "depth", "ffn_dim", "text_dim", "freq_dim", "rope_max_seq_len")
        for name in positive:
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        d, h = self.hidden_size, self.num_heads
        check(d % h == 0, "hidden_size", d, f"a multiple of num_heads={h}")
        head_dim = d // h
        check(head_dim % 2 == 0 and head_dim >= 6, "num_heads", h, f"a head_dim (= {d}/{h}) that is even and ≥ 6")
        check(self.freq_dim % 2 == 0, "freq_dim", self.freq_dim, "even (cos and sin halves)")
        p, pt = self.patch_size, self.patch_size_t
        check(self.input_size % p == 0, "input_size", self.input_size, f"a multiple of patch_size={p}")
        check(self.input_frames % pt == 0, "input_frames", self.input_frames, f"a multiple of patch_size_t={pt}")
        check(self.eps > 0, "eps", self.eps, "positive")
        check(self.theta > 0, "theta", self.theta, "positive")

    @property
    def learn_sigma(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """RoPE channels of (frame, row, column): t = d − 4⌊d/6⌋, h = w = 2⌊d/6⌋ (44, 42, 42 for head_dim 128)."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_volume(self) -> int:
        return self.patch_size_t * self.patch_size * self.patch_size

    def layer_kinds(self) -> list[dict]:
        return [{}] * self.depth

    def dummy_inputs(self, batch: int = 1) -> tuple:
        s, f = self.input_size, self.input_frames
        return (
            np.zeros((batch, f, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch, TEXT_TOKENS, self.text_dim), np.float32),
        )


# ---- patches and positions --------------------------------------------------------------------------------------


def patchify(x: jax.Array, pt: int, p: int) -> jax.Array:
    """(B, F, H, W, C) → (B, f, h, w, pt, p, p, C) with f = F/pt, h = H/p, w = W/p."""
    b, frames, height, width, c = x.shape
    x = x.reshape(b, frames // pt, pt, height // p, p, width // p, p, c)
    return jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))


def unpatchify_video(x: jax.Array, grid: tuple[int, int, int], pt: int, p: int) -> jax.Array:
    """Tokens (B, f·h·w, pt·p·p·C), features in (pt, p, p, C) order → (B, f·pt, h·p, w·p, C)."""
    b = x.shape[0]
    f, h, w = grid
    x = x.reshape(b, f, h, w, pt, p, p, -1)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))  # B f pt h p w p C
    return x.reshape(b, f * pt, h * p, w * p, x.shape[-1])


@functools.lru_cache(maxsize=32)
def rope_tables(f: int, h: int, w: int, axes: tuple[int, int, int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` (f·h·w, head_dim/2) of the token grid: ids (frame, row, column), each axis its own channels."""
    return rope_frequencies(grid_ids((f, h, w)), axes, theta)


# ---- blocks -------------------------------------------------------------------------------------------------------


class RMSNormAcrossHeads(nn.Module):
    """RMSNorm of q or k (B, L, H, Dh) over the whole inner dim H·Dh with a learned ``scale`` (H·Dh,) (Wan's
    ``norm_q``/``norm_k``, not per head): statistics in float32, result in the input dtype."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *_, h, dh = x.shape
        scale = self.param("scale", partitioned(ones, ("heads",)), (h * dh,), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.eps)
        return (y * scale.reshape(h, dh)).astype(x.dtype)


class WanAttention(nn.Module):
    """Self- (``context`` None: RoPE on q and k) or cross-attention (keys from ``context``, no RoPE, no mask)."""

    num_heads: int
    qk_norm: bool = True
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x, context=None, cos=None, sin=None):
        d = x.shape[-1]
        hd = (self.num_heads, d // self.num_heads)
        proj = lambda name: dense(hd, ("embed", "heads", "kv"), dtype=self.dtype, name=name)  # noqa: E731
        src = x if context is None else context
        q, k, v = proj("q")(x), proj("k")(src), proj("v")(src)  # B L H Dh (k, v: B S H Dh)
        if self.qk_norm:
            q = RMSNormAcrossHeads(self.eps, name="norm_q")(q)
            k = RMSNormAcrossHeads(self.eps, name="norm_k")(k)
        if context is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, _ACT_HEADS)
        out = dot_product_attention(q, k, v, backend=self.backend, kv_sharded=context is None)  # B L H Dh
        return dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), name="o")(out)


class WanBlock(nn.Module):
    """One Wan block on the video tokens x (B, L, D); ``e`` (B, 6, D) float32 is the shared timestep projection."""

    num_heads: int
    ffn_dim: int
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x, context, e, cos, sin):
        d = x.shape[-1]

        def init(key, shape, dtype=jnp.float32):
            return jax.random.normal(key, shape, dtype) / d**0.5

        table = self.param("scale_shift_table", partitioned(init, (None, "embed")), (6, d), jnp.float32)
        mods = table[None] + e.astype(jnp.float32)  # B 6 D, float32
        shift, scale, gate, c_shift, c_scale, c_gate = (mods[:, i, None] for i in range(6))
        attn = functools.partial(
            WanAttention,
            num_heads=self.num_heads,
            qk_norm=self.qk_norm,
            eps=self.eps,
            dtype=self.dtype,
            backend=self.backend,
        )

        h = modulate(layer_norm(x.astype(jnp.float32), self.eps), shift, scale).astype(self.dtype)
        out = attn(name="self_attn")(h, cos=cos, sin=sin)
        x = (x.astype(jnp.float32) + out.astype(jnp.float32) * gate).astype(self.dtype)

        if self.cross_attn_norm:
            h = LayerNorm(self.eps, names=("embed",), name="cross_norm")(x.astype(jnp.float32)).astype(self.dtype)
        else:
            h = x
        x = x + attn(name="cross_attn")(h, context)

        h = modulate(layer_norm(x.astype(jnp.float32), self.eps), c_shift, c_scale).astype(self.dtype)
        out = Mlp(self.ffn_dim, dtype=self.dtype, name="ffn")(h)
        x = (x.astype(jnp.float32) + out.astype(jnp.float32) * c_gate).astype(self.dtype)
        return constrain(x, _ACT)


class WanHead(nn.Module):
    """``LayerNorm(x)·(1 + scale) + shift`` with (shift, scale) = ``scale_shift_table`` (2, D) + temb, then
    ``linear`` to pt·p·p·C_out features."""

    out_features: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        d = x.shape[-1]

        def init(key, shape, dtype=jnp.float32):
            return jax.random.normal(key, shape, dtype) / d**0.5

        table = self.param("scale_shift_table", partitioned(init, (None, "embed")), (2, d), jnp.float32)
        mods = table[None] + temb.astype(jnp.float32)[:, None]  # B 2 D
        x = modulate(layer_norm(x.astype(jnp.float32), self.eps), mods[:, 0, None], mods[:, 1, None])
        x = dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(
            x.astype(self.dtype)
        )
        return constrain(x, ("act_batch", "act_length", None))


class Wan(nn.Module):
    """Wan forward: ``apply({"params": p}, x, t, context)``.

    x: video latents (B, F, H, W, in_channels), F a multiple of ``patch_size_t`` and H, W of ``patch_size``; t: the
    diffusers timestep σ·1000 ((B,) or scalar); context: UMT5 features (B, L, text_dim), zero past each prompt's
    length (WanPipeline: L = 512). Returns (B, F, H, W, out_channels) float32.
    """

    config: WanConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"Wan latents must be (B, F, H, W, {cfg.in_channels}) channels-last video, got {x.shape}")
        b, frames, height, width, _ = x.shape
        p, pt, d = cfg.patch_size, cfg.patch_size_t, cfg.hidden_size
        if frames % pt or height % p or width % p:
            raise ValueError(
                f"Wan latents of {frames} frames × {height}x{width} do not split into ({pt}, {p}, {p}) patches"
            )
        grid = (frames // pt, height // p, width // p)
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(
                f"a token grid of {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len} positions per axis"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be (B={b}, L, {cfg.text_dim}), got {context.shape}")

        patch_names = (None, None, None, "patch", "embed")
        tokens = dense(d, patch_names, dtype=dtype, axis=(-4, -3, -2, -1), name="patch_embedding")(
            patchify(x.astype(dtype), pt, p)
        )  # B f h w D
        tokens = constrain(tokens.reshape(b, -1, d), _ACT)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = TimestepEmbedder(d, cfg.freq_dim, dtype=jnp.float32, name="time_embedding")(t)  # B D, float32
        e = dense(6 * d, ("embed", "modulation"), dtype=jnp.float32, name="time_projection")(nn.silu(temb))
        e = e.reshape(b, 6, d)  # reshape + index, not split (see nn.modulation.AdaLNZero)
        ctx = CaptionProjection(d, dtype=dtype, name="text_embedding")(context.astype(dtype))
        ctx = constrain(ctx, ("act_batch", None, "act_embed"))

        cos, sin = rope_tables(*grid, cfg.rope_axes, float(cfg.theta))
        layer = dict(
            num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            qk_norm=cfg.qk_norm,
            cross_attn_norm=cfg.cross_attn_norm,
            eps=cfg.eps,
            dtype=dtype,
            backend=cfg.attention_backend,
        )
        layers = [dict(layer, **kind) for kind in cfg.layer_kinds()]
        tokens = run_blocks(
            WanBlock, layers, tokens, ctx, e, jnp.asarray(cos), jnp.asarray(sin), scan=cfg.scan_blocks, remat=cfg.remat
        )

        out = WanHead(cfg.patch_volume * cfg.out_channels, cfg.eps, dtype=dtype, name="head")(tokens, temb)
        return unpatchify_video(out, grid, pt, p).astype(jnp.float32)


PRESETS: dict[str, WanConfig] = {
    # Wan-AI Wan2.1-T2V configs (FAMILIES.md): 1,418,996,800 and 14,288,491,584 parameters (diffusers counts the same)
    "Wan2.1-T2V-1.3B": WanConfig(hidden_size=1536, num_heads=12, depth=30, ffn_dim=8960),
    "Wan2.1-T2V-14B": WanConfig(hidden_size=5120, num_heads=40, depth=40, ffn_dim=13824),
}


# ---- the family -------------------------------------------------------------------------------------------------

# WanPipeline's scheduler (the Wan2.1-T2V Diffusers scheduler_config.json): UniPC (bh2, order 2) on flow sigmas
# shifted by 3 (480p; 5 for 720p), predicting the flow velocity.
_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}


class WanFamily(Family):
    """Text-to-video Wan 2.1: UMT5 features (masked encoding, zero past the prompt), flow matching sampled with
    WanPipeline's UniPC flow solver (50 steps, classifier-free guidance 5)."""

    name = "wan"
    display_name = "Wan"
    config_class = WanConfig
    module_class = Wan
    presets = PRESETS
    conversion = "dit_jax.convert.wan"
    task = "text-to-video"
    scheduler_config = _SCHEDULER
    sampling = {"num_inference_steps": 50, "guidance_scale": 5.0}
    diffusers_pipelines = {"WanPipeline": {}}

    def condition(self, config, batch):
        return {"context": batch["context"]}

    def apply(self, module, params, x, t, condition):
        """``t`` from our samplers and losses is σ·1000, the timestep WanPipeline gives the model."""
        return module.apply({"params": params}, x, t, condition["context"])

    def drop_condition(self, config, condition, drop):
        """Dropped rows get zero text features."""
        drop = jnp.asarray(drop, bool)
        context = jnp.asarray(condition["context"])
        return dict(condition, context=jnp.where(drop[:, None, None], jnp.zeros_like(context), context))

    def guidance_conditions(self, config, condition):
        """The null condition is zero text features. (WanPipeline encodes the negative prompt, default "", instead;
        that needs the text encoder, which the pipelines hold.)"""
        context = jnp.asarray(condition["context"])
        return {"context": context}, {"context": jnp.zeros_like(context)}

    def condition_specs(self, config, batch_size):
        return {"context": jax.ShapeDtypeStruct((batch_size, TEXT_TOKENS, config.text_dim), jnp.float32)}

    def grid_condition(self, config, sample, batch):
        """The text of the first training batch (as many as ``per_class × num_classes``), in a square grid."""
        n = min(int(sample["per_class"]) * int(sample["num_classes"]), batch["context"].shape[0])
        return {"context": batch["context"]}, n, max(1, int(np.sqrt(n)))

    def text_width(self, config):
        return config.text_dim

    def max_sequence_length(self, config):
        return TEXT_TOKENS

    def text_slots(self, config):
        """WanPipeline's one encoder: UMT5 (``text_encoder``, ``tokenizer``), 512 tokens, encoded with its mask."""
        return (TextSlot("t5", encoder="text_encoder", tokenizer="tokenizer", max_length=TEXT_TOKENS),)

    def text_condition(self, config, features, max_sequence_length=None):
        """As WanPipeline._get_t5_prompt_embeds: the UMT5 hidden states with every position past the prompt's length
        (the tokenizer's mask, a prefix) set to zero."""
        t5 = features["t5"]
        hidden, mask = np.asarray(t5["hidden"]), np.asarray(t5["mask"])
        return {"context": hidden * (mask[..., None] > 0).astype(hidden.dtype)}

    def lora_targets(self, config):
        """The q, k, v and o projections of self- and cross-attention (diffusers' Wan LoRAs adapt ``to_q``/``to_k``/
        ``to_v``/``to_out.0`` of ``attn1`` and ``attn2``)."""
        return (r"(^|/)(self_attn|cross_attn)/(q|k|v|o)/kernel$",)

    def forward_flops(self, config, height, width, text_length=None, *, frames=None):
        """FLOPs of one forward pass over ``frames`` (default ``input_frames``) latent frames of ``height × width``."""
        p, pt, d, f = config.patch_size, config.patch_size_t, config.hidden_size, config.ffn_dim
        frames = config.input_frames if frames is None else frames
        n = (frames // pt) * (height // p) * (width // p)
        length = TEXT_TOKENS if text_length is None else text_length
        embed = 2 * n * config.patch_volume * config.in_channels * d
        embed += 2 * length * (config.text_dim * d + d * d)  # text projection
        embed += 2 * (config.freq_dim * d + d * d) + 2 * d * 6 * d  # timestep MLP and projection
        block = 2 * n * 4 * d * d + 4 * n * n * d  # self-attention: q, k, v, o; logits and values
        block += 2 * n * 2 * d * d + 2 * length * 2 * d * d + 4 * n * length * d  # cross-attention
        block += 2 * n * 2 * d * f  # FFN
        head = 2 * n * d * config.patch_volume * config.out_channels
        return int(embed + config.depth * block + head)

    def batch_flops(self, config, shapes):
        """Video latents ``x`` (B, F, H, W, C) and the text length of ``context`` (B, L, text_dim)."""
        b, frames, height, width, _ = shapes["x"]
        context = shapes.get("context")
        length = None if context is None else context[1]
        return int(b) * self.forward_flops(config, height, width, length, frames=frames)

    def example_shape(self, config):
        """A clip of ``input_frames`` latent frames of ``input_size²``: (F, H, W, C)."""
        s = config.input_size
        return (config.input_frames, s, s, config.in_channels)

    def num_tokens(self, config, shape):
        """Spacetime patches of a clip (F, H, W, C): (F / pt) · (H / p) · (W / p)."""
        p, pt = config.patch_size, config.patch_size_t
        return (shape[0] // pt) * (shape[1] // p) * (shape[2] // p)


FAMILY = register(WanFamily())
