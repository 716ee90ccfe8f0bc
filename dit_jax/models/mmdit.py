"""SD3 / SD3.5 MM-DiT (Esser et al., 2024): joint attention over an image and a text stream, adaLN-Zero in each.

Matches Stability-AI ``MMDiTX`` (``sd3.5/mmditx.py``) and diffusers ``SD3Transformer2DModel`` (MODELS.md §3). The
positional table is stored (``pos_embed``, pos_embed_max_size² rows) and centre-cropped to each latent's patch grid,
so any size up to pos_embed_max_size·patch works, square or not. SD3.5 adds RMS qk-norm per head and, in MMDiT-X
(SD3.5-medium), a second self-attention ``attn2`` on the image stream of the ``dual_attention_layers``.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check, check_patch_transformer
from dit_jax.models.dit import block_flops, embed_flops
from dit_jax.models.family import Family, TextSlot, register
from dit_jax.nn.attention import dot_product_attention, joint_attention
from dit_jax.nn.embeddings import PatchEmbed, TimestepEmbedder, sincos_pos_embed, unpatchify
from dit_jax.nn.layers import RMSNorm, compute_dtype, dense, layer_norm, modulate, normal, partitioned
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.modulation import AdaLNZero, FinalLayer
from dit_jax.nn.stack import REMAT_POLICIES, run_blocks
from dit_jax.parallel.rules import constrain

QK_NORMS = (None, "rms_norm")
NORM_EPS = 1e-6  # every LayerNorm (no affine) and the RMS qk-norm, in both references
CLIP_TOKENS = 77  # CLIP-L ⊕ CLIP-G hidden states (zero-padded to joint_attention_dim), before the T5 tokens
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default
_ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MMDiTConfig(ExecutionConfig):
    """Every architecture switch of an SD3/SD3.5 MM-DiT, diffusers ``SD3Transformer2DModel`` names where they exist.
    Defaults: SD3-medium.

    ``input_size`` is diffusers' ``sample_size`` (the training latent side; it sets only the sin-cos table a fresh
    ``pos_embed`` starts from); ``num_heads`` is ``num_attention_heads`` and ``hidden_size`` = heads × head_dim
    (= ``caption_projection_dim``); ``depth`` is ``num_layers``. ``qk_norm``: None or ``"rms_norm"`` (RMSNorm over
    head_dim, eps 1e-6, learned scale, both streams and ``attn2``). ``dual_attention_layers``: the MMDiT-X blocks
    whose image stream also runs ``attn2``.
    """

    family: ClassVar[str] = "sd3"

    input_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    joint_attention_dim: int = 4096  # text sequence width: T5-XXL, CLIP zero-padded to it
    pooled_projection_dim: int = 2048  # pooled CLIP-L ⊕ CLIP-G
    pos_embed_max_size: int = 192
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("input_size", "patch_size", "in_channels", "out_channels", "depth", "pos_embed_max_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        for name in ("joint_attention_dim", "pooled_projection_dim"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        check_patch_transformer(self)
        check(self.qk_norm in QK_NORMS, "qk_norm", self.qk_norm, f"one of {QK_NORMS}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        check(not bad, "dual_attention_layers", self.dual_attention_layers, f"layer indices in [0, {self.depth})")
        grid = self.input_size // self.patch_size
        check(
            grid <= self.pos_embed_max_size,
            "input_size",
            self.input_size,
            f"at most pos_embed_max_size·patch_size = {self.pos_embed_max_size * self.patch_size}",
        )

    @property
    def learn_sigma(self) -> bool:
        return False  # rectified flow: the output is the velocity, no variance channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_kinds(self) -> list[dict]:
        """Dual-attention blocks, plain blocks and the last (text side pre-only) block are different kinds."""
        dual = set(self.dual_attention_layers)
        return [{"dual": i in dual, "pre_only": i == self.depth - 1} for i in range(self.depth)]

    def dummy_inputs(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        s = self.input_size
        return (
            np.zeros((batch, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch, CLIP_TOKENS + T5_TOKENS, self.joint_attention_dim), np.float32),
            np.zeros((batch, self.pooled_projection_dim), np.float32),
        )


def sincos_table(side: int, dim: int, base_size: int) -> jax.Array:
    """The sin-cos table diffusers starts ``pos_embed`` from: ``sincos_pos_embed(side, side, dim, base_size=...)``
    (positions ``arange(side) · base_size / side``), assembled from its 1-D half so the host never builds the
    side²·dim table (384²·1536 for SD3.5-medium)."""
    row = sincos_pos_embed(1, side, dim, base_size=base_size)[:, : dim // 2]  # (side, dim/2): the column half
    half = (side, side, dim // 2)
    cols = jnp.broadcast_to(jnp.asarray(row)[None, :, :], half)  # token (h, w) → column w
    rows = jnp.broadcast_to(jnp.asarray(row)[:, None, :], half)  # → row h
    return jnp.concatenate([cols, rows], axis=-1).reshape(side * side, dim)


class VectorEmbedder(nn.Module):
    """The pooled-text MLP ``linear_1 → SiLU → linear_2`` (SAI ``VectorEmbedder``, diffusers ``text_embedder``)."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        y = dense(self.hidden_size, ("caption", "mlp"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_1")(y)
        y = nn.silu(y)
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_2")(y)


class Attention(nn.Module):
    """q/k/v of one stream (fused ``qkv`` (D, 3, H, Dh), optional RMS ``ln_q``/``ln_k`` over Dh) and its output
    ``proj`` (H, Dh, D); ``project`` and ``output`` are used around a joint attention, ``__call__`` is self-attention.
    """

    hidden_size: int
    num_heads: int
    qk_norm: bool = False
    dtype: Any = jnp.float32
    backend: str = "auto"

    def setup(self):
        d, h = self.hidden_size, self.num_heads
        self.qkv = dense((3, h, d // h), ("embed", None, "heads", "kv"), dtype=self.dtype)
        if self.qk_norm:
            self.ln_q = RMSNorm(eps=NORM_EPS, dtype=None, names=("kv",))
            self.ln_k = RMSNorm(eps=NORM_EPS, dtype=None, names=("kv",))
        self.proj = dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qkv = self.qkv(x)  # B T 3 H Dh
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q, k = self.ln_q(q), self.ln_k(k)
        return constrain(q, ("act_batch", "act_length", "act_heads", "act_kv")), k, v

    def output(self, out: jax.Array) -> jax.Array:
        return self.proj(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.project(x)
        return self.output(dot_product_attention(q, k, v, backend=self.backend))


class StreamBlock(nn.Module):
    """One stream of a joint block (SAI ``DismantledBlock``: ``x_block`` or ``context_block``).

    ``pre``: adaLN chunks of ``c`` and the modulated LayerNorm's q, k, v. ``post``: ``x += gate·proj(attn)``
    (+ ``gate2·attn2(mod2(norm x))`` when ``dual``), then ``x += gate·mlp(mod(norm x))``. ``pre_only`` (the last
    block's text side) has 2 chunks (shift, scale), no ``proj`` and no MLP.
    """

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    qk_norm: bool = False
    dual: bool = False
    pre_only: bool = False
    dtype: Any = jnp.float32
    backend: str = "auto"

    def setup(self):
        chunks = 2 if self.pre_only else (9 if self.dual else 6)
        self.adaLN_modulation = AdaLNZero(chunks, dtype=self.dtype)
        kw = dict(hidden_size=self.hidden_size, num_heads=self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype)
        self.attn = Attention(**kw, backend=self.backend)
        if self.dual:
            self.attn2 = Attention(**kw, backend=self.backend)
        if not self.pre_only:
            self.mlp = Mlp(self.mlp_hidden, dtype=self.dtype)

    def pre(self, x: jax.Array, c: jax.Array):
        mods = self.adaLN_modulation(c)
        normed = layer_norm(x, NORM_EPS)
        return self.attn.project(modulate(normed, mods[0], mods[1])), (normed, mods)

    def post(self, x: jax.Array, attn_out: jax.Array, state) -> jax.Array:
        normed, mods = state
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa[:, None] * self.attn.output(attn_out)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2))
        return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """``(x, context) → (x, context)``: both streams' q/k/v attend jointly over [image, text]. In the last block
    (``pre_only``) only the image queries are needed: the text side's output is dropped, context passes unchanged."""

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    qk_norm: bool = False
    dual: bool = False
    pre_only: bool = False
    dtype: Any = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], c: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, ctx = carry  # B N D, B L D
        kw = dict(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            mlp_hidden=self.mlp_hidden,
            qk_norm=self.qk_norm,
            dtype=self.dtype,
            backend=self.backend,
        )
        x_block = StreamBlock(**kw, dual=self.dual, name="x_block")
        context_block = StreamBlock(**kw, pre_only=self.pre_only, name="context_block")
        (xq, xk, xv), x_state = x_block.pre(x, c)
        (cq, ck, cv), c_state = context_block.pre(ctx, c)
        if self.pre_only:  # image queries over [image, text] keys; the text rows would be discarded
            k, v = jnp.concatenate([xk, ck], axis=1), jnp.concatenate([xv, cv], axis=1)
            x_out = dot_product_attention(xq, k, v, backend=self.backend)
        else:
            x_out, c_out = joint_attention([(xq, xk, xv), (cq, ck, cv)], backend=self.backend)
            ctx = constrain(context_block.post(ctx, c_out, c_state), _ACT)
        x = constrain(x_block.post(x, x_out, x_state), _ACT)
        return x, ctx


class MMDiT(nn.Module):
    """``apply({"params": p}, x, t, context, pooled, skip_layers=None)``: x NHWC latents (B, H, W, C); t the
    timestep as diffusers passes it (σ·1000), (B,) or (); context (B, L, joint_attention_dim); pooled
    (B, pooled_projection_dim) → (B, H, W, out_channels) float32.

    ``skip_layers``: a static tuple of block indices skipped entirely (skip-layer guidance, diffusers'
    ``skip_layers``); it needs the loop layout (``scan_blocks=False``, see ``dit_jax.models.set_scan``), since a
    scanned stage runs all its layers.
    """

    config: MMDiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        pooled: jax.Array,
        skip_layers: tuple[int, ...] | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        b, height, width, _ = x.shape
        p, d, m = cfg.patch_size, cfg.hidden_size, cfg.pos_embed_max_size
        h, w = height // p, width // p
        if h > m or w > m:
            raise ValueError(
                f"latent {height}x{width} has a {h}x{w} patch grid; this model's pos_embed covers at most {m}x{m} "
                f"patches ({m * p}x{m * p} latents)"
            )
        skip = self._skip_layers(skip_layers)

        tokens = PatchEmbed(p, d, dtype=dtype, name="x_embedder")(x)  # B N D

        def pos_init(key, shape, dtype=jnp.float32):
            return sincos_table(m, d, cfg.input_size // p).astype(dtype).reshape(shape)

        # Stored as diffusers' persistent buffer; stop_gradient keeps it fixed in training, as a buffer is.
        table = self.param("pos_embed", partitioned(pos_init, (None, "embed")), (m * m, d), jnp.float32)
        top, left = (m - h) // 2, (m - w) // 2
        pos = jax.lax.stop_gradient(table).reshape(m, m, d)[top : top + h, left : left + w].reshape(h * w, d)
        tokens = constrain(tokens + pos.astype(dtype)[None], _ACT)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        c = TimestepEmbedder(d, dtype=dtype, name="t_embedder")(t)  # sinusoid [cos, sin], no frequency shift
        c = c + VectorEmbedder(d, dtype=dtype, name="y_embedder")(pooled)
        ctx = dense(d, ("caption", "embed"), dtype=dtype, name="context_embedder")(context)  # B L D
        ctx = constrain(ctx, _ACT)

        block_kwargs = dict(
            hidden_size=d,
            num_heads=cfg.num_heads,
            mlp_hidden=int(d * cfg.mlp_ratio),
            qk_norm=cfg.qk_norm == "rms_norm",
            dtype=dtype,
            backend=cfg.attention_backend,
        )
        layers = [dict(block_kwargs, **kind) for kind in cfg.layer_kinds()]
        if not skip:
            tokens, _ = run_blocks(JointBlock, layers, (tokens, ctx), c, scan=cfg.scan_blocks, remat=cfg.remat)
        else:
            cls = JointBlock
            if cfg.remat != "none":
                cls = nn.remat(JointBlock, policy=REMAT_POLICIES[cfg.remat])
            carry = (tokens, ctx)
            for i, kwargs in enumerate(layers):
                if i not in skip:
                    carry = cls(**kwargs, name=f"blocks_{i}")(carry, c)
            tokens = carry[0]

        out = FinalLayer(p * p * cfg.out_channels, dtype=dtype, name="final_layer")(tokens, c)
        return unpatchify(out, h, w, p, cfg.out_channels).astype(jnp.float32)

    def _skip_layers(self, skip_layers) -> frozenset[int]:
        if not skip_layers:
            return frozenset()
        cfg = self.config
        skip = frozenset(int(i) for i in skip_layers)
        bad = sorted(i for i in skip if not 0 <= i < cfg.depth)
        if bad:
            raise ValueError(f"skip_layers {bad} are not block indices in [0, {cfg.depth})")
        if cfg.scan_blocks:
            raise ValueError(
                "skip_layers needs the loop layout (scan_blocks=False): a scanned stage runs all its layers; switch "
                "with dit_jax.models.set_scan(config, params, False)"
            )
        return skip


# The diffusers conversions of SAI's checkpoints (MODELS.md §3.3): head_dim 64, heads = layers (SD3-medium,
# SD3.5-medium) or 38 at width 2432 (SD3.5-large); 1024 px training size (128 latents).
PRESETS: dict[str, MMDiTConfig] = {
    "SD3-medium": MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192),
    "SD3.5-medium": MMDiTConfig(
        depth=24,
        hidden_size=1536,
        num_heads=24,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    "SD3.5-large": MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm="rms_norm"),
}


class SD3Family(Family):
    """Text-to-image SD3/SD3.5: a text sequence (CLIP-L ⊕ CLIP-G zero-padded to the T5 width, then T5 tokens) and
    a pooled CLIP vector; rectified flow with diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3)``."""

    name = "sd3"
    display_name = "SD3"
    config_class = MMDiTConfig
    module_class = MMDiT
    presets = PRESETS
    conversion = "dit_jax.convert.mmdit"
    task = "text-to-image"
    # Hub scheduler configs of SD3/SD3.5 (MODELS.md §3.4); 28 steps and guidance 7.0 are
    # StableDiffusion3Pipeline.__call__'s defaults, as is its max_sequence_length of 256 T5 tokens.
    scheduler_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sampling = {"num_inference_steps": 28, "guidance_scale": 7.0}
    diffusers_pipelines = {"StableDiffusion3Pipeline": {"max_sequence_length": T5_TOKENS}}

    def condition(self, config, batch):
        return {"context": batch["context"], "pooled": batch["pooled"]}

    def apply(self, module, params, x, t, condition):
        """``condition["skip_layers"]`` (a static tuple, skip-layer guidance) skips those joint blocks."""
        skip = condition.get("skip_layers")
        return module.apply({"params": params}, x, t, condition["context"], condition["pooled"], skip_layers=skip)

    def drop_condition(self, config, condition, drop):
        """Dropped rows get zero text features (sequence and pooled)."""
        drop = jnp.asarray(drop, bool)
        context, pooled = condition["context"], condition["pooled"]
        return {
            "context": jnp.where(drop[:, None, None], jnp.zeros_like(context), context),
            "pooled": jnp.where(drop[:, None], jnp.zeros_like(pooled), pooled),
        }

    def guidance_conditions(self, config, condition):
        """The null condition is zero text features. (diffusers' pipeline encodes the empty prompt instead; that
        needs the text encoders, which the pipelines hold.)"""
        cond = {"context": jnp.asarray(condition["context"]), "pooled": jnp.asarray(condition["pooled"])}
        return cond, {k: jnp.zeros_like(v) for k, v in cond.items()}

    def dropout_prob(self, config):
        """0: diffusers' SD3 fine-tuning scripts drop no captions by default; a training config sets its own."""
        return 0.0

    def condition_specs(self, config, batch_size):
        b = batch_size
        return {
            "context": jax.ShapeDtypeStruct((b, CLIP_TOKENS + T5_TOKENS, config.joint_attention_dim), jnp.float32),
            "pooled": jax.ShapeDtypeStruct((b, config.pooled_projection_dim), jnp.float32),
        }

    def grid_condition(self, config, sample, batch):
        """The text of the first training batch (as many as ``per_class × num_classes``), in a square grid."""
        n = min(int(sample["per_class"]) * int(sample["num_classes"]), batch["x"].shape[0])
        return {k: batch[k] for k in ("context", "pooled")}, n, max(1, int(np.sqrt(n)))

    def text_width(self, config):
        return config.joint_attention_dim

    def max_sequence_length(self, config):
        """T5 tokens (StableDiffusion3Pipeline's default); the 77 CLIP tokens come before them."""
        return T5_TOKENS

    def text_slots(self, config):
        """StableDiffusion3Pipeline's encoders: CLIP-L (``text_encoder``) reads ``prompt``, CLIP-G
        (``text_encoder_2``) ``prompt_2``, both 77 tokens; T5 (``text_encoder_3``) ``prompt_3``. No padding masks."""
        return (
            TextSlot("clip_l", "text_encoder", "tokenizer", prompt=1, max_length=CLIP_TOKENS, use_mask=False),
            TextSlot("clip_g", "text_encoder_2", "tokenizer_2", prompt=2, max_length=CLIP_TOKENS, use_mask=False),
            TextSlot("t5", "text_encoder_3", "tokenizer_3", prompt=3, max_length=None, use_mask=False),
        )

    def text_condition(self, config, features, max_sequence_length=None):
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side, zero-padded
        to the T5 width, then the T5 tokens along the sequence (zeros of ``max_sequence_length`` tokens, default 256,
        without a T5 encoder); pooled = both CLIPs' projected ``text_embeds`` side by side."""
        clip = np.concatenate([np.asarray(features[k]["penultimate"]) for k in ("clip_l", "clip_g")], axis=-1)
        width = config.joint_attention_dim
        if clip.shape[-1] > width:
            raise ValueError(f"CLIP features of width {clip.shape[-1]} exceed the model's text width {width}")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if "t5" in features:
            t5 = np.asarray(features["t5"]["hidden"])
        else:
            t5 = np.zeros((clip.shape[0], max_sequence_length or T5_TOKENS, width), clip.dtype)
        pooled = np.concatenate([np.asarray(features[k]["text_embeds"]) for k in ("clip_l", "clip_g")], axis=-1)
        return {"context": np.concatenate([clip, t5.astype(clip.dtype)], axis=1), "pooled": pooled}

    def forward_flops(self, config, height, width, text_length=None):
        p, d = config.patch_size, config.hidden_size
        n = (height // p) * (width // p)
        length = text_length if text_length is not None else CLIP_TOKENS + T5_TOKENS
        mlp = int(d * config.mlp_ratio)
        flops = embed_flops(config, n) + 2 * (config.pooled_projection_dim * d + d * d)  # patches, t, out; pooled
        flops += 2 * length * config.joint_attention_dim * d + 2 * d * 2 * d  # context embedder, final adaLN
        dual = set(config.dual_attention_layers)
        for i in range(config.depth):
            keys = n + length
            flops += block_flops(d, mlp, n, keys)  # image stream: qkv, proj, MLP, joint attention
            flops += 2 * d * (9 if i in dual else 6) * d  # its adaLN
            if i in dual:
                flops += n * 2 * 4 * d * d + 4 * n * n * d  # attn2
            if i == config.depth - 1:
                flops += 2 * length * 3 * d * d + 2 * d * 2 * d  # pre-only text side: qkv and adaLN
            else:
                flops += block_flops(d, mlp, length, keys) + 2 * d * 6 * d
        return int(flops)


FAMILY = register(SD3Family())
