"""Forward latency: dit_jax vs diffusers (same device, same run), and the KV-compression speedup.

  python -m benchmarks.forward                      # all cases, bf16 on GPU / fp32 on CPU
  python -m benchmarks.forward --cases dit --batch 8
  python -m benchmarks.forward --cases kv --depth 4 # CPU: shallower models keep it within minutes

Cases: ``dit`` DiT-XL/2 at 256 and 512 px; ``pixart`` PixArt-Σ XL/2 at 1024 px (4,096 tokens) and 2K
(16,384 tokens) with 300 caption tokens; ``kv`` PixArt-Σ with KV compression (R=2 on the deep half of the layers)
against without, at 2K and 4K (65,536 tokens). One JSON line per case (see benchmarks/common.py).

Both sides hold the same random weights (dit_jax parameters exported to the diffusers model through
``dit_jax.convert``, see benchmarks/builders.py) and are timed round-robin in one process. In bf16 both hold bf16
weights (``model.to(torch.bfloat16)`` / params cast once), as an inference pipeline does.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.builders import jax_model_params, torch_transformer
from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_sync,
    on_accelerator,
    peak_flops,
    time_interleaved,
    torch_device,
    torch_dtype,
    torch_sync,
    wait_quiet,
)
from dit_jax import models
from dit_jax.models.flops import forward_flops

PX = {"256": 32, "512": 64, "1024": 128, "1280": 160, "1536": 192, "2K": 256, "4K": 512}  # image size → latent size


def jax_forward(config, batch: int, latent: int, caption: int = 300, params=None):
    model = models.build(config)
    params = jax.device_put(jax_model_params(config) if params is None else params)
    if config.dtype in ("bfloat16", "bf16"):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, latent, latent, config.in_channels)), jnp.float32)
    t = jnp.full((batch,), 500.0)
    if isinstance(config, models.DiTConfig):
        args = (x, t, jnp.arange(batch) % config.num_classes)
    else:
        cap = jnp.asarray(rng.standard_normal((batch, caption, config.caption_width)), jnp.float32)
        args = (x, t, cap, jnp.ones((batch, caption), jnp.int32))
    fn = jax.jit(model.apply)
    return lambda: fn({"params": params}, *args)


def torch_forward(config, params, batch: int, latent: int, dtype: str, caption: int = 300):
    import torch

    device, tdtype = torch_device(), torch_dtype(dtype)
    model = torch_transformer(config, params, device, tdtype).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, latent, latent, generator=g).to(device, tdtype)
    t = torch.full((batch,), 500, device=device)
    if isinstance(config, models.DiTConfig):
        kwargs = dict(hidden_states=x, timestep=t, class_labels=torch.arange(batch, device=device))
    else:
        cap = torch.randn(batch, caption, config.caption_width, generator=g).to(device, tdtype)
        mask = torch.ones(batch, caption, device=device)
        kwargs = dict(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cap,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    def run():
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    return run


def side_by_side(config, batch: int, latent: int, args) -> tuple[dict, dict | None, float]:
    """``(jax timing, torch timing or None, load before)`` for one case, timed round-robin."""
    load = wait_quiet(args.wait_quiet)
    params = jax_model_params(config)
    fns = {"jax": (jax_forward(config, batch, latent, params=params), jax_sync)}
    if not args.no_torch:
        fns["torch"] = (torch_forward(config, params, batch, latent, args.dtype), torch_sync)
    del params
    t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    return t["jax"], t.get("torch"), load


def report(case, config, latent, batch, dtype, jax_t, torch_t=None, load=None, **extra):
    flops = forward_flops(config, latent, latent) * batch
    peak = peak_flops()
    rec = {
        "case": case,
        "dtype": dtype,
        "batch": batch,
        "depth": config.depth,
        "tokens": (latent // 2) ** 2,
        "scan": config.scan_blocks,
        "jax_ms": round(jax_t["median_ms"], 2),
        "tflops_per_s": round(flops / jax_t["median_ms"] / 1e9, 2),
    }
    if peak and dtype == "bf16":
        rec["mfu"] = round(flops / (jax_t["median_ms"] / 1e3) / peak, 3)
    if torch_t is not None:
        rec["torch_ms"] = round(torch_t["median_ms"], 2)
    rec.update(comparison_fields(jax_t, torch_t, load))
    emit({**rec, **extra})


def main():
    on_gpu = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dit,pixart,kv")
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=8 if on_gpu else 1)
    ap.add_argument("--depth", type=int, default=None, help="override depth (keeps CPU runs short)")
    ap.add_argument("--scan", action="store_true", help="dit_jax: scanned blocks (nn.scan)")
    ap.add_argument("--iters", type=int, default=10 if on_gpu else 3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dit-sizes", default="256,512")
    ap.add_argument("--pixart-sizes", default="1024,2K")
    ap.add_argument("--kv-sizes", default="2K,4K")
    args = ap.parse_args()
    over = {"dtype": "bfloat16" if args.dtype == "bf16" else "float32", "scan_blocks": args.scan}
    if args.depth:
        over["depth"] = args.depth
    timing = dict(iters=args.iters, warmup=args.warmup)
    cases = args.cases.split(",")

    if "dit" in cases:
        for size in args.dit_sizes.split(","):
            latent = PX[size]
            cfg = models.preset("DiT-XL/2", input_size=latent, **over)
            j, t, load = side_by_side(cfg, args.batch, latent, args)
            report(f"DiT-XL/2 {size}px forward", cfg, latent, args.batch, args.dtype, j, t, load)
    if "pixart" in cases:
        for size in args.pixart_sizes.split(","):
            latent = PX[size]
            cfg = models.preset("PixArt-Sigma-XL-2-1024-MS", **over)
            j, t, load = side_by_side(cfg, args.batch, latent, args)
            report(f"PixArt-Sigma-XL/2 {size} forward", cfg, latent, args.batch, args.dtype, j, t, load)
    if "kv" in cases:
        for size in args.kv_sizes.split(","):
            latent = PX[size]
            base = models.preset("PixArt-Sigma-XL-2-2K-MS", **over)
            kv = dataclasses.replace(base, kv_compress_layers=tuple(range(base.depth // 2, base.depth)))
            load = wait_quiet(args.wait_quiet)
            t = time_interleaved(
                {
                    "plain": (jax_forward(base, args.batch, latent), jax_sync),
                    "kv": (jax_forward(kv, args.batch, latent), jax_sync),
                },
                **timing,
            )
            plain, comp = t["plain"], t["kv"]
            emit(
                {
                    "case": f"PixArt-Sigma KV compression R=2 layers {base.depth // 2}-{base.depth - 1}, {size}",
                    "dtype": args.dtype,
                    "batch": args.batch,
                    "depth": base.depth,
                    "tokens": (latent // 2) ** 2,
                    "plain_ms": round(plain["median_ms"], 2),
                    "kv_ms": round(comp["median_ms"], 2),
                    "time_cut": round(1 - comp["median_ms"] / plain["median_ms"], 3),
                    "time_cut_by_min": round(1 - comp["min_ms"] / plain["min_ms"], 3),
                    "iters": args.iters,
                    "load_before": load,
                    "load": plain["load"],
                }
            )


if __name__ == "__main__":
    main()
