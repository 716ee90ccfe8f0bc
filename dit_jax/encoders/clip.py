"""The CLIP text encoder (CLIP-L, OpenCLIP bigG: SD3's two CLIPs, Flux's pooled CLIP) in Flax.

Matches transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: token + learned position embeddings,
pre-LN layers (``x += attn(LN x)`` with a causal mask, combined with the padding mask when one is given; ``x +=
fc2(act(fc1(LN x)))`` with quick-GELU ``x·σ(1.702x)``, exact erf GELU or tanh GELU), a final LayerNorm, and the pooled
output taken from the final-normed state at the EOS token: ``argmax(input_ids)`` when ``eos_token_id == 2`` (the
configs written before transformers PR #24773, which SD3's and Flux's encoders still carry), else the first position
holding ``eos_token_id``. With ``projection_dim`` set, ``text_embeds = text_projection(pooled)`` (no bias).

``apply({"params": p}, input_ids, attention_mask=None, output_hidden_states=False)`` returns a ``CLIPTextOutput``
in float32 whatever the compute dtype (the residual stream stays float32): ``last_hidden_state`` (after the final
norm), ``pooler_output``, ``penultimate`` (transformers' ``hidden_states[-2]``, the input of the last layer, before the
final norm: what SD3 and SDXL feed the diffusion model), ``text_embeds`` (projected models) and, when asked for,
``hidden_states`` (the embeddings, then every layer's output, before the final norm).

Memory: CLIP-L 123.7 M parameters (0.49 GB as float32), bigG 694.7 M (2.8 GB). Matrices carry logical axis names
(``embed`` → ``fsdp``, ``heads``/``mlp`` → ``tensor``) as in the T5 encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dit_jax.models.config import ExecutionConfig, check
from dit_jax.models.family import Family, register
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.layers import LayerNorm, compute_dtype, dense, partitioned
from dit_jax.nn.stack import REMAT_POLICIES
from dit_jax.parallel.rules import constrain

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")
LEGACY_EOS = 2  # configs before transformers PR #24773: the EOS token is the largest id of each row
_ACT = ("act_batch", "act_length", "act_embed")  # B L D activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig(ExecutionConfig):
    """Every architecture and numerics switch of a CLIP text encoder (transformers ``CLIPTextConfig`` names).
    Defaults: CLIP-L (``clip-vit-large-patch14``) with its projection, as SD3's first text encoder.

    ``hidden_act``: ``quick_gelu`` (OpenAI CLIP), ``gelu`` (exact erf; OpenCLIP bigG), ``gelu_new`` (tanh).
    ``projection_dim``: None for ``CLIPTextModel`` (Flux), the width of ``text_projection`` for
    ``CLIPTextModelWithProjection`` (SD3). ``eos_token_id``: 2 selects the legacy ``argmax(input_ids)`` pooling.
    """

    family: ClassVar[str] = "clip"

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS
    projection_dim: int | None = 768

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):  # fmt: skip
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        d, heads = self.hidden_size, self.num_attention_heads
        check(d % heads == 0, "hidden_size", d, f"a multiple of num_attention_heads={heads}")
        check(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {ACTIVATIONS}")
        check(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "positive")
        check(isinstance(self.eos_token_id, int) and self.eos_token_id >= 0, "eos_token_id", self.eos_token_id,
              "a non-negative token id")  # fmt: skip
        p = self.projection_dim
        check(p is None or p > 0, "projection_dim", p, "None (no text_projection) or a positive integer")
        check(not self.scan_blocks, "scan_blocks", self.scan_blocks, "False (CLIP layers are not scanned)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        length = min(4, self.max_position_embeddings)
        return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


_CLIP = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, eos_token_id=LEGACY_EOS)
PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: SD3's text_encoder (projected), Flux's text_encoder (set projection_dim=None)
    "clip-vit-large-patch14": CLIPTextConfig(**_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    # OpenCLIP ViT-bigG/14 (laion2B) text tower: SD3's and SDXL's text_encoder_2
    "clip-vit-bigG-14": CLIPTextConfig(**_CLIP, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                       num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
}  # fmt: skip


def clip_preset(name: str, **overrides: Any) -> CLIPTextConfig:
    """The named CLIP text-encoder preset (``clip-vit-large-patch14``, ``clip-vit-bigG-14``), with ``overrides``
    (e.g. ``projection_dim=None`` for Flux's ``CLIPTextModel``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


@flax.struct.dataclass
class CLIPTextOutput:
    """What ``CLIPTextEncoder`` returns (float32 arrays; a pytree, so it leaves ``jit``)."""

    last_hidden_state: jax.Array  # B L D, after the final LayerNorm
    pooler_output: jax.Array  # B D: last_hidden_state at each row's EOS token
    penultimate: jax.Array  # B L D: transformers' hidden_states[-2] (the last layer's input, not normed)
    text_embeds: jax.Array | None = None  # B P: text_projection(pooler_output), projected models only
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer's output, with output_hidden_states


# ---- layers ----------------------------------------------------------------------------------------------------


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's ``x · sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATION_FNS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers "gelu": exact erf
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
}


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/o projections; ``mask`` (B, 1, T, S) bool, True = attend."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h, dh = self.num_heads, d // self.num_heads
        proj = lambda name: dense((h, dh), ("embed", "heads", "kv"), dtype=self.dtype, kernel_init=_normal(d**-0.5),
                                  name=name)(x)  # fmt: skip
        q, k, v = proj("q"), proj("k"), proj("v")  # B L H Dh
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, mask, backend=self.backend)  # B L H Dh, scale Dh^-1/2
        o = dense(d, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), kernel_init=_normal(d**-0.5), name="o")
        return o(out)


class MLP(nn.Module):
    """``fc2(act(fc1 x))``; the activation in fp32."""

    intermediate_size: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, kernel_init=_normal(d**-0.5),
                  name="fc1")(x)  # fmt: skip
        h = _ACTIVATION_FNS[self.activation](h.astype(jnp.float32)).astype(self.dtype)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return dense(d, ("mlp", "embed"), dtype=self.dtype, kernel_init=_normal(self.intermediate_size**-0.5),
                     name="fc2")(h)  # fmt: skip


class Layer(nn.Module):
    """``x += attn(LN x)``; ``x += mlp(LN x)``; the residual stream ``x`` is float32."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="attention_norm")(x).astype(dtype)
        attn = Attention(cfg.num_attention_heads, dtype, cfg.attention_backend, name="attention")
        x = x + attn(h, mask).astype(jnp.float32)
        h = LayerNorm(cfg.layer_norm_eps, name="mlp_norm")(x).astype(dtype)
        x = x + MLP(cfg.intermediate_size, cfg.hidden_act, dtype, name="mlp")(h).astype(jnp.float32)
        return constrain(x, _ACT)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) index of each row's EOS token: ``argmax(input_ids)`` for legacy configs (``eos_token_id == 2``), else
    the first position holding ``eos_token_id`` (0 when a row has none, as transformers does)."""
    if eos_token_id == LEGACY_EOS:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEncoder(nn.Module):
    """``apply({"params": p}, input_ids (B, L) int, attention_mask (B, L) 1 = token | None, output_hidden_states=False)
    -> CLIPTextOutput`` (float32), with L ≤ ``max_position_embeddings``.

    Parameters: ``token_embedding`` (vocab, D), ``position_embedding`` (positions, D), ``blocks_{i}/{attention_norm,
    attention/{q,k,v,o}, mlp_norm, mlp/{fc1,fc2}}``, ``final_norm/{scale,bias}`` and, projected,
    ``text_projection/kernel`` (D, projection_dim).
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (batch, length) token ids, got shape {input_ids.shape}")
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: {length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} does not match input_ids {input_ids.shape}")
        tokens = self.param("token_embedding", partitioned(_normal(0.02), ("vocab", "embed")),
                            (cfg.vocab_size, cfg.hidden_size), jnp.float32)  # fmt: skip
        positions = self.param("position_embedding", partitioned(_normal(0.01), (None, "embed")),
                               (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)  # fmt: skip
        x = jnp.take(tokens, input_ids, axis=0) + positions[None, :length]
        x = constrain(x, _ACT)  # B L D float32

        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # 1 1 T S: causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]  # B 1 T S: and no padding keys

        layer = Layer if cfg.remat == "none" else nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat])
        states = [x]
        for i in range(cfg.num_hidden_layers):
            x = layer(cfg, name=f"blocks_{i}")(x, mask)
            states.append(x)
        last = LayerNorm(cfg.layer_norm_eps, name="final_norm")(x)
        pooled = last[jnp.arange(b), eos_positions(input_ids, cfg.eos_token_id)]  # B D
        text_embeds = None
        if cfg.projection_dim is not None:
            projection = dense(cfg.projection_dim, ("embed", None), dtype=jnp.float32, use_bias=False,
                               kernel_init=_normal(cfg.hidden_size**-0.5), name="text_projection")  # fmt: skip
            text_embeds = projection(pooled)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            penultimate=states[-2],
            text_embeds=text_embeds,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class CLIPFamily(Family):
    """The CLIP text encoder as a registered family (model directories, ``build``); not a diffusion model."""

    name = "clip"
    display_name = "CLIP"
    config_class = CLIPTextConfig
    module_class = CLIPTextEncoder
    conversion = "dit_jax.convert.clip"
    task = ""
    presets = {}  # CLIP presets are named by clip_preset(), apart from the diffusion-model presets


FAMILY = register(CLIPFamily())
