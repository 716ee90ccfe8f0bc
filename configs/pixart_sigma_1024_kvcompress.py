"""PixArt-Σ XL/2, stage 4: 1024 px with KV token compression in the deep half (layers 14–27), from stage 3.

The model config turns KV compression on (2×2 depthwise conv + LayerNorm on keys/values); because the stage-3
checkpoint has none, the trainer adds the new parameters with PixArt-Σ's Conv Avg Init (kernel 1/R², bias 0,
LayerNorm identity: dit_jax.models.enable_kv_compress), so training starts from the uncompressed model's function
up to the token averaging.

Command:
  python -m dit_jax.train --config configs/pixart_sigma_1024_kvcompress.py --workdir runs/pixart_sigma_1024_kv
Hardware and expected time (not measured here; estimates): as stage 3 with 4× fewer self-attention keys/values in
14 of 28 layers: 12% fewer model FLOPs per step at 1024 px (analytic).
"""

from dit_jax.train.config import load_config_file


def get_config():
    c = load_config_file("pixart_sigma_1024", relative_to=__file__)
    c.model.kv_compress_layers = tuple(range(14, 28))
    c.model.kv_compress_ratio = 2
    c.model.kv_compress_op = "conv"
    c.init_from.workdir = "runs/pixart_sigma_1024"
    c.total_steps = 10_000
    return c
