"""VAE decode/encode latency at 1024 and 2K px: dit_jax's Flax ``AutoencoderKL`` vs diffusers ``AutoencoderKL``
(same device, same run, same random weights exported through ``dit_jax.convert.vae``).

  python -m benchmarks.vae                                   # GPU: 1024 and 2K, untiled and tiled, bf16
  python -m benchmarks.vae --sizes 1024 --ops decode         # CPU: one size (each call takes tens of seconds)

Cases per size: ``untiled`` (the whole image in one call) and ``tiled`` (dit_jax ``decode_tiled``/``encode_tiled``
against diffusers ``enable_tiling()``: tiles of ``--tile`` px (default ``config.sample_size``), 25% overlap; skipped
when the image fits in one tile). dit_jax's tiling runs ``norm_passes`` extra passes to collect whole-image
GroupNorm statistics (default 2: tiled ≈ untiled); ``norm_passes=0`` normalises per tile as diffusers does and is
the like-for-like case. The preset is the SDXL VAE (SD layout: 4 blocks 128/256/512/512, 2 layers, 32 groups,
1024-px tiles). One JSON line per case (see benchmarks/common.py).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.builders import jax_vae_params, torch_vae
from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_dtype,
    jax_sync,
    on_accelerator,
    time_interleaved,
    torch_device,
    torch_dtype,
    torch_sync,
    wait_quiet,
)
from dit_jax.encoders import AutoencoderKL, decode_tiled, encode_tiled, vae_preset

PX = {"256": 256, "512": 512, "1024": 1024, "2K": 2048, "4K": 4096}


def jax_fn(vae: AutoencoderKL, params, op: str, x, tiled: bool, norm_passes: int, tile: int):
    if op == "decode":
        f = (
            (lambda p, z: decode_tiled(vae, p, z, tile_size=tile, norm_passes=norm_passes))
            if tiled
            else (lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
        )
    else:
        f = (
            (lambda p, im: encode_tiled(vae, p, im, tile_size=tile, norm_passes=norm_passes)[0])
            if tiled
            else (lambda p, im: vae.apply({"params": p}, im, method=AutoencoderKL.encode)[0])
        )
    f = jax.jit(f)
    return lambda: f(params, x)


def torch_fn(model, op: str, x, tiled: bool):
    import torch

    def run():
        if tiled:
            model.enable_tiling()
        else:
            model.disable_tiling()
        with torch.inference_mode():
            if op == "decode":
                return model.decode(x).sample
            return model.encode(x).latent_dist.mean

    return run


def main():
    on_acc = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2K")
    ap.add_argument("--ops", default="decode,encode")
    ap.add_argument("--modes", default="untiled,tiled")
    ap.add_argument("--norm-passes", default="0,2", help="dit_jax tiled GroupNorm passes to time (comma list)")
    ap.add_argument("--preset", default="sdxl")
    ap.add_argument("--tile", type=int, default=None, help="tile size in px (default: the preset's sample_size)")
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5 if on_acc else 2)
    ap.add_argument("--warmup", type=int, default=2 if on_acc else 1)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    args = ap.parse_args()

    cfg = vae_preset(args.preset, dtype=jax_dtype(args.dtype))
    params32 = jax_vae_params(cfg)
    params = params32
    if args.dtype == "bf16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # as vae.to(torch.bfloat16)
    vae = AutoencoderKL(cfg)
    f = cfg.downsample_factor
    tile = args.tile or cfg.sample_size
    if not args.no_torch:
        import torch

        device, tdtype = torch_device(), torch_dtype(args.dtype)
        t_model = torch_vae(cfg, params32, device, tdtype).eval()
        t_model.tile_sample_min_size, t_model.tile_latent_min_size = tile, tile // f
    rng = np.random.default_rng(0)

    for size in args.sizes.split(","):
        px = PX[size]
        for op in args.ops.split(","):
            shape = (
                (args.batch, px // f, px // f, cfg.latent_channels)
                if op == "decode"
                else (args.batch, px, px, cfg.in_channels)
            )
            x = rng.standard_normal(shape).astype(np.float32)
            if op == "encode":
                x = np.tanh(x)  # images in [-1, 1]
            jx = jnp.asarray(x)
            if not args.no_torch:
                tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
            for mode in args.modes.split(","):
                tiled = mode == "tiled"
                if tiled and px <= tile:
                    continue  # one tile: tiled is untiled
                for passes in [int(p) for p in args.norm_passes.split(",")] if tiled else [None]:
                    load = wait_quiet(args.wait_quiet)
                    fns = {"jax": (jax_fn(vae, params, op, jx, tiled, passes or 0, tile), jax_sync)}
                    if not args.no_torch:
                        fns["torch"] = (torch_fn(t_model, op, tx, tiled), torch_sync)
                    t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
                    rec = {
                        "case": f"VAE {op} {size} ({px}x{px} px), {mode}"
                        + (f", tile {tile} px, dit_jax norm_passes={passes}" if tiled else ""),
                        "preset": args.preset,
                        "dtype": args.dtype,
                        "batch": args.batch,
                        "jax_ms": round(t["jax"]["median_ms"], 1),
                    }
                    if "torch" in t:
                        rec["torch_ms"] = round(t["torch"]["median_ms"], 1)
                    rec.update(comparison_fields(t["jax"], t.get("torch"), load))
                    emit(rec)


if __name__ == "__main__":
    main()
