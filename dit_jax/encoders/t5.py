"""The T5 encoder (T5 v1.0 and v1.1, e.g. T5-v1.1-XXL, PixArt's caption encoder; mT5, Hunyuan-DiT's mT5-XL; UMT5,
Wan's UMT5-XXL) in Flax.

Matches transformers ``T5EncoderModel`` / ``MT5EncoderModel`` / ``UMT5EncoderModel``: token embedding (no scaling),
pre-norm blocks of self-attention and a feed-forward net with T5's RMS LayerNorm (no mean subtraction, no bias, fp32
variance, explicit eps), attention logits ``q·kᵀ`` without the 1/√d scale (T5 folds it into the init) plus a relative
position bias (bidirectional log buckets) — T5 and mT5: one table that the first block owns and every block shares;
UMT5 (``relative_bias_per_layer``): a table in every block — padding keys masked out (before the softmax, as
transformers' additive mask does), a ReLU (v1.0) or gated tanh-GELU (v1.1, mT5, UMT5: ``gelu_new``) feed-forward, and
a final RMS norm. mT5 is T5 v1.1 with a 250112-token vocabulary. ``apply({"params": p}, input_ids, attention_mask)``
returns the last hidden state (B, L, d_model) in float32 whatever the compute dtype; the residual stream stays
float32. In float16 compute the feed-forward output projection ``wo`` runs in float32 (its input cast up), as
transformers keeps ``wo`` in float32 when it loads T5/mT5/UMT5 in float16 (``_keep_in_fp32_modules``; in bfloat16 it
does not, nor do we).

Memory (T5-v1.1-XXL, 4.76 B parameters): 19.0 GB as float32, 9.5 GB as bfloat16. Every matrix carries logical axis
names (``embed`` → ``fsdp``, ``heads``/``mlp`` → ``tensor``), so under a mesh the encoder runs ZeRO-3 style with each
device holding 1/n of the weights. ``dit_jax.pipelines.TextEncoder`` does that over the local devices and (by
default) stores the matmul kernels in the compute dtype, which changes nothing since they are cast before every
matmul anyway: bf16 kernels + the fp32 embedding table ≈ 9.8 GB, ~1.2 GB per device on 8 devices. Activations are
small (the largest, B·L·d_ff per block, is 16 × 300 × 10240).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, register
from dit_jax.nn.layers import RMSNorm, compute_dtype, dense, partitioned
from dit_jax.nn.stack import REMAT_POLICIES
from dit_jax.parallel.rules import constrain

FEED_FORWARD = ("relu", "gelu", "gated-gelu", "gated-relu", "gated-silu")
MODEL_TYPES = ("t5", "mt5", "umt5")  # transformers' names of the three encoders
_ACT = ("act_batch", "act_length", "act_embed")  # B L D activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config(ExecutionConfig):
    """Every architecture and numerics switch of a T5 encoder (transformers ``T5Config`` names). Defaults: T5-v1.1-XXL.

    ``feed_forward_proj``: ``relu`` (T5 v1.0: ``wo(relu(wi x))``), ``gated-gelu`` (v1.1 / Flan / mT5 / UMT5:
    ``wo(gelu_tanh(wi_0 x) · wi_1 x)``), ``gelu`` (exact erf GELU), ``gated-relu``, ``gated-silu``.
    ``relative_bias_per_layer``: every block has its own relative position bias table (UMT5) instead of all sharing
    block 0's (T5, mT5). ``model_type``: the transformers encoder these weights are (``t5``, ``mt5``, ``umt5``), what
    an export writes; ``umt5`` goes with ``relative_bias_per_layer`` and only with it.
    """

    family: ClassVar[str] = "t5"

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    relative_bias_per_layer: bool = False
    model_type: str = "t5"

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        buckets, distance, ff = (self.relative_attention_num_buckets, self.relative_attention_max_distance,
                                 self.feed_forward_proj)  # fmt: skip
        check(buckets >= 4, "relative_attention_num_buckets", buckets, "at least 4")
        check(distance > buckets // 4, "relative_attention_max_distance", distance, f"more than {buckets // 4}")
        check(ff in FEED_FORWARD, "feed_forward_proj", ff, f"one of {FEED_FORWARD}")
        check(self.layer_norm_epsilon > 0, "layer_norm_epsilon", self.layer_norm_epsilon, "positive")
        check(self.model_type in MODEL_TYPES, "model_type", self.model_type, f"one of {MODEL_TYPES}")
        per_layer = self.model_type == "umt5"  # only UMT5 has a bias table in every block
        want = f"{per_layer} for model_type={self.model_type!r}"
        check(self.relative_bias_per_layer == per_layer, "relative_bias_per_layer", self.relative_bias_per_layer, want)
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (T5 blocks are not scanned)")

    @property
    def is_gated(self) -> bool:
        """Whether the feed-forward is gated (``wi_0``/``wi_1``) rather than one ``wi``."""
        return self.feed_forward_proj.startswith("gated-")

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        return jnp.zeros((batch, 4), jnp.int32), jnp.ones((batch, 4), jnp.int32)


_V11 = dict(d_kv=64, feed_forward_proj="gated-gelu", vocab_size=32128)
PRESETS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(**_V11, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),  # PixArt, SD3, Flux
    "t5-v1_1-xl": T5Config(**_V11, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-large": T5Config(**_V11, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-base": T5Config(**_V11, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-small": T5Config(**_V11, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    # google/mt5-xl's encoder: Hunyuan-DiT's text_encoder_2 (1.670 B parameters)
    "mT5-XL": T5Config(d_kv=64, feed_forward_proj="gated-gelu", vocab_size=250112, d_model=2048, d_ff=5120,
                       num_layers=24, num_heads=32, model_type="mt5"),
    # google/umt5-xxl's encoder: Wan 2.1's text encoder (5.681 B parameters)
    "UMT5-XXL": T5Config(d_kv=64, feed_forward_proj="gated-gelu", vocab_size=256384, d_model=4096, d_ff=10240,
                         num_layers=24, num_heads=64, model_type="umt5", relative_bias_per_layer=True),
}  # fmt: skip


def t5_preset(name: str, **overrides: Any) -> T5Config:
    """The named T5 encoder preset (``t5-v1_1-xxl`` … ``t5-v1_1-small``, ``mT5-XL``, ``UMT5-XXL``), with
    ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ---- relative position buckets ---------------------------------------------------------------------------------


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets (T, S) int32 of ``key_position − query_position`` (static, computed in numpy).

    Half of the buckets hold positive offsets. Within each half, |offset| < n/2 (n = buckets per half) get one
    bucket each, larger ones share log-spaced buckets up to ``max_distance``, beyond which all share the last. The
    log is taken in float32, as transformers/Mesh TF do, so that bucket edges (e.g. offsets 16, 32, 64) agree.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    small = rel < exact
    with np.errstate(divide="ignore"):
        log = np.log(rel.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
        large = np.where(small, 0, exact + log * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(small, rel, large)).astype(np.int32)


# ---- layers ----------------------------------------------------------------------------------------------------


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class SelfAttention(nn.Module):
    """Multi-head self-attention without the 1/√d scale; ``bias`` (1, H, T, S) fp32 added to the logits."""

    num_heads: int
    d_kv: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h, dk = self.num_heads, self.d_kv

        def proj(name: str, std: float) -> jax.Array:
            layer = dense((h, dk), ("embed", "heads", "kv"), dtype=self.dtype, use_bias=False,
                          kernel_init=_normal(std), name=name)  # fmt: skip
            return layer(x)  # B L H K

        q = proj("q", (d * dk) ** -0.5)  # T5's init carries the attention scale
        k, v = proj("k", d**-0.5), proj("v", d**-0.5)
        logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) + bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)  # padding keys out
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhts,bshk->bthk", weights, v)  # B T H K
        out = constrain(out, ("act_batch", "act_length", "act_heads", "act_kv"))
        o = dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), use_bias=False,
                  kernel_init=_normal((h * dk) ** -0.5), name="o")  # fmt: skip
        return o(out)


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers "gelu": exact erf
    "silu": jax.nn.silu,
}


class FeedForward(nn.Module):
    """``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) · wi_1 x)``; the activation and gate product in fp32, and ``wo``
    in fp32 when the compute dtype is float16 (transformers' ``_keep_in_fp32_modules``: its products overflow)."""

    d_ff: int
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        wi = lambda name: dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, use_bias=False,
                                kernel_init=_normal(d**-0.5), name=name)(x).astype(jnp.float32)  # fmt: skip
        if self.kind == "gated-gelu":
            h = jax.nn.gelu(wi("wi_0"), approximate=True) * wi("wi_1")  # gelu_new = tanh approximation
        elif self.kind.startswith("gated-"):
            h = _ACTIVATIONS[self.kind[len("gated-") :]](wi("wi_0")) * wi("wi_1")
        else:
            h = _ACTIVATIONS[self.kind](wi("wi"))
        out_dtype = jnp.float32 if jnp.dtype(self.dtype) == jnp.float16 else self.dtype
        h = constrain(h.astype(out_dtype), ("act_batch", "act_length", "act_mlp"))
        return dense(d, ("mlp", "embed"), dtype=out_dtype, use_bias=False,
                     kernel_init=_normal(self.d_ff**-0.5), name="wo")(h)  # fmt: skip


def position_bias(module: nn.Module, config: T5Config, buckets: jax.Array) -> jax.Array:
    """``module``'s relative position bias table (buckets, heads) looked up at ``buckets`` (T, S) → (1, H, T, S)."""
    rel = module.param("relative_attention_bias", partitioned(_normal(config.d_model**-0.5), (None, "heads")),
                       (config.relative_attention_num_buckets, config.num_heads), jnp.float32)  # fmt: skip
    return jnp.take(rel, buckets, axis=0).transpose(2, 0, 1)[None]


class Block(nn.Module):
    """``x += attn(norm x)``; ``x += ff(norm x)``; the residual stream ``x`` is float32. ``bias`` is the shared
    position bias (1, H, T, S), or, with ``relative_bias_per_layer``, the buckets (T, S) of the block's own table."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        if cfg.relative_bias_per_layer:
            bias = position_bias(self, cfg, bias)  # 1 H T S, this block's table
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="attention_norm")(x)
        x = x + SelfAttention(cfg.num_heads, cfg.d_kv, dtype, name="attention")(h, bias, mask).astype(jnp.float32)
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="ff_norm")(x)
        x = x + FeedForward(cfg.d_ff, cfg.feed_forward_proj, dtype, name="ff")(h).astype(jnp.float32)
        return constrain(x, _ACT)


class T5Encoder(nn.Module):
    """``apply({"params": p}, input_ids (B, L) int, attention_mask (B, L) 1 = token | None) -> (B, L, d_model)`` fp32.

    Parameters: ``shared`` (vocab, d_model), ``relative_attention_bias`` (buckets, heads) (block 0's in
    transformers; with ``relative_bias_per_layer`` one ``blocks_{i}/relative_attention_bias`` per block instead),
    ``blocks_{i}/{attention_norm,attention/{q,k,v,o},ff_norm,ff/{wi_0,wi_1|wi,wo}}``, ``final_norm/scale``.
    """

    config: T5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (batch, length) token ids, got shape {input_ids.shape}")
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} does not match input_ids {input_ids.shape}")
        table = self.param("shared", partitioned(_normal(1.0), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), jnp.float32)  # fmt: skip
        x = constrain(jnp.take(table, input_ids, axis=0), _ACT)  # B L D float32

        buckets = jnp.asarray(relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        ))  # fmt: skip
        # T5/mT5: 1 H T S, shared by all blocks; UMT5: the buckets, each block looks up its own table
        bias = buckets if cfg.relative_bias_per_layer else position_bias(self, cfg, buckets)

        mask = attention_mask.astype(bool)
        block = Block if cfg.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"blocks_{i}")(x, bias, mask)
        return RMSNorm(cfg.layer_norm_epsilon, jnp.float32, name="final_norm")(x)


class T5Family(Family):
    """The T5 encoder as a registered family (model directories, ``build``); not a diffusion model."""

    name = "t5"
    display_name = "T5 encoder"
    config_class = T5Config
    module_class = T5Encoder
    conversion = "dit_jax.convert.t5"
    presets = {}  # T5 presets are named by t5_preset(), apart from the diffusion-model presets


FAMILY = register(T5Family())
