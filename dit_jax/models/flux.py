"""FLUX.1 (dev, schnell): a rectified-flow MM-DiT with double-stream blocks (separate image and text weights, one
joint attention over [text, image]), then single-stream blocks over the joined sequence, and 3-axis RoPE.

Matches black-forest-labs/flux ``model.py`` and diffusers ``FluxTransformer2DModel`` (MODELS.md §4, FAMILIES.md). The
model takes *unpacked* NHWC latents and does the 2×2 packing itself (channel index ``c·4 + ph·2 + pw``, as BFL's
``prepare`` and ``FluxPipeline._pack_latents``), builds the position ids (text: zeros; image: ``(0, row, col)`` on the
packed grid) and returns unpacked NHWC latents.

Parameter layout: the double and single blocks are one stack of two homogeneous stages (``blocks_0`` …
``blocks_{depth-1}`` double, then ``blocks_{depth}`` … single), carried as the joined sequence [text, image]. A
single block's ``linear1`` (D → 3D + rD, r = ``mlp_ratio``) is one kernel ``(D, 3 + r, heads, head_dim)`` and its
``linear2`` ``(1 + r, heads, head_dim, D)``, so q/k/v and the MLP shard by heads over ``tensor`` together.

Numerics: t·1000 and the guidance ·1000 are computed in float32 whatever the compute dtype (diffusers first casts
them to the model dtype, which rounds t in bf16: diffusers #9405); RoPE angles in float64 (``dit_jax.nn.rope``).
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
from dit_jax.nn.attention import dot_product_attention, joint_attention
from dit_jax.nn.embeddings import TimestepEmbedder
from dit_jax.nn.layers import RMSNorm, compute_dtype, dense, gelu_tanh, layer_norm, modulate, normal
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.modulation import AdaLNZero, FinalLayer
from dit_jax.nn.rope import apply_rope, grid_ids, rope_frequencies
from dit_jax.nn.stack import run_blocks
from dit_jax.parallel.rules import constrain

EPS = 1e-6  # every LayerNorm (no affine) and the qk RMSNorms, in both references
TIME_FACTOR = 1000.0  # t ∈ [0, 1] and the guidance scale are multiplied by this before the sinusoid
FP16_MAX = 65504.0  # diffusers clips the residual stream to the float16 range in float16
_DUMMY_TEXT_LENGTH = 8  # text tokens of dummy_inputs; no parameter depends on it


@dataclasses.dataclass(frozen=True, kw_only=True)
class FluxConfig(ExecutionConfig):
    """Every architecture switch of a Flux model. Defaults: FLUX.1-dev.

    ``in_channels``/``out_channels`` count *unpacked* latent channels (16 for the Flux VAE; the packed linear
    ``img_in`` takes ``in_channels · patch_size²`` = 64); ``patch_size`` is the packing factor.
    """

    family: ClassVar[str] = "flux"

    input_size: int = 128  # latent side of the training resolution (1024 px); no parameter depends on it
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    context_dim: int = 4096  # T5 width
    pooled_dim: int = 768  # CLIP pooled width
    axes_dims: tuple[int, ...] = (16, 56, 56)  # RoPE channels per position axis; sum = head_dim
    theta: float = 10000.0
    mlp_ratio: float = 4.0
    guidance_embeds: bool = True  # dev: the guidance scale is an input (guidance distillation); schnell: False
    qkv_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("input_size", "patch_size", "in_channels", "out_channels", "hidden_size", "num_heads", "depth"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        check(self.depth_single >= 0, "depth_single", self.depth_single, "non-negative")
        d, h = self.hidden_size, self.num_heads
        check(d % h == 0, "hidden_size", d, f"a multiple of num_heads={h}")
        check(self.input_size % self.patch_size == 0, "input_size", self.input_size, f"a multiple of {self.patch_size}")
        head_dim = d // h
        check(
            sum(self.axes_dims) == head_dim and all(a > 0 and a % 2 == 0 for a in self.axes_dims),
            "axes_dims",
            self.axes_dims,
            f"positive even RoPE dims summing to head_dim={head_dim}",
        )
        check(
            self.mlp_ratio > 0 and float(self.mlp_ratio).is_integer(),
            "mlp_ratio",
            self.mlp_ratio,
            "a positive integer (single blocks split their MLP by heads)",
        )
        check(self.theta > 0, "theta", self.theta, "positive")

    @property
    def learn_sigma(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_chunks(self) -> int:
        """r: the MLP width in units of ``hidden_size``."""
        return int(self.mlp_ratio)

    def layer_kinds(self) -> list[dict]:
        return [{"kind": "double"}] * self.depth + [{"kind": "single"}] * self.depth_single

    def dummy_inputs(self, batch: int = 1) -> tuple:
        s, n = self.input_size, _DUMMY_TEXT_LENGTH
        inputs = (
            np.zeros((batch, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch, n, self.context_dim), np.float32),
            np.zeros((batch, self.pooled_dim), np.float32),
        )
        return inputs + ((np.ones((batch,), np.float32),) if self.guidance_embeds else ())


# ---- packing and positions --------------------------------------------------------------------------------------


def pack(x: jax.Array, p: int) -> jax.Array:
    """NHWC latents (B, H, W, C) → tokens (B, H/p · W/p, C·p·p), channel index ``c·p² + ph·p + pw``."""
    b, height, width, c = x.shape
    x = x.reshape(b, height // p, p, width // p, p, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))  # B h w C ph pw
    return x.reshape(b, (height // p) * (width // p), c * p * p)


def unpack(x: jax.Array, h: int, w: int, p: int) -> jax.Array:
    """Inverse of ``pack``: tokens (B, h·w, C·p·p) → NHWC (B, h·p, w·p, C)."""
    b = x.shape[0]
    c = x.shape[-1] // (p * p)
    x = x.reshape(b, h, w, c, p, p)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))  # B h ph w pw C
    return x.reshape(b, h * p, w * p, c)


@functools.lru_cache(maxsize=32)
def rope_tables(text_length: int, h: int, w: int, axes_dims: tuple[int, ...], theta: float):
    """``(cos, sin)`` (text_length + h·w, head_dim/2) of the joined sequence: text ids zeros, image ids ``(0, row,
    col)`` on the packed h × w grid (BFL ``prepare``, ``FluxPipeline._prepare_latent_image_ids``)."""
    ids = np.concatenate([np.zeros((text_length, 3), np.int64), grid_ids((h, w), leading=(0,))])
    return rope_frequencies(ids, axes_dims, theta)


# ---- blocks -----------------------------------------------------------------------------------------------------


def _qk_norm(q: jax.Array, k: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Per-head RMSNorm of q and k over head_dim (``query_norm``, ``key_norm``; fp32 statistics)."""
    q = RMSNorm(EPS, dtype=dtype, names=("kv",), name="query_norm")(q)
    k = RMSNorm(EPS, dtype=dtype, names=("kv",), name="key_norm")(k)
    return q, k


class StreamAttention(nn.Module):
    """One stream's projections of a joint attention: ``qkv`` (D, 3, H, Dh) with qk RMSNorm, and ``proj``."""

    num_heads: int
    hidden_size: int
    qkv_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        h, dh = self.num_heads, self.hidden_size // self.num_heads
        self.qkv = dense((3, h, dh), ("embed", None, "heads", "kv"), dtype=self.dtype, use_bias=self.qkv_bias)
        self.query_norm = RMSNorm(EPS, dtype=self.dtype, names=("kv",))
        self.key_norm = RMSNorm(EPS, dtype=self.dtype, names=("kv",))
        self.proj = dense(self.hidden_size, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qkv = self.qkv(x)  # B T 3 H Dh
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return self.query_norm(q), self.key_norm(k), v

    def __call__(self, out: jax.Array) -> jax.Array:
        return self.proj(out)


class FluxBlock(nn.Module):
    """A double-stream (``kind="double"``) or single-stream block on the joined sequence x = [text, image].

    double: image and text each ``x += gate·proj(joint_attn(mod(norm x)))``, ``x += gate·mlp(mod(norm x))`` with their
    own weights (``img_*``/``txt_*``); single: ``x += gate·linear2(cat(attn, gelu(mlp)))`` with q, k, v and the MLP
    input from one ``linear1`` of ``mod(norm x)``.
    """

    kind: str
    num_heads: int
    mlp_chunks: int
    text_length: int
    qkv_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = self._double(x, vec, cos, sin) if self.kind == "double" else self._single(x, vec, cos, sin)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def _double(self, x, vec, cos, sin):
        n, d = self.text_length, x.shape[-1]
        streams = {"txt": x[:, :n], "img": x[:, n:]}
        angles = {"txt": (cos[:n], sin[:n]), "img": (cos[n:], sin[n:])}
        mods, attns, qkv = {}, {}, []
        for s in ("txt", "img"):
            mods[s] = AdaLNZero(6, dtype=self.dtype, name=f"{s}_mod")(vec)
            shift, scale = mods[s][0], mods[s][1]
            attns[s] = StreamAttention(self.num_heads, d, self.qkv_bias, dtype=self.dtype, name=f"{s}_attn")
            q, k, v = attns[s].project(modulate(layer_norm(streams[s], EPS), shift, scale))
            q = constrain(apply_rope(q, *angles[s]), ("act_batch", "act_length", "act_heads", "act_kv"))
            qkv.append((q, apply_rope(k, *angles[s]), v))
        outs = joint_attention(qkv, backend=self.backend)  # [text, image]
        for s, out in zip(("txt", "img"), outs):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[s]
            y = streams[s] + gate_msa[:, None] * attns[s](out)
            mlp = Mlp(self.mlp_chunks * d, dtype=self.dtype, name=f"{s}_mlp")
            streams[s] = y + gate_mlp[:, None] * mlp(modulate(layer_norm(y, EPS), shift_mlp, scale_mlp))
        txt = streams["txt"]
        if txt.dtype == jnp.float16:  # as diffusers' FluxTransformerBlock
            txt = jnp.clip(txt, -FP16_MAX, FP16_MAX)
        return jnp.concatenate([txt, streams["img"]], axis=1)

    def _single(self, x, vec, cos, sin):
        d, h, r = x.shape[-1], self.num_heads, self.mlp_chunks
        shift, scale, gate = AdaLNZero(3, dtype=self.dtype, name="modulation")(vec)
        hidden = dense((3 + r, h, d // h), ("embed", None, "heads", "kv"), dtype=self.dtype, name="linear1")(
            modulate(layer_norm(x, EPS), shift, scale)
        )  # B L 3+r H Dh
        q, k = _qk_norm(hidden[:, :, 0], hidden[:, :, 1], self.dtype)
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_kv"))
        attn = dot_product_attention(q, apply_rope(k, cos, sin), hidden[:, :, 2], backend=self.backend)
        mlp = gelu_tanh(hidden[:, :, 3:])  # B L r H Dh
        joined = jnp.concatenate([attn[:, :, None], mlp], axis=2)  # B L 1+r H Dh
        out = dense(d, (None, "heads", "kv", "embed"), dtype=self.dtype, axis=(-3, -2, -1), name="linear2")(joined)
        x = x + gate[:, None] * out
        if x.dtype == jnp.float16:  # as diffusers' FluxSingleTransformerBlock
            x = jnp.clip(x, -FP16_MAX, FP16_MAX)
        return x


class MLPEmbedder(nn.Module):
    """``in_layer → SiLU → out_layer`` (BFL ``MLPEmbedder``; ``linear_1``, ``linear_2``): the pooled-text vector."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        y = dense(self.hidden_size, ("caption", "mlp"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_1")(
            y.astype(self.dtype)
        )
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, kernel_init=normal(0.02), name="linear_2")(
            nn.silu(y)
        )


class Flux(nn.Module):
    """Flux forward: ``apply({"params": p}, x, t, context, pooled, guidance=None)``.

    x: unpacked NHWC latents (B, H, W, in_channels), H and W even; t: σ ∈ [0, 1] as ``FluxPipeline`` passes it
    ((B,) or scalar; multiplied by 1000 here, in float32); context: T5 features (B, L, context_dim); pooled: CLIP
    pooled (B, pooled_dim); guidance: the guidance scale (B,) or scalar, required by guidance-distilled models
    (``guidance_embeds``, FLUX.1-dev) and refused by the others. Returns (B, H, W, out_channels) float32.
    """

    config: FluxConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        pooled: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden_size
        if height % p or width % p:
            raise ValueError(
                f"Flux latents must have a height and width divisible by {p} (the 2×2 packing), got {height}x{width}"
            )
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context must be (B={b}, L, {cfg.context_dim}), got {context.shape}")
        h, w, n = height // p, width // p, context.shape[1]

        img = dense(d, ("patch", "embed"), dtype=dtype, name="img_in")(pack(x, p).astype(dtype))
        txt = dense(d, ("caption", "embed"), dtype=dtype, name="txt_in")(context.astype(dtype))

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        vec = TimestepEmbedder(d, dtype=dtype, name="time_in")(TIME_FACTOR * t)
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError(
                    "this Flux model is guidance-distilled (guidance_embeds=True, e.g. FLUX.1-dev): pass guidance, "
                    "the guidance scale (B,) (diffusers' FluxPipeline default 3.5)"
                )
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,))
            vec = vec + TimestepEmbedder(d, dtype=dtype, name="guidance_in")(TIME_FACTOR * g)
        elif guidance is not None:
            raise ValueError("this Flux model has no guidance embedding (guidance_embeds=False, e.g. FLUX.1-schnell)")
        vec = vec + MLPEmbedder(d, dtype=dtype, name="vector_in")(pooled)

        cos, sin = rope_tables(n, h, w, tuple(cfg.axes_dims), float(cfg.theta))
        tokens = constrain(jnp.concatenate([txt, img], axis=1), ("act_batch", "act_length", "act_embed"))
        block_kwargs = dict(
            num_heads=cfg.num_heads,
            mlp_chunks=cfg.mlp_chunks,
            text_length=n,
            qkv_bias=cfg.qkv_bias,
            dtype=dtype,
            backend=cfg.attention_backend,
        )
        layers = [dict(block_kwargs, **kind) for kind in cfg.layer_kinds()]
        tokens = run_blocks(
            FluxBlock, layers, tokens, vec, jnp.asarray(cos), jnp.asarray(sin), scan=cfg.scan_blocks, remat=cfg.remat
        )

        out = FinalLayer(p * p * cfg.out_channels, dtype=dtype, name="final_layer")(tokens[:, n:], vec)
        return unpack(out, h, w, p).astype(jnp.float32)


PRESETS: dict[str, FluxConfig] = {
    # black-forest-labs FluxParams (MODELS.md §4.1): 11,901,408,320 and 11,891,178,560 parameters.
    "FLUX.1-dev": FluxConfig(guidance_embeds=True),
    "FLUX.1-schnell": FluxConfig(guidance_embeds=False),
}


# ---- the family -------------------------------------------------------------------------------------------------

# FLUX.1-dev's hub scheduler_config.json (MODELS.md §4.4): σ shifted by μ linear in the image sequence length,
# identical to BFL's get_schedule. Schnell: shift 1, no dynamic shifting (BFL get_schedule(shift=False)).
_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
_SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


class FluxFamily(Family):
    """Text-to-image Flux: T5 features and a CLIP pooled vector, no classifier-free guidance for guidance-distilled
    models (the scale is a model input instead), flow matching with FlowMatchEulerDiscreteScheduler.

    The class attributes ``scheduler_config`` and ``sampling`` are FLUX.1-dev's (diffusers ``FluxPipeline``: 28 steps,
    guidance 3.5); ``scheduler_config_for(config)`` and ``sampling_for(config)`` give each config's own (schnell:
    shift 1 without dynamic shifting, 4 steps, guidance 0), picked by ``guidance_embeds``.
    """

    name = "flux"
    display_name = "Flux"
    config_class = FluxConfig
    module_class = Flux
    presets = PRESETS
    conversion = "dit_jax.convert.flux"
    task = "text-to-image"
    scheduler_config = _DEV_SCHEDULER
    sampling = {"num_inference_steps": 28, "guidance_scale": 3.5}
    diffusers_pipelines = {"FluxPipeline": {"max_sequence_length": 512}}

    def lora_targets(self, config: FluxConfig) -> tuple[str, ...]:
        """The attention projections, plus the single-stream blocks' fused ``linear1`` (q|k|v|mlp) and ``linear2``."""
        return (*super().lora_targets(config), r"(^|/)linear[12]/kernel$")

    def embedded_guidance(self, config: FluxConfig) -> bool:
        """True for guidance-distilled models (FLUX.1-dev): the guidance scale is the model input ``guidance`` and
        sampling runs without classifier-free guidance (``guidance_conditions`` gives no null condition)."""
        return bool(config.guidance_embeds)

    def scheduler_config_for(self, config: FluxConfig) -> dict:
        """The diffusers scheduler config of ``config``'s reference pipeline: dev's dynamic shifting, or schnell's
        plain σ (the released FLUX.1-schnell is the model without a guidance embedding)."""
        return dict(_DEV_SCHEDULER if config.guidance_embeds else _SCHNELL_SCHEDULER)

    def sampling_for(self, config: FluxConfig) -> dict:
        """Default steps and guidance: dev 28 steps at guidance 3.5 (``FluxPipeline``), schnell 4 steps and 0."""
        if config.guidance_embeds:
            return dict(self.sampling)
        return {"num_inference_steps": 4, "guidance_scale": 0.0}

    def condition(self, config, batch):
        """``context``, ``pooled`` and, for guidance-distilled models, ``guidance``: the batch's own (B,) or a constant
        1.0 per row (a neutral embedded guidance when the data carries none)."""
        cond = {"context": batch["context"], "pooled": batch["pooled"]}
        if config.guidance_embeds:
            g = batch.get("guidance")
            cond["guidance"] = g if g is not None else jnp.ones((batch["context"].shape[0],), jnp.float32)
        return cond

    def apply(self, module, params, x, t, condition):
        """``t`` from our samplers is σ·1000; the module takes σ (and multiplies by 1000 as diffusers' model does)."""
        c = condition
        return module.apply(
            {"params": params}, x, t / TIME_FACTOR, c["context"], c["pooled"], guidance=c.get("guidance")
        )

    def drop_condition(self, config, condition, drop):
        """Zero text features and pooled vector for the dropped rows (the guidance input stays)."""
        drop = jnp.asarray(drop, bool)
        context, pooled = jnp.asarray(condition["context"]), jnp.asarray(condition["pooled"])
        return dict(
            condition,
            context=jnp.where(drop[:, None, None], jnp.zeros_like(context), context),
            pooled=jnp.where(drop[:, None], jnp.zeros_like(pooled), pooled),
        )

    def guidance_conditions(self, config, condition):
        """Guidance-distilled models: ``(cond, None)`` — no classifier-free guidance (``generate`` runs unguided).
        Others: zero text features and pooled vector as the null condition."""
        if config.guidance_embeds:
            return condition, None
        null = {k: jnp.zeros_like(jnp.asarray(v)) for k, v in condition.items()}
        return condition, null

    def condition_specs(self, config, batch_size):
        b = batch_size
        specs = {
            "context": jax.ShapeDtypeStruct((b, self.max_sequence_length(config), config.context_dim), jnp.float32),
            "pooled": jax.ShapeDtypeStruct((b, config.pooled_dim), jnp.float32),
        }
        if config.guidance_embeds:
            specs["guidance"] = jax.ShapeDtypeStruct((b,), jnp.float32)
        return specs

    def grid_condition(self, config, sample, batch):
        """The text of the first ``per_class × num_classes`` rows of the first batch, in a square grid; a
        guidance-distilled model samples at ``sample.guidance_scale`` as its embedded guidance."""
        rows = batch["context"].shape[0]
        n = min(int(sample["per_class"]) * int(sample["num_classes"]), rows)
        cond = {"context": batch["context"], "pooled": batch["pooled"]}
        if config.guidance_embeds:
            cond["guidance"] = np.full((rows,), float(sample.get("guidance_scale", 3.5)), np.float32)
        return cond, n, max(1, int(np.sqrt(n)))

    def text_width(self, config):
        return config.context_dim

    def text_slots(self, config):
        """FluxPipeline's encoders: CLIP-L (``text_encoder``, 77 tokens, pooled output) reads ``prompt``, T5
        (``text_encoder_2``) ``prompt_2``; neither gets the padding mask."""
        return (
            TextSlot("clip", "text_encoder", "tokenizer", prompt=1, max_length=77, use_mask=False),
            TextSlot("t5", "text_encoder_2", "tokenizer_2", prompt=2, max_length=None, use_mask=False),
        )

    def true_cfg(self, config):
        """FluxPipeline's semantics for dev and schnell alike: ``guidance_scale`` is the embedded guidance."""
        return True

    def text_condition(self, config, features, max_sequence_length=None):
        return {"context": features["t5"]["hidden"], "pooled": features["clip"]["pooled"]}

    def sampler_options(self, config, num_steps, image_seq_len):
        """FluxPipeline's explicit sigmas ``linspace(1, 1/N, N)`` and the packed image sequence length of the
        resolution-dependent shift (ignored by schnell's constant schedule)."""
        return {"sigmas": np.linspace(1.0, 1.0 / num_steps, num_steps), "image_seq_len": int(image_seq_len)}

    def max_sequence_length(self, config):
        """T5 tokens: 512 for dev (``FluxPipeline``), 256 for schnell (the BFL/diffusers schnell setting)."""
        return 512 if config.guidance_embeds else 256

    def forward_flops(self, config, height, width, text_length=None):
        p, d, r = config.patch_size, config.hidden_size, config.mlp_chunks
        n = (height // p) * (width // p)
        length = text_length if text_length is not None else self.max_sequence_length(config)
        joint = n + length
        embed = 2 * n * config.in_channels * p * p * d + 2 * length * config.context_dim * d
        embed += 2 * (256 * d + d * d) * (2 if config.guidance_embeds else 1) + 2 * (config.pooled_dim * d + d * d)
        double = 2 * 2 * d * 6 * d + 2 * joint * (3 * d * d + d * d + 2 * d * r * d) + 4 * joint * joint * d
        single = 2 * d * 3 * d + 2 * joint * ((3 + r) * d * d + (1 + r) * d * d) + 4 * joint * joint * d
        final = 2 * d * 2 * d + 2 * n * d * p * p * config.out_channels
        return int(embed + config.depth * double + config.depth_single * single + final)


FAMILY = register(FluxFamily())
