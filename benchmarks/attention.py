"""Attention alone: dit_jax's backends vs torch ``scaled_dot_product_attention``.

  python -m benchmarks.attention                                  # 1,024 / 2,048 / 4,096 tokens, 16 heads × 72
  python -m benchmarks.attention --tokens 4096 --backends cpu,blockwise --iters 5

Self-attention without a mask, batch ``--batch``, ``--heads`` × ``--head-dim`` (default PixArt: 16 × 72), fp32 on a
CPU. Each side takes its own layout (dit_jax ``B T H D``, torch ``B H T D``), random inputs shared by both. All the
backends and torch SDPA are timed round-robin in one process (``time_interleaved``); one JSON line per dit_jax
backend and size, each against the same torch timing (see benchmarks/common.py). On CPU ``auto`` is ``cpu`` (the C++
flash kernel, ``dit_jax.nn.cpu_attention``) when it builds; ``xla`` is ``dense`` below 1024² logits per head and
``blockwise`` from there, i.e. ``blockwise`` at every size here.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    comparison_fields,
    default_dtype,
    emit,
    jax_sync,
    on_accelerator,
    time_interleaved,
    torch_device,
    torch_dtype,
    torch_sync,
    wait_quiet,
)
from dit_jax.nn.attention import dot_product_attention
from dit_jax.nn.blockwise import KV_CHUNK, Q_CHUNK


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """q kᵀ and p v: 2 × 2·B·H·T²·D multiply-adds (the softmax not counted)."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def main():
    on_gpu = on_accelerator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,2048,4096")
    ap.add_argument("--backends", default="cpu,blockwise,dense")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--dtype", default=default_dtype(), choices=["bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=10 if on_gpu else 7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each case, wait for load average < X")
    ap.add_argument("--wait-max", type=float, default=1800.0, help="--wait-quiet gives up after this many seconds")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    jdtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    for tokens in (int(t) for t in args.tokens.split(",")):
        load = wait_quiet(args.wait_quiet, timeout_s=args.wait_max)
        rng = np.random.default_rng(0)
        shape = (args.batch, tokens, args.heads, args.head_dim)  # B T H D
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        fns = {}
        for name in args.backends.split(","):
            fn = jax.jit(functools.partial(dot_product_attention, backend=name))
            jq, jk, jv = (jnp.asarray(x, jdtype) for x in (q, k, v))
            fns[name] = (functools.partial(fn, jq, jk, jv), jax_sync)
        if not args.no_torch:
            import torch
            import torch.nn.functional as F

            tq, tk, tv = (
                torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(
                    torch_device(), torch_dtype(args.dtype)
                )
                for x in (q, k, v)
            )  # B H T D, torch's layout

            def torch_run(tq=tq, tk=tk, tv=tv):
                with torch.inference_mode():
                    return F.scaled_dot_product_attention(tq, tk, tv)

            fns["torch"] = (torch_run, torch_sync)
        t = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
        torch_t = t.get("torch")
        flops = attention_flops(args.batch, args.heads, tokens, args.head_dim)
        for name in args.backends.split(","):
            jt = t[name]
            rec = {
                "case": f"attention {args.heads}x{args.head_dim}, {tokens} tokens, {name}",
                "backend": name,
                "dtype": args.dtype,
                "batch": args.batch,
                "tokens": tokens,
                "jax_ms": round(jt["median_ms"], 2),
                "gflops_per_s": round(flops / jt["median_ms"] / 1e6, 1),
            }
            if name == "blockwise":
                rec.update(q_chunk=Q_CHUNK, kv_chunk=KV_CHUNK)
            if torch_t is not None:
                rec["torch_ms"] = round(torch_t["median_ms"], 2)
                rec["torch_gflops_per_s"] = round(flops / torch_t["median_ms"] / 1e6, 1)
            rec.update(comparison_fields(jt, torch_t, load))
            rec["load"] = t[next(iter(t))]["load"]
            emit(rec)


if __name__ == "__main__":
    main()
