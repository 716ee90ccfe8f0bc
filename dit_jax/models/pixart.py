"""PixArt-α / PixArt-Σ: text-to-image DiT with adaLN-single, caption cross-attention and KV token compression.

Matches PixArt-sigma ``PixArtMS`` (``PixArt_blocks.py``: ``AttentionKVCompress``) and diffusers
``PixArtTransformer2DModel`` (MODELS.md §2). Positions are recomputed for any (H, W) from ``base_size`` and
``pe_interpolation``, so multi-scale (non-square) latents work.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import aspect_ratios
from dit_jax.models.config import ExecutionConfig, check, check_patch_transformer
from dit_jax.models.dit import block_flops, embed_flops
from dit_jax.models.family import Family, register
from dit_jax.nn.attention import CrossAttention, SelfAttention
from dit_jax.nn.embeddings import (
    CaptionEmbedder,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    sincos_pos_embed,
    unpatchify,
)
from dit_jax.nn.layers import compute_dtype, dense, layer_norm, modulate, normal
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.modulation import T2IFinalLayer, scale_shift_table
from dit_jax.nn.stack import run_blocks
from dit_jax.parallel.rules import constrain

KV_COMPRESS_OPS = ("conv", "avg", "discard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PixArtConfig(ExecutionConfig):
    """Every architecture and numerics switch of a PixArt model. Defaults: PixArt-Σ XL/2 1024-MS."""

    family: ClassVar[str] = "pixart"

    input_size: int = 128  # training latent size; base_size = input_size // patch_size unless given
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int | None = 4096  # text-encoder width; None: captions are fed unprojected
    cross_attention_dim: int | None = None  # caption width when caption_channels is None
    caption_length: int = 300  # tokens of the learned null caption (120 for α, 300 for Σ)
    learned_null_caption: bool = True  # original checkpoints store y_embedder.y_embedding
    micro_conditions: bool = False  # α-1024-MS resolution / aspect-ratio embedders
    qk_norm: bool = False
    learn_sigma: bool = True
    pe_interpolation: float = 2.0
    base_size: int | None = None
    kv_compress_layers: tuple[int, ...] = ()
    kv_compress_ratio: int = 2
    kv_compress_op: str = "conv"
    caption_dropout_prob: float = 0.1
    norm_eps: float = 1e-6
    timestep_freq_shift: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_patch_transformer(self)
        d = self.hidden_size
        check(not self.micro_conditions or d % 3 == 0, "hidden_size", d, "a multiple of 3 with micro_conditions")
        check(
            self.caption_channels is not None or self.cross_attention_dim is not None,
            "cross_attention_dim",
            self.cross_attention_dim,
            "the caption width when caption_channels is None",
        )
        check(
            self.kv_compress_op in KV_COMPRESS_OPS,
            "kv_compress_op",
            self.kv_compress_op,
            f"one of {KV_COMPRESS_OPS}",
        )
        check(self.kv_compress_ratio >= 2, "kv_compress_ratio", self.kv_compress_ratio, "an integer >= 2")
        bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
        check(not bad, "kv_compress_layers", self.kv_compress_layers, f"layer indices in [0, {self.depth})")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_base_size(self) -> int:
        return self.base_size if self.base_size is not None else self.input_size // self.patch_size

    @property
    def caption_width(self) -> int:
        return self.caption_channels if self.caption_channels is not None else self.cross_attention_dim

    def layer_kinds(self) -> list[dict]:
        compress = (self.kv_compress_ratio, self.kv_compress_op)
        return [{"kv_compress": compress if i in self.kv_compress_layers else None} for i in range(self.depth)]

    def dummy_inputs(self, batch: int = 1) -> tuple:
        """Inputs for ``init``/``eval_shape``. No parameter depends on the spatial size, so with KV compression the
        latent is rounded up to a token grid divisible by the ratio (e.g. 1024 px = 64×64 tokens with R = 3)."""
        s = self.input_size
        if self.kv_compress_layers:
            m = self.patch_size * self.kv_compress_ratio
            s = -(-s // m) * m
        inputs = (
            np.zeros((batch, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch, self.caption_length, self.caption_width), np.float32),
            np.ones((batch, self.caption_length), np.int32),
        )
        if self.micro_conditions:
            inputs += (np.full((batch, 2), 8.0 * s, np.float32), np.ones((batch, 1), np.float32))
        return inputs


class PixArtBlock(nn.Module):
    """``x += gate·attn(mod(norm x))``; ``x += cross_attn(x, caption)``; ``x += gate·mlp(mod(norm x))``."""

    num_heads: int
    mlp_hidden: int
    grid: tuple[int, int]
    norm_eps: float = 1e-6
    qk_norm: bool = False
    kv_compress: tuple[int, str] | None = None
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None, t0: jax.Array) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = scale_shift_table(self, t0, 6)
        attn = SelfAttention(
            self.num_heads,
            dtype=self.dtype,
            qk_norm=self.qk_norm,
            kv_compress=self.kv_compress,
            grid=self.grid,
            backend=self.backend,
            name="attn",
        )
        x = x + gate_msa[:, None] * attn(modulate(layer_norm(x, self.norm_eps), shift_msa, scale_msa))
        cross = CrossAttention(
            self.num_heads, dtype=self.dtype, backend=self.backend, zero_init_proj=True, name="cross_attn"
        )
        x = x + cross(x, context, mask)
        mlp = Mlp(self.mlp_hidden, dtype=self.dtype, name="mlp")
        x = x + gate_mlp[:, None] * mlp(modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class PixArt(nn.Module):
    """PixArt forward: ``apply({"params": p}, x, t, caption, caption_mask, resolution, aspect_ratio, drop_caption=)``.

    x NHWC latents; t float timesteps; caption (B, L, C_text); caption_mask (B, L), 1 = keep; resolution (B, 2) as
    (h, w) in pixels and aspect_ratio (B, 1) = h / w for micro-conditioned models; drop_caption (B,) bool swaps in the
    learned null caption. Returns (B, H, W, out_channels) float32.
    """

    config: PixArtConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array | None = None,
        resolution: jax.Array | None = None,
        aspect_ratio: jax.Array | None = None,
        *,
        drop_caption: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden_size
        h, w = height // p, width // p

        tokens = PatchEmbed(p, d, dtype=dtype, name="x_embedder")(x)
        pos = sincos_pos_embed(h, w, d, base_size=cfg.grid_base_size, interpolation=cfg.pe_interpolation)
        tokens = constrain(tokens + jnp.asarray(pos, dtype)[None], ("act_batch", "act_length", "act_embed"))

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = TimestepEmbedder(d, freq_shift=cfg.timestep_freq_shift, dtype=dtype, name="t_embedder")(t)
        if cfg.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError(
                    "this PixArt model is micro-conditioned: pass resolution (B, 2) and aspect_ratio (B, 1)"
                )
            csize = SizeEmbedder(d // 3, dtype=dtype, name="csize_embedder")(resolution, b)
            ar = SizeEmbedder(d // 3, dtype=dtype, name="ar_embedder")(aspect_ratio, b)
            temb = temb + jnp.concatenate([csize, ar], axis=1)
        t0 = dense(6 * d, ("embed", "modulation"), dtype=dtype, kernel_init=normal(0.02), name="t_block")(nn.silu(temb))

        context = CaptionEmbedder(
            d,
            cfg.caption_channels,
            cfg.caption_length,
            cfg.learned_null_caption,
            dtype=dtype,
            name="y_embedder",
        )(caption, drop_caption)
        if caption_mask is not None and caption_mask.shape != caption.shape[:2]:
            raise ValueError(f"caption_mask shape {caption_mask.shape} does not match captions {caption.shape[:2]}")

        block_kwargs = dict(
            num_heads=cfg.num_heads,
            mlp_hidden=int(d * cfg.mlp_ratio),
            grid=(h, w),
            norm_eps=cfg.norm_eps,
            qk_norm=cfg.qk_norm,
            dtype=dtype,
            backend=cfg.attention_backend,
        )
        layers = [dict(block_kwargs, **kind) for kind in cfg.layer_kinds()]
        tokens = run_blocks(
            PixArtBlock, layers, tokens, context, caption_mask, t0, scan=cfg.scan_blocks, remat=cfg.remat
        )

        out = T2IFinalLayer(p * p * cfg.out_channels, dtype=dtype, name="final_layer")(tokens, temb)
        return unpatchify(out, h, w, p, cfg.out_channels).astype(jnp.float32)


def _xl2(**kw) -> PixArtConfig:
    return PixArtConfig(depth=28, hidden_size=1152, num_heads=16, patch_size=2, **kw)


PRESETS: dict[str, PixArtConfig] = {
    # PixArt-α: T5 captions of 120 tokens; α-1024-MS adds micro-conditions.
    "PixArt-XL-2-256x256": _xl2(input_size=32, pe_interpolation=1.0, caption_length=120),
    "PixArt-XL-2-512x512": _xl2(input_size=64, pe_interpolation=1.0, caption_length=120),
    "PixArt-XL-2-1024-MS": _xl2(input_size=128, pe_interpolation=2.0, caption_length=120, micro_conditions=True),
    # PixArt-Σ: 300 tokens, pe_interpolation = image_size / 512.
    "PixArt-Sigma-XL-2-256x256": _xl2(input_size=32, pe_interpolation=0.5),
    "PixArt-Sigma-XL-2-512-MS": _xl2(input_size=64, pe_interpolation=1.0),
    "PixArt-Sigma-XL-2-1024-MS": _xl2(input_size=128, pe_interpolation=2.0),
    "PixArt-Sigma-XL-2-2K-MS": _xl2(input_size=256, pe_interpolation=4.0),
}


def enable_kv_compress(
    config: PixArtConfig,
    params: dict,
    layers: tuple[int, ...] | None = None,
    *,
    ratio: int = 2,
    op: str = "conv",
) -> tuple[PixArtConfig, dict]:
    """Turn on KV compression for a model trained without it (PixArt-Σ weak-to-strong fine-tuning).

    ``layers`` defaults to the deep half (14–27 of 28). New ``conv`` parameters get Conv Avg Init: the depthwise
    kernel is 1/R² (average pooling), its bias 0, and the LayerNorm the identity affine (scale 1, bias 0).
    """
    from dit_jax.nn.stack import scan_layout, unscan_layout

    if config.kv_compress_layers:
        raise ValueError(f"KV compression is already on for layers {config.kv_compress_layers}")
    if layers is None:
        layers = tuple(range(config.depth // 2, config.depth))
    new = dataclasses.replace(config, kv_compress_layers=tuple(layers), kv_compress_ratio=ratio, kv_compress_op=op)
    flat = unscan_layout(params, config.layer_kinds()) if config.scan_blocks else dict(params)
    if op == "conv":
        c = config.hidden_size
        for i in new.kv_compress_layers:
            block = dict(flat[f"blocks_{i}"])
            block["attn"] = dict(block["attn"])
            block["attn"]["compress"] = {
                "sr": {
                    "kernel": np.full((ratio, ratio, 1, c), 1.0 / ratio**2, np.float32),
                    "bias": np.zeros(c, np.float32),
                },
                "norm": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)},
            }
            flat[f"blocks_{i}"] = block
    return new, (scan_layout(flat, new.layer_kinds()) if new.scan_blocks else flat)


# diffusers' resolution-binning tables are PixArt's aspect-ratio tables, keyed by the transformer's sample size
# (latent side) as the diffusers pipelines pick them.
ASPECT_RATIO_BINS: dict[int, tuple[tuple[int, int], ...]] = {
    32: aspect_ratios.ASPECT_RATIO_256,
    64: aspect_ratios.ASPECT_RATIO_512,
    128: aspect_ratios.ASPECT_RATIO_1024,
    256: aspect_ratios.ASPECT_RATIO_2048,
}


class PixArtFamily(Family):
    """Text-to-image PixArt-α/Σ: T5 captions with masks, a learned null caption for dropout, micro-conditions (α-1024),
    KV compression, and the diffusers PixArt pipelines' DPM-Solver++ defaults."""

    name = "pixart"
    display_name = "PixArt"
    config_class = PixArtConfig
    module_class = PixArt
    presets = PRESETS
    conversion = "dit_jax.convert.pixart"
    task = "text-to-image"
    # The diffusers PixArt-α/Σ converters write DPMSolverMultistepScheduler() (linear betas 1e-4..0.02, DPM-Solver++
    # 2M); 20 steps and guidance 4.5 are PixArt{Alpha,Sigma}Pipeline.__call__'s defaults.
    scheduler_config = {
        "_class_name": "DPMSolverMultistepScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
    }
    sampling = {"num_inference_steps": 20, "guidance_scale": 4.5}
    # diffusers pipeline classes → their max_sequence_length default
    diffusers_pipelines = {
        "PixArtSigmaPipeline": {"max_sequence_length": 300},
        "PixArtAlphaPipeline": {"max_sequence_length": 120},
    }
    _KEYS = ("caption", "caption_mask", "resolution", "aspect_ratio")

    def condition(self, config, batch):
        cond = {"caption": batch["caption"], "caption_mask": batch.get("caption_mask")}
        if config.micro_conditions:
            cond.update(resolution=batch.get("resolution"), aspect_ratio=batch.get("aspect_ratio"))
        return cond

    def apply(self, module, params, x, t, condition):
        c = condition
        return module.apply(
            {"params": params},
            x,
            t,
            c["caption"],
            c.get("caption_mask"),
            c.get("resolution"),
            c.get("aspect_ratio"),
            drop_caption=c.get("drop"),
        )

    def drop_condition(self, config, condition, drop):
        return dict(condition, drop=drop)

    def guidance_conditions(self, config, condition):
        """The learned null caption (``drop``) attending to every token, as the original PixArt sampling scripts."""
        cond = dict(condition, drop=jnp.zeros(condition["caption"].shape[0], bool))
        if cond.get("caption_mask") is not None:
            cond["caption_mask"] = jnp.asarray(cond["caption_mask"])
        null = dict(cond, drop=jnp.ones_like(cond["drop"]))
        if null.get("caption_mask") is not None:
            null["caption_mask"] = jnp.ones_like(null["caption_mask"])
        return cond, null

    def dropout_prob(self, config):
        return config.caption_dropout_prob

    def condition_specs(self, config, batch_size):
        b, length = batch_size, config.caption_length
        specs = {
            "caption": jax.ShapeDtypeStruct((b, length, config.caption_width), jnp.float32),
            "caption_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
        }
        if config.micro_conditions:
            specs["resolution"] = jax.ShapeDtypeStruct((b, 2), jnp.float32)
            specs["aspect_ratio"] = jax.ShapeDtypeStruct((b, 1), jnp.float32)
        return specs

    def grid_condition(self, config, sample, batch):
        """The captions of the first training batch (as many as ``per_class × num_classes``), in a square grid."""
        n = min(int(sample["per_class"]) * int(sample["num_classes"]), batch["x"].shape[0])
        return {k: batch[k] for k in self._KEYS if k in batch}, n, max(1, int(np.sqrt(n)))

    def grid_multiple(self, config):
        return config.kv_compress_ratio if config.kv_compress_layers else 1

    def grid_constraint(self, config):
        return f"KV compression with ratio {config.kv_compress_ratio}"

    def size_condition(self, config, height, width, batch):
        if not config.micro_conditions:  # α-1024 takes the sampled size, as diffusers' α pipeline
            return {}
        return {
            "resolution": np.tile(np.array([[height, width]], np.float32), (batch, 1)),
            "aspect_ratio": np.full((batch, 1), height / width, np.float32),
        }

    def aspect_ratio_bins(self, config):
        return ASPECT_RATIO_BINS.get(config.input_size)

    def text_width(self, config):
        return config.caption_width

    def max_sequence_length(self, config):
        """α: 120 caption tokens (its learned null caption's length when it has one), Σ: 300."""
        if config.learned_null_caption:
            return config.caption_length
        return 120 if config.micro_conditions else 300

    def text_condition(self, config, features, max_sequence_length=None):
        return {"caption": features["t5"]["hidden"], "caption_mask": features["t5"]["mask"]}

    def learned_null_length(self, config):
        return config.caption_length if config.learned_null_caption else None

    def adapt_params(self, source, params, target):
        """Weak-to-strong fine-tuning: a target with KV compression gets it enabled (Conv Avg Init)."""
        if target.kv_compress_layers and not source.kv_compress_layers:
            return enable_kv_compress(
                source, params, target.kv_compress_layers, ratio=target.kv_compress_ratio, op=target.kv_compress_op
            )
        return source, params

    def forward_flops(self, config, height, width, text_length=None):
        p, d = config.patch_size, config.hidden_size
        n = (height // p) * (width // p)
        length = text_length if text_length is not None else config.caption_length
        width_c = config.caption_width
        flops = embed_flops(config, n) + 2 * d * 6 * d  # t_block
        if config.caption_channels is not None:
            flops += 2 * length * (width_c * d + d * d)  # caption projection
            width_c = d
        r2 = config.kv_compress_ratio**2
        for i in range(config.depth):
            keys = n // r2 if i in config.kv_compress_layers else n
            flops += block_flops(d, int(d * config.mlp_ratio), n, keys)  # self-attention + MLP
            flops += 2 * n * d * d * 2 + 2 * length * width_c * 2 * d + 4 * n * length * d  # cross-attention
        return int(flops)


FAMILY = register(PixArtFamily())
