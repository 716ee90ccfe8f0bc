"""The BERT encoder (Hunyuan-DiT's bilingual "CLIP" text tower, a ``chinese-roberta-wwm-ext-large``-style BERT) in Flax.

Matches transformers ``BertModel``: word + learned absolute position + token-type embeddings (token types default to
0), summed and layer-normed; post-LN layers (``x = LN(x + attn(x))``, ``x = LN(x + fc2(act(fc1 x)))``) with biased
q/k/v/o projections, the 1/√d attention scale and padding keys masked out (before the softmax); exact erf GELU
(``gelu``) by default; every LayerNorm with the config's eps (1e-12 for BERT). ``apply({"params": p}, input_ids,
attention_mask=None, token_type_ids=None)`` returns the last hidden state (B, L, hidden_size) in float32 whatever the
compute dtype — what Hunyuan-DiT feeds its transformer (``text_encoder(ids, attention_mask)[0]``); the residual
stream stays float32. With ``add_pooling_layer`` the params hold BERT's pooler (``tanh(dense(x[:, 0]))``, returned
with ``return_pooled=True``), so checkpoints that carry it convert both ways.

Memory: the Hunyuan-DiT preset has 352.0 M parameters with the pooler, 351.0 M without (1.4 GB as float32).
Matrices carry logical axis names (``embed`` → ``fsdp``, ``heads``/``mlp`` → ``tensor``) as in the T5 encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, register
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.layers import LayerNorm, compute_dtype, dense, partitioned
from dit_jax.nn.stack import REMAT_POLICIES
from dit_jax.parallel.rules import constrain

ACTIVATIONS = ("gelu", "gelu_new", "relu")
_ACT = ("act_batch", "act_length", "act_embed")  # B L D activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(ExecutionConfig):
    """Every architecture and numerics switch of a BERT encoder (transformers ``BertConfig`` names). Defaults:
    Hunyuan-DiT's text encoder (``chinese-roberta-wwm-ext-large``: width 1024, 24 layers, 16 heads, 47020 tokens).

    ``hidden_act``: ``gelu`` (exact erf, BERT's), ``gelu_new`` (tanh approximation), ``relu``.
    ``add_pooling_layer``: whether the weights hold BERT's pooler (``pooler.dense``; ``BertModel`` has it by default).
    """

    family: ClassVar[str] = "bert"

    vocab_size: int = 47020
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooling_layer: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):  # fmt: skip
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        d, heads = self.hidden_size, self.num_attention_heads
        check(d % heads == 0, "hidden_size", d, f"a multiple of num_attention_heads={heads}")
        check(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {ACTIVATIONS}")
        check(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "positive")
        check(0 <= self.pad_token_id < self.vocab_size, "pad_token_id", self.pad_token_id, "a token id")
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (BERT layers are not scanned)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        length = min(4, self.max_position_embeddings)
        return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


PRESETS: dict[str, BertConfig] = {
    # Hunyuan-DiT's text_encoder (hfl/chinese-roberta-wwm-ext-large's architecture): 77 tokens in use
    "HunyuanDiT-BERT": BertConfig(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, hidden_act="gelu", max_position_embeddings=512,
                                  type_vocab_size=2, layer_norm_eps=1e-12, add_pooling_layer=True),
}  # fmt: skip


def bert_preset(name: str, **overrides: Any) -> BertConfig:
    """The named BERT encoder preset (``HunyuanDiT-BERT``), with ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown BERT preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ---- layers ----------------------------------------------------------------------------------------------------


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


_ACTIVATION_FNS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers "gelu": exact erf
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/o projections; ``mask`` (B, S) bool, True = a token."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h, dh = self.num_heads, d // self.num_heads
        proj = lambda name: dense((h, dh), ("embed", "heads", "kv"), dtype=self.dtype, kernel_init=_normal(0.02),
                                  name=name)(x)  # fmt: skip
        q, k, v = proj("q"), proj("k"), proj("v")  # B L H Dh
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, mask, backend=self.backend)  # B L H Dh, scale Dh^-1/2
        o = dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), kernel_init=_normal(0.02), name="o")
        return o(out)


class MLP(nn.Module):
    """``fc2(act(fc1 x))``; the activation in fp32."""

    intermediate_size: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, kernel_init=_normal(0.02),
                  name="fc1")(x)  # fmt: skip
        h = _ACTIVATION_FNS[self.activation](h.astype(jnp.float32)).astype(self.dtype)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense(d, ("mlp", "embed"), dtype=self.dtype, kernel_init=_normal(0.02), name="fc2")(h)


class Layer(nn.Module):
    """Post-LN: ``x = LN(x + attn(x))``; ``x = LN(x + mlp(x))``; the residual stream ``x`` is float32."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        attn = Attention(cfg.num_attention_heads, dtype, cfg.attention_backend, name="attention")
        x = LayerNorm(cfg.layer_norm_eps, name="attention_norm")(x + attn(x.astype(dtype), mask).astype(jnp.float32))
        mlp = MLP(cfg.intermediate_size, cfg.hidden_act, dtype, name="mlp")
        x = LayerNorm(cfg.layer_norm_eps, name="mlp_norm")(x + mlp(x.astype(dtype)).astype(jnp.float32))
        return constrain(x, _ACT)


class BertEncoder(nn.Module):
    """``apply({"params": p}, input_ids (B, L) int, attention_mask (B, L) 1 = token | None, token_type_ids (B, L) |
    None = zeros, return_pooled=False) -> (B, L, hidden_size)`` float32 (with ``return_pooled``: ``(last hidden
    state, pooled (B, hidden_size))``), with L ≤ ``max_position_embeddings``.

    Parameters: ``word_embeddings`` (vocab, D), ``position_embeddings`` (positions, D), ``token_type_embeddings``
    (types, D), ``embeddings_norm/{scale,bias}``, ``blocks_{i}/{attention/{q,k,v,o}, attention_norm, mlp/{fc1,fc2},
    mlp_norm}`` and, with ``add_pooling_layer``, ``pooler/{kernel,bias}``.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        return_pooled: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (batch, length) token ids, got shape {input_ids.shape}")
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: {length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
        for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if value is not None and value.shape != input_ids.shape:
                raise ValueError(f"{name} shape {value.shape} does not match input_ids {input_ids.shape}")
        if return_pooled and not cfg.add_pooling_layer:
            raise ValueError("return_pooled=True needs a pooler: this BERT config has add_pooling_layer=False")
        d = cfg.hidden_size
        embed = lambda name, rows, names: self.param(name, partitioned(_normal(0.02), names), (rows, d), jnp.float32)
        words = embed("word_embeddings", cfg.vocab_size, ("vocab", "embed"))
        positions = embed("position_embeddings", cfg.max_position_embeddings, (None, "embed"))
        types = embed("token_type_embeddings", cfg.type_vocab_size, (None, "embed"))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, length), jnp.int32)
        x = jnp.take(words, input_ids, axis=0) + jnp.take(types, token_type_ids, axis=0)
        x = LayerNorm(cfg.layer_norm_eps, name="embeddings_norm")(x + positions[None, :length])
        x = constrain(x, _ACT)  # B L D float32

        mask = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
        layer = Layer if cfg.remat == "none" else nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.num_hidden_layers):
            x = layer(cfg, name=f"blocks_{i}")(x, mask)
        if not cfg.add_pooling_layer:
            return x
        pooler = dense(d, ("embed", None), dtype=jnp.float32, kernel_init=_normal(0.02), name="pooler")
        pooled = jnp.tanh(pooler(x[:, 0]))  # B D: the first ([CLS]) token
        return (x, pooled) if return_pooled else x


class BertFamily(Family):
    """The BERT encoder as a registered family (model directories, ``build``); not a diffusion model."""

    name = "bert"
    display_name = "BERT"
    config_class = BertConfig
    module_class = BertEncoder
    conversion = "dit_jax.convert.bert"
    task = ""
    presets = {}  # BERT presets are named by bert_preset(), apart from the diffusion-model presets


FAMILY = register(BertFamily())
