"""Analytic forward FLOPs of a model (a multiply-add counts 2), for MFU; each family counts its own.

XLA's ``cost_analysis`` counts a scanned block once, so MFU needs a count that does not depend on how the
stack is compiled. Elementwise ops, norms and softmax are left out (< 1% at DiT sizes). A training step costs
3× the forward pass (backward ≈ 2× forward), plus one more forward with full remat. DiT-XL/2 at 256 px gives
237.2 GFLOPs, twice the DiT paper's 118.6 "Gflops" (which counts a multiply-add as one).
"""

from typing import Any

from dit_jax.models.family import family_of


def forward_flops(config: Any, height: int, width: int, caption_length: int | None = None) -> int:
    """FLOPs of one forward pass for one sample of latent size ``height × width`` (``caption_length`` text tokens)."""
    return family_of(config).forward_flops(config, height, width, caption_length)
