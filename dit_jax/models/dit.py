"""DiT (Peebles & Xie, 2023): class-conditional latent diffusion transformer with adaLN-Zero blocks.

Matches facebookresearch/DiT ``models.py`` and diffusers ``DiTTransformer2DModel``; the two differ in the timestep
frequency shift (0 vs 1) and the MLP-norm eps (1e-6 vs 1e-5), both config fields (MODELS.md §1.4). The fixed
sin-cos positional table is computed for the input's token grid instead of being stored.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.config import ExecutionConfig, check, check_patch_transformer
from dit_jax.models.family import Family, register
from dit_jax.nn.attention import SelfAttention
from dit_jax.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed, unpatchify
from dit_jax.nn.layers import compute_dtype, layer_norm, modulate
from dit_jax.nn.mlp import Mlp
from dit_jax.nn.modulation import AdaLNZero, FinalLayer
from dit_jax.nn.stack import run_blocks
from dit_jax.parallel.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(ExecutionConfig):
    """Every architecture and numerics switch of a DiT. Defaults: DiT-XL/2 at 256 px (32×32 latents)."""

    family: ClassVar[str] = "dit"

    input_size: int = 32  # training latent size; sets the positional embedding's base size
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # numerics: original DiT / diffusers DiTTransformer2DModel
    timestep_freq_shift: float = 0.0  # 0 original, 1 diffusers
    mlp_norm_eps: float = 1e-6  # 1e-6 original, 1e-5 diffusers
    pe_interpolation: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("input_size", "patch_size", "in_channels", "depth", "num_classes"):
            check(getattr(self, name) > 0, name, getattr(self, name), "positive")
        check_patch_transformer(self)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        return self.input_size // self.patch_size

    def layer_kinds(self) -> list[dict]:
        return [{} for _ in range(self.depth)]

    def dummy_inputs(self, batch: int = 1) -> tuple[np.ndarray, ...]:
        s = self.input_size
        return (
            np.zeros((batch, s, s, self.in_channels), np.float32),
            np.zeros((batch,), np.float32),
            np.zeros((batch,), np.int32),
        )


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += gate·attn(mod(norm x))``; ``x += gate·mlp(mod(norm x))``."""

    num_heads: int
    mlp_hidden: int
    mlp_norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNZero(
            6, dtype=self.dtype, name="adaLN_modulation"
        )(c)
        attn = SelfAttention(self.num_heads, dtype=self.dtype, backend=self.backend, name="attn")
        x = x + gate_msa[:, None] * attn(modulate(layer_norm(x, 1e-6), shift_msa, scale_msa))
        mlp = Mlp(self.mlp_hidden, dtype=self.dtype, name="mlp")
        x = x + gate_mlp[:, None] * mlp(modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class DiT(nn.Module):
    """``apply({"params": p}, x, t, y)``: x NHWC latents, t float timesteps (B,) or (), y int labels (B,)
    (``num_classes`` = null class) → (B, H, W, out_channels) float32."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden_size
        h, w = height // p, width // p

        tokens = PatchEmbed(p, d, dtype=dtype, name="x_embedder")(x)  # B N D
        pos = sincos_pos_embed(h, w, d, base_size=cfg.base_size, interpolation=cfg.pe_interpolation)
        tokens = constrain(tokens + jnp.asarray(pos, dtype)[None], ("act_batch", "act_length", "act_embed"))

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        c = TimestepEmbedder(d, freq_shift=cfg.timestep_freq_shift, dtype=dtype, name="t_embedder")(t)
        c = c + LabelEmbedder(cfg.num_classes, d, dtype=dtype, name="y_embedder")(y)

        block_kwargs = dict(
            num_heads=cfg.num_heads,
            mlp_hidden=int(d * cfg.mlp_ratio),
            mlp_norm_eps=cfg.mlp_norm_eps,
            dtype=dtype,
            backend=cfg.attention_backend,
        )
        layers = [dict(block_kwargs, **kind) for kind in cfg.layer_kinds()]
        tokens = run_blocks(DiTBlock, layers, tokens, c, scan=cfg.scan_blocks, remat=cfg.remat)

        out = FinalLayer(p * p * cfg.out_channels, dtype=dtype, name="final_layer")(tokens, c)
        return unpatchify(out, h, w, p, cfg.out_channels).astype(jnp.float32)


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def block_flops(d: int, mlp: int, n: int, keys: int) -> int:
    """FLOPs of one self-attention + MLP block over ``n`` tokens attending to ``keys`` keys (a multiply-add is 2)."""
    return n * 2 * (3 * d * d + d * d + 2 * d * mlp) + 4 * n * keys * d  # qkv, proj, mlp; logits and values


def embed_flops(config, n: int) -> int:
    """Patch embedding, timestep MLP and output projection of a DiT-like model over ``n`` tokens."""
    p, d = config.patch_size, config.hidden_size
    return 2 * n * p * p * config.in_channels * d + 2 * (256 * d + d * d) + 2 * n * d * p * p * config.out_channels


class DiTFamily(Family):
    """Class-conditional DiT: labels in, ``num_classes`` as the null class, DDPM with the diffusers DiT scheduler."""

    name = "dit"
    display_name = "DiT"
    config_class = DiTConfig
    module_class = DiT
    presets = PRESETS
    conversion = "dit_jax.convert.dit"
    task = "class-to-image"
    # diffusers' DiT converter (scripts/convert_dit_to_diffusers.py) writes this scheduler (MODELS.md §1.5);
    # 50 steps and guidance 4.0 are DiTPipeline.__call__'s defaults.
    scheduler_config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
    sampling = {"num_inference_steps": 50, "guidance_scale": 4.0}
    diffusers_pipelines = {"DiTPipeline": {}}

    def condition(self, config, batch):
        return {"y": batch["y"]}

    def apply(self, module, params, x, t, condition):
        return module.apply({"params": params}, x, t, condition["y"])

    def drop_condition(self, config, condition, drop):
        return {"y": jnp.where(drop, config.num_classes, condition["y"])}

    def guidance_conditions(self, config, condition):
        return condition, {"y": jnp.full_like(condition["y"], config.num_classes)}

    def dropout_prob(self, config):
        return config.class_dropout_prob

    def label_condition(self, config, labels):
        return {"y": labels}

    def num_classes(self, config):
        return config.num_classes

    def condition_specs(self, config, batch_size):
        return {"y": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def grid_condition(self, config, sample, batch):
        """One row per class: ``sample.labels`` or classes 0 … ``sample.num_classes`` − 1, ``per_class`` each."""
        classes = [int(c) for c in sample.get("labels", ())]
        classes = classes or list(range(min(int(sample["num_classes"]), config.num_classes)))
        y = np.repeat(np.asarray(classes, np.int32), int(sample["per_class"]))
        return {"y": y}, len(y), len(classes)

    def forward_flops(self, config, height, width, text_length=None):
        p, d = config.patch_size, config.hidden_size
        n = (height // p) * (width // p)
        flops = embed_flops(config, n) + 2 * d * 6 * d * config.depth + 2 * d * 2 * d  # adaLN-Zero + final
        return int(flops + config.depth * block_flops(d, int(d * config.mlp_ratio), n, n))


FAMILY = register(DiTFamily())
