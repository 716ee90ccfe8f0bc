"""Hunyuan-DiT (v1.1, v1.2): a bilingual text-to-image DiT with long skip connections, shift-only adaLN, qk LayerNorm,
2-D RoPE and two text encoders (a BERT-style CLIP tower and mT5).

Matches Tencent ``hydit/modules/models.py`` and diffusers ``HunyuanDiT2DModel`` (MODELS.md §5, FAMILIES.md). Layer ``i``
of ``depth`` saves its output for ``i < depth/2 − 1``; each layer ``i > depth/2`` first mixes in the output saved last
(``skip_linear(skip_norm(cat[x, skip]))``), so layer ``depth − 1`` takes layer 0's. Each block: ``x += attn1(norm1(x) +
shift(c))`` (an additive shift, no scale or gate), ``x += attn2(norm3(x), text)``, ``x += mlp(norm2(x))``; our names
follow the original, where ``norm3`` is the cross-attention norm (diffusers swaps the names of ``norm2`` and ``norm3``).
Every block norm is an affine fp32 LayerNorm (eps 1e-6); q and k are LayerNormed over head_dim (eps 1e-6, affine), then
rotated by RoPE (self-attention: q and k; cross-attention: q only). The model returns ``2·in_channels`` channels with
``learn_sigma`` (eps/v and the variance); diffusers' pipeline keeps the first ``in_channels``.

Text: CLIP features (B, 77, 1024) and mT5 features (B, 256, 2048) through ``mlp_t5`` are joined to 333 tokens, and the
tokens their masks mark as padding become the learned ``text_embedding_padding``. Cross-attention has no mask. The
conditioning vector is ``t_embedder(t) + extra_embedder(cat[pooler(mT5), sinusoid(image_meta_size), style])``; the
attention pooler (8 heads) averages over all mT5 tokens, ignoring the mask; image_meta_size and style exist only with
``use_style_cond_and_image_meta_size`` (v1.0/v1.1).

RoPE (``rope_tables``): head_dim/2 channels rotate by the token's column, the other half by its row (44 + 44 pairs of
interleaved channels at head_dim 88), theta 10000. Positions are interpolated onto the grid of a 512 px image
(``rope_img="base512"``: 32 × 32 tokens at patch 2): the token grid is fitted into the base square (the long side
fills it, the short side is centred) and sampled at ``n`` points. The two references disagree there
(``rope_convention``, MODELS.md §5.4): the original samples ``linspace(start, stop, n, endpoint=False)``, diffusers
``linspace(start, stop·(n−1)/n, n)``; they agree when the crop starts at 0 (square grids) and differ otherwise
(max |Δcos| 0.08 at 1024×768). An original-format import uses the original's grid, a diffusers import diffusers', so
each reproduces its own reference.
"""

import dataclasses
import functools
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, TextSlot, register
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.embeddings import PatchEmbed, TimestepEmbedder, timestep_embedding, unpatchify
from dit_jax.nn.layers import LayerNorm, compute_dtype, dense, layer_norm, modulate, normal, partitioned, zeros
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.rope import apply_rope
from dit_jax.nn.stack import REMAT_POLICIES, stage_bounds
from dit_jax.parallel.rules import constrain

EPS = 1e-6  # every LayerNorm: block norms, skip norm, qk norms, the final norm
THETA = 10000.0
POOLER_HEADS = 8  # the mT5 attention pooler's heads, fixed in both references
META_SIZES = 6  # image_meta_size: original (h, w), target (h, w), crop (top, left)
FREQ_DIM = 256  # sinusoid width of the timestep and of each image_meta_size entry
ORIGINAL_SIZE = (1024, 1024)  # HunyuanDiTPipeline's default original_size
ROPE_CONVENTIONS = ("original", "diffusers")
VAE_SCALE = 8  # pixels per latent: the RoPE base grid is given in pixels
_ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HunyuanConfig(ExecutionConfig):
    """Every architecture and numerics switch of a Hunyuan-DiT. Defaults: DiT-g/2 of v1.2 (no style or size
    conditions), diffusers ``HunyuanDiT2DModel`` names in the comments.

    ``text_dim`` is the CLIP(BERT) width, which is also the width of the joined text tokens (``cross_attention_dim``);
    ``text_dim_t5`` the mT5 width (``cross_attention_dim_t5``); ``pooled_dim`` the pooler's output
    (``pooled_projection_dim``). ``rope_img``: ``"base<px>"`` interpolates positions onto the grid of a ``px``-pixel
    square image (``px // 8 // patch_size`` tokens a side), ``"extend"`` uses the integer token grid (the original's
    ``--rope-img`` choices). ``rope_convention``: whose base-grid sampling, the original's or diffusers' (see the module
    docstring). ``caption_dropout_prob``: the original's ``--uncond-p`` (0.2).
    """

    family: ClassVar[str] = "hunyuan"

    input_size: int = 128  # latent side of the training resolution (1024 px); no parameter depends on it
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 4.3637  # MLP width int(1408 · 4.3637) = 6144
    learn_sigma: bool = True
    text_dim: int = 1024  # cross_attention_dim
    text_dim_t5: int = 2048  # cross_attention_dim_t5
    pooled_dim: int = 1024  # pooled_projection_dim
    text_len: int = 77
    text_len_t5: int = 256
    use_style_cond_and_image_meta_size: bool = False  # True for v1.0/v1.1
    rope_img: str = "base512"
    rope_convention: str = "original"
    caption_dropout_prob: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "num_heads", "depth"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        for name in ("text_dim", "text_dim_t5", "pooled_dim", "text_len", "text_len_t5"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        d, h = self.hidden_size, self.num_heads
        check(d % h == 0, "hidden_size", d, f"a multiple of num_heads={h}")
        check((d // h) % 4 == 0, "num_heads", h, f"a head_dim (hidden_size/num_heads = {d / h:g}) divisible by 4")
        check(self.depth % 2 == 0, "depth", self.depth, "even (each skip the first half saves, the second half uses)")
        check(self.input_size % self.patch_size == 0, "input_size", self.input_size, f"a multiple of {self.patch_size}")
        check(self.mlp_hidden > 0, "mlp_ratio", self.mlp_ratio, "positive")
        check(
            self.text_dim_t5 % POOLER_HEADS == 0,
            "text_dim_t5",
            self.text_dim_t5,
            f"a multiple of the pooler's {POOLER_HEADS} heads",
        )
        check(
            self.rope_img == "extend" or re.fullmatch(r"base[1-9]\d*", self.rope_img) is not None,
            "rope_img",
            self.rope_img,
            "'extend' or 'base<pixels>' (e.g. 'base512')",
        )
        check(self.rope_convention in ROPE_CONVENTIONS, "rope_convention", self.rope_convention, str(ROPE_CONVENTIONS))
        check(
            0.0 <= self.caption_dropout_prob < 1.0,
            "caption_dropout_prob",
            self.caption_dropout_prob,
            "a probability in [0, 1)",
        )

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def extra_in_dim(self) -> int:
        """Width of the vector ``extra_embedder`` takes: pooled mT5 (+ image_meta_size sinusoids and style)."""
        extra = META_SIZES * FREQ_DIM + self.hidden_size if self.use_style_cond_and_image_meta_size else 0
        return self.pooled_dim + extra

    def layer_kinds(self) -> list[dict]:
        """Blocks ``i < depth/2 − 1`` save their output (``save``), blocks ``i > depth/2`` take a saved one (``skip``),
        the two in the middle do neither: at most three homogeneous stages."""
        half = self.depth // 2
        return [{"skip": i > half, "save": i < half - 1} for i in range(self.depth)]

    def dummy_inputs(self, batch: int = 1) -> tuple:
        s = self.input_size
        inputs = (
            np.zeros((batch, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch, self.text_len, self.text_dim), np.float32),
            np.ones((batch, self.text_len), np.int32),
            np.zeros((batch, self.text_len_t5, self.text_dim_t5), np.float32),
            np.ones((batch, self.text_len_t5), np.int32),
        )
        if self.use_style_cond_and_image_meta_size:
            inputs += (np.zeros((batch, META_SIZES), np.float32), np.zeros((batch,), np.int32))
        return inputs


# ---- RoPE ----------------------------------------------------------------------------------------------------------


def crop_region(h: int, w: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, left), (bottom, right))``: an h × w grid fitted into a base × base square, the long side filling it and
    the short side centred (the original's ``get_fill_resize_and_crop``, diffusers'
    ``get_resize_crop_region_for_grid``; Python's round, halves to even)."""
    if h / w > 1:
        rh, rw = base, int(round(base / h * w))
    else:
        rh, rw = int(round(base / w * h)), base
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions(h: int, w: int, patch_size: int, rope_img: str, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column positions (h,), (w,) float32 of an h × w token grid (see the module docstring)."""
    if rope_img == "extend":
        return np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    base = int(rope_img[4:]) // VAE_SCALE // patch_size
    start, stop = crop_region(h, w, base)

    def axis(a: float, b: float, n: int) -> np.ndarray:
        if convention == "original":  # np.linspace(start, stop, n, endpoint=False)
            return np.linspace(a, b, n, endpoint=False, dtype=np.float32)
        # diffusers: torch.linspace(start, stop·(n−1)/n, n) in float32, which steps from the nearer end with a
        # float32 step and one rounding per entry
        first, last = np.float32(a), np.float32(b * (n - 1) / n)
        if n == 1:
            return np.array([first], np.float32)
        step = np.float32((last - first) / np.float32(n - 1))
        i = np.arange(n, dtype=np.float64)
        lower = np.float64(first) + np.float64(step) * i
        upper = np.float64(last) - np.float64(step) * (n - 1 - i)
        return np.where(i < n // 2, lower, upper).astype(np.float32)

    return axis(start[0], stop[0], h), axis(start[1], stop[1], w)


@functools.lru_cache(maxsize=64)
def rope_tables(
    h: int, w: int, head_dim: int, patch_size: int, rope_img: str = "base512", convention: str = "original"
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 (h·w, head_dim/2) of the row-major token grid for ``dit_jax.nn.rope.apply_rope``: angle
    ``i`` rotates the interleaved pair ``(x[2i], x[2i+1])``; the first head_dim/4 angles are the column position times
    the frequencies ``1/theta^(2j/(head_dim/2))``, the rest the row position times the same frequencies. Positions,
    frequencies and their products are float32 as in both references (positions bit-equal to theirs, frequencies
    within 1 ulp); cos/sin are rounded from those products."""
    pos_h, pos_w = rope_positions(h, w, patch_size, rope_img, convention)
    d = head_dim // 2  # channels per axis
    exponents = (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
    freqs = np.float32(1.0) / (THETA**exponents).astype(np.float32)  # d/2 float32, as torch's float32 pow
    cols = np.broadcast_to(pos_w[None, :], (h, w)).reshape(-1)
    rows = np.broadcast_to(pos_h[:, None], (h, w)).reshape(-1)
    angles = np.concatenate([np.outer(cols, freqs), np.outer(rows, freqs)], axis=1).astype(np.float32)
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ---- layers --------------------------------------------------------------------------------------------------------


def silu_fp32(x: jax.Array) -> jax.Array:
    """SiLU computed in float32 and returned in ``x.dtype`` (the references' ``FP32_SiLU``)."""
    return nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class ProjectionMLP(nn.Module):
    """``linear_1 → fp32 SiLU → linear_2`` (``mlp_t5``, ``extra_embedder``; diffusers ``PixArtAlphaTextProjection``
    with ``silu_fp32``)."""

    hidden: int
    out_features: int
    names: tuple[str, str, str] = ("caption", "mlp", "embed")
    init_std: float | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = normal(self.init_std) if self.init_std is not None else None
        a, m, b = self.names
        x = dense(self.hidden, (a, m), dtype=self.dtype, kernel_init=init, name="linear_1")(x.astype(self.dtype))
        return dense(self.out_features, (m, b), dtype=self.dtype, kernel_init=init, name="linear_2")(silu_fp32(x))


class AttentionPool(nn.Module):
    """The mT5 attention pooler (CLIP-style ``AttentionPool``): the token mean joins the tokens, a learned
    ``positional_embedding (L+1, C)`` is added, and the mean token attends to all of them with ``heads`` heads;
    ``c_proj`` maps to ``out_features``. No mask: padding tokens count."""

    out_features: int
    heads: int = POOLER_HEADS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, c = x.shape  # B L C
        h, dh = self.heads, c // self.heads

        def pos_init(key, shape, dtype=jnp.float32):
            return jax.random.normal(key, shape, dtype) / c**0.5

        pos = self.param("positional_embedding", partitioned(pos_init, (None, "caption")), (length + 1, c), jnp.float32)
        x = x.astype(self.dtype)
        mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(self.dtype)
        x = jnp.concatenate([mean, x], axis=1) + pos[None].astype(self.dtype)  # B L+1 C
        names = ("caption", "heads", "kv")
        q = dense((h, dh), names, dtype=self.dtype, name="q_proj")(x[:, :1])  # B 1 H Dh
        k = dense((h, dh), names, dtype=self.dtype, name="k_proj")(x)
        v = dense((h, dh), names, dtype=self.dtype, name="v_proj")(x)
        # one query over ≤ 257 keys of head_dim 256: the portable path (the flash kernels want head_dim ≤ 128)
        out = dot_product_attention(q, k, v, backend="xla", kv_sharded=False)
        out = dense(self.out_features, ("heads", "kv", "caption"), dtype=self.dtype, axis=(-2, -1), name="c_proj")(out)
        return out[:, 0]  # B out


class RopeSelfAttention(nn.Module):
    """``Wqkv`` (``qkv`` (D, 3, H, Dh)), LayerNorm of q and k over head_dim, RoPE on both, attention, ``out_proj``
    (``proj``)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        qkv = dense((3, h, d // h), ("embed", None, "heads", "kv"), dtype=self.dtype, name="qkv")(x)  # B N 3 H Dh
        q = LayerNorm(EPS, names=("kv",), name="q_norm")(qkv[:, :, 0])
        k = LayerNorm(EPS, names=("kv",), name="k_norm")(qkv[:, :, 1])
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, apply_rope(k, cos, sin), qkv[:, :, 2], backend=self.backend)
        return dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), name="proj")(out)


class RopeCrossAttention(nn.Module):
    """Image tokens attend to the text: ``q_proj`` (``q`` (D, H, Dh)) and ``kv_proj`` (``kv`` (C, 2, H, Dh)),
    LayerNorm of q and k over head_dim, RoPE on q only, no mask, ``out_proj`` (``proj``)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, text: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        q = dense((h, d // h), ("embed", "heads", "kv"), dtype=self.dtype, name="q")(x)  # B N H Dh
        kv = dense((2, h, d // h), ("caption", None, "heads", "kv"), dtype=self.dtype, name="kv")(text)  # B L 2 H Dh
        q = LayerNorm(EPS, names=("kv",), name="q_norm")(q)
        k = LayerNorm(EPS, names=("kv",), name="k_norm")(kv[:, :, 0])
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, kv[:, :, 1], backend=self.backend, kv_sharded=False)
        return dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), name="proj")(out)


class HunyuanBlock(nn.Module):
    """One block (``HunYuanDiTBlock``); with ``skip`` it first mixes a saved output into x (module docstring)."""

    num_heads: int
    mlp_hidden: int
    skip: bool = False
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        text: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        skip: jax.Array | None = None,
    ) -> jax.Array:
        d = x.shape[-1]
        if self.skip:
            cat = LayerNorm(EPS, name="skip_norm")(jnp.concatenate([x, skip], axis=-1))  # B N 2D
            x = dense(d, (None, "embed"), dtype=self.dtype, name="skip_linear")(cat)
        shift = dense(d, ("embed", "modulation"), dtype=self.dtype, kernel_init=zeros, name="default_modulation")(
            silu_fp32(c)
        )  # B D
        attn = RopeSelfAttention(self.num_heads, dtype=self.dtype, backend=self.backend, name="attn1")
        x = x + attn(LayerNorm(EPS, name="norm1")(x) + shift[:, None].astype(x.dtype), cos, sin)
        cross = RopeCrossAttention(self.num_heads, dtype=self.dtype, backend=self.backend, name="attn2")
        x = x + cross(LayerNorm(EPS, name="norm3")(x), text, cos, sin)
        x = x + Mlp(self.mlp_hidden, dtype=self.dtype, name="mlp")(LayerNorm(EPS, name="norm2")(x))
        return constrain(x, _ACT)


class ShiftScale(nn.Module):
    """``linear(fp32 SiLU(c))`` split into ``(shift, scale)`` (B, D) each (the final layer's ``adaLN_modulation``)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = c.shape[-1]
        out = dense(2 * d, ("embed", "modulation"), dtype=self.dtype, kernel_init=zeros, name="linear")(silu_fp32(c))
        out = out.reshape(out.shape[0], 2, d)  # B 2 D (reshape + index: see nn.modulation.AdaLNZero)
        return out[:, 0], out[:, 1]


class FinalLayer(nn.Module):
    """``linear(modulate(LayerNorm(x), shift, scale))``, (shift, scale) from ``adaLN_modulation`` (the original's
    order; diffusers' ``norm_out`` stores (scale, shift))."""

    out_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = ShiftScale(dtype=self.dtype, name="adaLN_modulation")(c)
        x = modulate(layer_norm(x, EPS), shift, scale)
        x = dense(self.out_features, ("embed", None), dtype=self.dtype, kernel_init=zeros, name="linear")(x)
        return constrain(x, ("act_batch", "act_length", None))


class StyleEmbedder(nn.Module):
    """The style table ``embedding (1, D)`` of v1.0/v1.1 (one style, id 0)."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, style: jax.Array) -> jax.Array:
        table = self.param("embedding", partitioned(normal(1.0), ("classes", "embed")), (1, self.hidden_size))
        return jnp.take(table, style, axis=0, mode="clip").astype(self.dtype)


def _plain_body(block, x, c, text, cos, sin):
    return block(x, c, text, cos, sin, None), None


def _save_body(block, x, c, text, cos, sin):
    x = block(x, c, text, cos, sin, None)
    return x, x


def _skip_body(block, x, c, text, cos, sin, skip):
    return block(x, c, text, cos, sin, skip), None


def run_hunyuan_blocks(cfg: HunyuanConfig, x: jax.Array, c: jax.Array, text: jax.Array, cos, sin, dtype) -> jax.Array:
    """The block stack with its long skips, as a loop (``blocks_{i}``) or as up to three scanned stages
    (``stage_{j}``: the saving first half, the two middle blocks, the skip-taking second half, which scans over the
    saved outputs in reverse). Called inside ``HunyuanDiT.__call__`` (the blocks are its submodules)."""
    kinds = cfg.layer_kinds()
    common = dict(num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_hidden, dtype=dtype, backend=cfg.attention_backend)
    cls = HunyuanBlock
    if cfg.remat != "none":
        cls = nn.remat(HunyuanBlock, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_blocks)
    if not cfg.scan_blocks:
        saved = []
        for i, kind in enumerate(kinds):
            skip = saved.pop() if kind["skip"] else None
            x = cls(**common, skip=kind["skip"], name=f"blocks_{i}")(x, c, text, cos, sin, skip)
            if kind["save"]:
                saved.append(x)
        return x
    saved = None
    for j, (start, end) in enumerate(stage_bounds(kinds)):
        kind = kinds[start]
        body = _skip_body if kind["skip"] else (_save_body if kind["save"] else _plain_body)
        scanned = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 4 + ((0,) if kind["skip"] else ()),
            length=end - start,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        block = cls(**common, skip=kind["skip"], name=f"stage_{j}")
        if kind["skip"]:
            x, _ = scanned(block, x, c, text, cos, sin, saved[::-1])  # the last saved output first
        else:
            x, ys = scanned(block, x, c, text, cos, sin)
            saved = ys if kind["save"] else saved
    return x


class HunyuanDiT(nn.Module):
    """Hunyuan-DiT forward: ``apply({"params": p}, x, t, clip, clip_mask, t5, t5_mask, image_meta_size=None,
    style=None)``.

    x: NHWC latents (B, H, W, in_channels); t: DDPM timesteps (B,) or () (as diffusers' pipeline passes them);
    clip: CLIP(BERT) features (B, text_len, text_dim) and clip_mask (B, text_len), 1 = token; t5: mT5 features
    (B, text_len_t5, text_dim_t5) and t5_mask; with ``use_style_cond_and_image_meta_size`` also image_meta_size
    (B, 6) = (original h, w, target h, w, crop top, left) in pixels and style (B,) ids (0). Returns
    (B, H, W, out_channels) float32.
    """

    config: HunyuanConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        clip: jax.Array,
        clip_mask: jax.Array,
        t5: jax.Array,
        t5_mask: jax.Array,
        image_meta_size: jax.Array | None = None,
        style: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden_size
        h, w = height // p, width // p
        _check_text(cfg, b, clip, clip_mask, t5, t5_mask)

        tokens = constrain(PatchEmbed(p, d, dtype=dtype, name="x_embedder")(x), _ACT)  # B N D
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = TimestepEmbedder(d, dtype=dtype, name="t_embedder")(t)

        # text: CLIP ⊕ mlp_t5(mT5) → B (text_len + text_len_t5) text_dim; padding tokens → the learned embedding
        t5_tokens = ProjectionMLP(
            4 * cfg.text_dim_t5, cfg.text_dim, names=("caption", "mlp", "caption"), dtype=dtype, name="mlp_t5"
        )(t5)
        text = jnp.concatenate([jnp.asarray(clip).astype(dtype), t5_tokens], axis=1)
        mask = jnp.concatenate([jnp.asarray(clip_mask), jnp.asarray(t5_mask)], axis=1).astype(bool)
        padding = self.param(
            "text_embedding_padding",
            partitioned(normal(1.0), (None, "caption")),
            (cfg.text_len + cfg.text_len_t5, cfg.text_dim),
            jnp.float32,
        )
        text = jnp.where(mask[..., None], text, padding[None].astype(dtype))

        extra = [AttentionPool(cfg.pooled_dim, dtype=dtype, name="pooler")(t5)]  # B pooled_dim
        if cfg.use_style_cond_and_image_meta_size:
            if image_meta_size is None or style is None:
                raise ValueError(
                    "this Hunyuan-DiT takes style and size conditions (use_style_cond_and_image_meta_size, v1.0/v1.1):"
                    " pass image_meta_size (B, 6) and style (B,)"
                )
            meta = jnp.asarray(image_meta_size, jnp.float32)
            if meta.shape[-1] != META_SIZES or meta.ndim > 2:
                raise ValueError(f"image_meta_size must be (B, {META_SIZES}), got {meta.shape}")
            meta = jnp.broadcast_to(meta.reshape(-1, META_SIZES), (b, META_SIZES))
            extra.append(timestep_embedding(meta.reshape(-1), FREQ_DIM).reshape(b, -1).astype(dtype))
            ids = jnp.broadcast_to(jnp.asarray(style, jnp.int32).reshape(-1), (b,))
            extra.append(StyleEmbedder(d, dtype=dtype, name="style_embedder")(ids))
        elif image_meta_size is not None or style is not None:
            raise ValueError(
                "this Hunyuan-DiT has no style or size conditions (v1.2 and later): pass neither image_meta_size nor "
                "style"
            )
        extra_embedder = ProjectionMLP(
            4 * d, d, names=("caption", "mlp", "embed"), init_std=0.02, dtype=dtype, name="extra_embedder"
        )
        c = temb + extra_embedder(jnp.concatenate(extra, axis=1))  # B D

        cos, sin = rope_tables(h, w, cfg.head_dim, p, cfg.rope_img, cfg.rope_convention)
        tokens = run_hunyuan_blocks(cfg, tokens, c, text, jnp.asarray(cos), jnp.asarray(sin), dtype)

        out = FinalLayer(p * p * cfg.out_channels, dtype=dtype, name="final_layer")(tokens, c)
        return unpatchify(out, h, w, p, cfg.out_channels).astype(jnp.float32)


def _check_text(cfg: HunyuanConfig, b: int, clip, clip_mask, t5, t5_mask) -> None:
    """The text inputs must fill the learned padding's token slots exactly (both references index it per token)."""
    want = {
        "clip": (b, cfg.text_len, cfg.text_dim),
        "clip_mask": (b, cfg.text_len),
        "t5": (b, cfg.text_len_t5, cfg.text_dim_t5),
        "t5_mask": (b, cfg.text_len_t5),
    }
    got = {"clip": clip, "clip_mask": clip_mask, "t5": t5, "t5_mask": t5_mask}
    bad = [f"{k} {tuple(np.shape(v))} (expected {want[k]})" for k, v in got.items() if tuple(np.shape(v)) != want[k]]
    if bad:
        raise ValueError(
            f"Hunyuan-DiT text inputs do not match the model ({cfg.text_len} CLIP + {cfg.text_len_t5} mT5 tokens, "
            f"padded to those lengths): " + "; ".join(bad)
        )


def _dit_g2(**kw) -> HunyuanConfig:
    """DiT-g/2: 40 blocks of width 1408, 16 heads of 88, MLP 6144."""
    return HunyuanConfig(depth=40, hidden_size=1408, num_heads=16, mlp_ratio=4.3637, patch_size=2, **kw)


PRESETS: dict[str, HunyuanConfig] = {
    # 1,516,534,048 and 1,499,952,032 parameters, as diffusers' HunyuanDiT2DModel of the same config (FAMILIES.md:
    # 1.517B / 1.500B); v1.0 has the architecture of v1.1.
    "HunyuanDiT-v1.1": _dit_g2(use_style_cond_and_image_meta_size=True),
    "HunyuanDiT-v1.2": _dit_g2(use_style_cond_and_image_meta_size=False),
}


# ---- the family -------------------------------------------------------------------------------------------------

# HunyuanDiTPipeline's DDPMScheduler (FAMILIES.md: the v1.1 hub scheduler config): v-prediction, scaled-linear betas
# 0.00085 → 0.03, "leading" spacing with steps_offset 1. v1.2 and later train with beta_end 0.02: the original
# repository's --beta-end default, which its loader says v1.0/v1.1 weights must override with 0.03.
_SCHEDULER_V11 = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.03,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
}
_SCHEDULER_V12 = {**_SCHEDULER_V11, "beta_end": 0.02}
_TEXT_KEYS = ("clip", "clip_mask", "t5", "t5_mask")
_SIZE_KEYS = ("image_meta_size", "style")
_SIZE_OPTIONS = ("original_size", "target_size", "crops_coords_top_left")
# HunyuanDiTPipeline's resolution binning: its standard width/height ratios, each with its (width, height) pixel sizes
# (diffusers' STANDARD_RATIO / STANDARD_SHAPE); the supported shapes are all of them.
BINNING_SHAPES: tuple[tuple[float, tuple[tuple[int, int], ...]], ...] = (
    (1.0, ((1024, 1024), (1280, 1280))),
    (4.0 / 3.0, ((1024, 768), (1152, 864), (1280, 960))),
    (3.0 / 4.0, ((768, 1024), (864, 1152), (960, 1280))),
    (16.0 / 9.0, ((1280, 768),)),
    (9.0 / 16.0, ((768, 1280),)),
)
BINNING_MULTIPLE = 16  # HunyuanDiTPipeline floors height and width to multiples of 16 px (VAE factor 8 × patch 2)


def binned_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of HunyuanDiTPipeline's resolution binning: the request floored to multiples of 16 px, kept
    if it is a supported shape, else the shape of the closest standard width/height ratio whose area is closest
    (ties: the first in the table)."""
    m = BINNING_MULTIPLE
    h, w = (height // m) * m, (width // m) * m
    if h <= 0 or w <= 0:
        raise ValueError(f"height={height}, width={width}: resolution binning needs at least {m} pixels a side")
    if any((w, h) in shapes for _, shapes in BINNING_SHAPES):
        return h, w
    ratio, area = w / h, w * h
    _, shapes = min(BINNING_SHAPES, key=lambda entry: abs(entry[0] - ratio))
    w, h = min(shapes, key=lambda wh: abs(wh[0] * wh[1] - area))
    return h, w


class HunyuanFamily(Family):
    """Text-to-image Hunyuan-DiT: CLIP(BERT) and mT5 features with their masks (the model replaces padding tokens by
    its learned embedding), style and size conditions for v1.0/v1.1, learned sigma, DDPM v-prediction with
    ``HunyuanDiTPipeline``'s defaults (50 steps, guidance 5).

    Conditions: ``{"clip", "clip_mask", "t5", "t5_mask"}`` plus ``{"image_meta_size", "style"}`` for v1.1. The null
    condition (caption dropout, guidance grids) is zero features with all-zero masks, i.e. every text token is the
    learned padding embedding; the pipelines encode the negative prompt instead, as diffusers does.
    """

    name = "hunyuan"
    display_name = "Hunyuan-DiT"
    config_class = HunyuanConfig
    module_class = HunyuanDiT
    presets = PRESETS
    conversion = "dit_jax.convert.hunyuan"
    task = "text-to-image"
    scheduler_config = _SCHEDULER_V11
    sampling = {"num_inference_steps": 50, "guidance_scale": 5.0}
    diffusers_pipelines = {"HunyuanDiTPipeline": {}}

    def scheduler_config_for(self, config: HunyuanConfig) -> dict:
        """beta_end 0.03 for v1.0/v1.1 (style and size conditions), 0.02 for v1.2 and later."""
        return dict(_SCHEDULER_V11 if config.use_style_cond_and_image_meta_size else _SCHEDULER_V12)

    def condition(self, config, batch):
        """The text features and masks; v1.1 also ``image_meta_size`` (default: the latent's own pixel size as the
        original and target size, no crop) and ``style`` (default 0)."""
        cond = {k: batch[k] for k in _TEXT_KEYS}
        if config.use_style_cond_and_image_meta_size:
            b = batch["t5"].shape[0]
            meta, style = batch.get("image_meta_size"), batch.get("style")
            if meta is None:
                hp, wp = batch["x"].shape[1] * VAE_SCALE, batch["x"].shape[2] * VAE_SCALE
                meta = jnp.tile(jnp.asarray([[hp, wp, hp, wp, 0, 0]], jnp.float32), (b, 1))
            cond["image_meta_size"] = meta
            cond["style"] = jnp.zeros((b,), jnp.int32) if style is None else style
        return cond

    def apply(self, module, params, x, t, condition):
        c = condition
        return module.apply(
            {"params": params},
            x,
            t,
            c["clip"],
            c["clip_mask"],
            c["t5"],
            c["t5_mask"],
            c.get("image_meta_size"),
            c.get("style"),
        )

    def drop_condition(self, config, condition, drop):
        """Dropped rows get zero text features and all-zero masks (every token becomes the learned padding)."""
        drop = jnp.asarray(drop, bool)
        out = dict(condition)
        for k in _TEXT_KEYS:
            v = jnp.asarray(condition[k])
            keep = drop.reshape((-1,) + (1,) * (v.ndim - 1))
            out[k] = jnp.where(keep, jnp.zeros_like(v), v)
        return out

    def guidance_conditions(self, config, condition):
        cond = {k: jnp.asarray(v) for k, v in condition.items()}
        null = {k: (jnp.zeros_like(v) if k in _TEXT_KEYS else v) for k, v in cond.items()}
        return cond, null

    def dropout_prob(self, config):
        return config.caption_dropout_prob

    def condition_specs(self, config, batch_size):
        b = batch_size
        specs = {
            "clip": jax.ShapeDtypeStruct((b, config.text_len, config.text_dim), jnp.float32),
            "clip_mask": jax.ShapeDtypeStruct((b, config.text_len), jnp.int32),
            "t5": jax.ShapeDtypeStruct((b, config.text_len_t5, config.text_dim_t5), jnp.float32),
            "t5_mask": jax.ShapeDtypeStruct((b, config.text_len_t5), jnp.int32),
        }
        if config.use_style_cond_and_image_meta_size:
            specs["image_meta_size"] = jax.ShapeDtypeStruct((b, META_SIZES), jnp.float32)
            specs["style"] = jax.ShapeDtypeStruct((b,), jnp.int32)
        return specs

    def grid_condition(self, config, sample, batch):
        """The text (and size conditions) of the first training batch (``per_class × num_classes`` rows), in a
        square grid."""
        n = min(int(sample["per_class"]) * int(sample["num_classes"]), batch["x"].shape[0])
        return self.condition(config, batch), n, max(1, int(np.sqrt(n)))

    def size_condition(
        self, config, height, width, batch, original_size=None, target_size=None, crops_coords_top_left=None
    ):
        """v1.1: ``image_meta_size`` = ``original_size`` (default (1024, 1024)) + ``target_size`` (default the sampled
        (height, width)) + ``crops_coords_top_left`` (default (0, 0)) and style 0, as ``HunyuanDiTPipeline`` builds
        them (the original repository's sampler passes the target as (width, height); the same at square sizes).
        v1.2: nothing."""
        if not config.use_style_cond_and_image_meta_size:
            return {}
        sizes = {"original_size": original_size or ORIGINAL_SIZE, "target_size": target_size or (height, width),
                 "crops_coords_top_left": crops_coords_top_left or (0, 0)}  # fmt: skip
        for name, value in sizes.items():
            if np.shape(value) != (2,):
                raise ValueError(f"{name}={value!r} must be two numbers (height, width) / (top, left) in pixels")
        meta = np.concatenate([np.asarray(v, np.float32) for v in sizes.values()])[None]
        return {"image_meta_size": np.tile(meta, (batch, 1)), "style": np.zeros((batch,), np.int32)}

    def size_condition_options(self, config):
        """v1.1: ``original_size``, ``target_size`` and ``crops_coords_top_left`` (HunyuanDiTPipeline's arguments);
        v1.2 has no size conditions."""
        return _SIZE_OPTIONS if config.use_style_cond_and_image_meta_size else ()

    def binned_size(self, config, height, width):
        """HunyuanDiTPipeline's resolution binning (``binned_size``; any model size): the image is sampled and
        returned at the binned size."""
        return binned_size(height, width)

    def sampler_options(self, config, num_steps, image_seq_len):
        """HunyuanDiTPipeline keeps the first ``in_channels`` of a learned-sigma output, so its DDPM steps use the
        scheduler's fixed variance (``fixed_small``), not the learned one."""
        return {"variance_type": "fixed_small"}

    def text_width(self, config):
        """The width of the joined text tokens (CLIP's; mT5 goes through ``mlp_t5`` to it)."""
        return config.text_dim

    def max_sequence_length(self, config):
        """mT5 tokens (256); CLIP reads 77."""
        return config.text_len_t5

    def text_slots(self, config):
        """HunyuanDiTPipeline's encoders, both with their padding masks: the bilingual CLIP (a BERT,
        ``text_encoder``, 77 tokens) and mT5 (``text_encoder_2``, 256 tokens), each reading ``prompt``."""
        return (
            TextSlot("clip", encoder="text_encoder", tokenizer="tokenizer", max_length=config.text_len),
            TextSlot("t5", encoder="text_encoder_2", tokenizer="tokenizer_2", max_length=config.text_len_t5),
        )

    def text_condition(self, config, features, max_sequence_length=None):
        """Each slot's last hidden state and mask, as HunyuanDiTPipeline passes them (``prompt_embeds``,
        ``prompt_attention_mask``, ``prompt_embeds_2``, ``prompt_attention_mask_2``)."""
        clip, t5 = features["clip"], features["t5"]
        return {"clip": clip["hidden"], "clip_mask": clip["mask"], "t5": t5["hidden"], "t5_mask": t5["mask"]}

    def forward_flops(self, config, height, width, text_length=None):
        """``text_length``: the cross-attention keys (default CLIP + mT5 tokens, 333)."""
        p, d, c = config.patch_size, config.hidden_size, config.text_dim
        n = (height // p) * (width // p)
        length = text_length if text_length is not None else config.text_len + config.text_len_t5
        lt, ct = config.text_len_t5, config.text_dim_t5
        flops = 2 * n * p * p * config.in_channels * d + 2 * (FREQ_DIM * d + d * d)  # patches, timestep
        flops += 2 * lt * (ct * 4 * ct + 4 * ct * c)  # mlp_t5
        flops += 2 * ct * ct + 2 * (lt + 1) * 2 * ct * ct + 4 * (lt + 1) * ct + 2 * ct * config.pooled_dim  # pooler
        flops += 2 * (config.extra_in_dim * 4 * d + 4 * d * d)  # extra_embedder
        for kind in config.layer_kinds():
            flops += 2 * d * d  # default_modulation
            flops += 2 * n * 4 * d * d + 4 * n * n * d  # self-attention
            flops += 2 * n * 2 * d * d + 2 * length * c * 2 * d + 4 * n * length * d  # cross-attention
            flops += 2 * n * 2 * d * config.mlp_hidden  # MLP
            flops += 2 * n * 2 * d * d if kind["skip"] else 0  # skip_linear
        flops += 2 * d * 2 * d + 2 * n * d * p * p * config.out_channels  # final layer
        return int(flops)


FAMILY = register(HunyuanFamily())
