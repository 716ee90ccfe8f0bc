"""Linear layers alone: dit_jax's CPU dense kernel vs XLA's dot vs torch ``F.linear``.

  python -m benchmarks.dense                                   # PixArt-Σ 1024's linears (4,096 tokens, width 1,152)
  python -m benchmarks.dense --shapes 4096x1152x4608 --iters 11

Each shape is ``tokens × in → out``: x (1, tokens, in) fp32 times a kernel (in, out), no bias. ``kernel`` is
``dit_jax.nn.cpu_dense.dense_product`` (what every ``Dense`` layer calls; it takes the BLAS kernel for products of
at least ``MIN_MACS`` multiply-adds), ``xla`` is ``jax.lax.dot_general``, torch is ``F.linear`` on its (MKL) CPU
BLAS. All three run round-robin in one process (``time_interleaved``); one JSON line per shape, the kernel against
torch, with XLA's figures beside it. The default shapes are PixArt's: attention q/k/v/out and cross-attention q/out
(1,152 → 1,152), fused qkv (→ 3,456), MLP up (→ 4,608) and down (4,608 → 1,152), and the caption's cross-attention
k/v (300 tokens, 4,096 → 1,152 for T5's width in the caption projection).
"""

import argparse
import functools

import jax
import numpy as np

from benchmarks.common import comparison_fields, emit, jax_sync, time_interleaved, torch_sync, wait_quiet
from dit_jax.nn import cpu_dense


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x1152x1152,4096x1152x3456,4096x1152x4608,4096x4608x1152,300x4096x1152")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    ap.add_argument("--wait-max", type=float, default=1800.0, help="--wait-quiet gives up after this many seconds")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit("benchmarks.dense measures the CPU dense kernel: run it on a CPU host")
    print(f"# {cpu_dense.describe()}", flush=True)

    for shape in args.shapes.split(","):
        tokens, d_in, d_out = (int(s) for s in shape.split("x"))
        load = wait_quiet(args.wait_quiet, timeout_s=args.wait_max)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, tokens, d_in), dtype=np.float32)
        w = (rng.standard_normal((d_in, d_out), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32)
        jx, jw = jax.device_put(x), jax.device_put(w)
        kernel = jax.jit(functools.partial(cpu_dense.dense_product, axes=(2,)))
        xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))))
        fns = {name: (functools.partial(fn, jx, jw), jax_sync) for name, fn in (("kernel", kernel), ("xla", xla))}
        err = float(np.abs(np.asarray(fns["kernel"][0]()) - np.asarray(fns["xla"][0]())).max())
        if not args.no_torch:
            import torch
            import torch.nn.functional as F

            tx, tw = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))  # torch's (out, in) weight

            def torch_run(tx=tx, tw=tw):
                with torch.inference_mode():
                    return F.linear(tx, tw)

            fns["torch"] = (torch_run, torch_sync)
        t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
        flops = 2.0 * tokens * d_in * d_out
        rec = {
            "case": f"linear {tokens} x {d_in} -> {d_out}",
            "dtype": "fp32",
            "on_kernel": cpu_dense.takes(jx, jw, (2,)),
            "jax_ms": round(t["kernel"]["median_ms"], 2),
            "gflops_per_s": round(flops / t["kernel"]["median_ms"] / 1e6, 1),
            "xla_ms": round(t["xla"]["median_ms"], 2),
            "xla_gflops_per_s": round(flops / t["xla"]["median_ms"] / 1e6, 1),
            "speedup_vs_xla": round(t["xla"]["median_ms"] / t["kernel"]["median_ms"], 3),
            "max_abs_diff_vs_xla": float(f"{err:.3g}"),
        }
        if "torch" in t:
            rec["torch_ms"] = round(t["torch"]["median_ms"], 2)
            rec["torch_gflops_per_s"] = round(flops / t["torch"]["median_ms"] / 1e6, 1)
        rec.update(comparison_fields(t["kernel"], t.get("torch"), load))
        emit(rec)


if __name__ == "__main__":
    main()
