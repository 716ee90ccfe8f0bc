"""Analytic forward FLOPs of DiT/PixArt (a multiply-add counts 2), for MFU.

XLA's ``cost_analysis`` counts a scanned block once, so MFU needs a count that does not depend on how the
stack is compiled. Elementwise ops, norms and softmax are left out (< 1% at DiT sizes). A training step costs
3× the forward pass (backward ≈ 2× forward), plus one more forward with full remat. DiT-XL/2 at 256 px gives
237.2 GFLOPs, twice the DiT paper's 118.6 "Gflops" (which counts a multiply-add as one).
"""

from dit_jax.models.dit import DiTConfig
from dit_jax.models.pixart import PixArtConfig


def forward_flops(config: DiTConfig | PixArtConfig, height: int, width: int, caption_length: int | None = None) -> int:
    """FLOPs of one forward pass for one sample of latent size ``height × width``."""
    p, d, c = config.patch_size, config.hidden_size, config.in_channels
    n = (height // p) * (width // p)
    m = int(d * config.mlp_ratio)
    per_token_linear = 2 * (3 * d * d + d * d + 2 * d * m)  # qkv, proj, mlp
    flops = 2 * n * p * p * c * d  # patch embedding
    flops += 2 * (256 * d + d * d)  # timestep MLP
    flops += 2 * n * d * p * p * config.out_channels  # output projection
    if isinstance(config, DiTConfig):
        flops += 2 * d * 6 * d * config.depth + 2 * d * 2 * d  # adaLN-Zero per block + final
        return int(flops + config.depth * (n * per_token_linear + 4 * n * n * d))
    length = caption_length if caption_length is not None else config.caption_length
    width_c = config.caption_width
    flops += 2 * d * 6 * d  # t_block
    if config.caption_channels is not None:
        flops += 2 * length * (width_c * d + d * d)  # caption projection
        width_c = d
    r2 = config.kv_compress_ratio**2
    for i in range(config.depth):
        keys = n // r2 if i in config.kv_compress_layers else n
        flops += n * per_token_linear + 4 * n * keys * d  # self-attention
        flops += 2 * n * d * d * 2 + 2 * length * width_c * 2 * d + 4 * n * length * d  # cross-attention
    return int(flops)
