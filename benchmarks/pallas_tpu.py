"""The Pallas flash-attention kernels compiled ahead of time for one TPU chip, on a CPU host (libtpu, no TPU).

  pip install -e ".[tpu]"
  JAX_PLATFORMS=cpu python -m benchmarks.pallas_tpu --topology v5e-4 --tokens 4096,16384 --head-dims 64,72,88,128

For each token count and head_dim, self-attention (batch ``--batch``, ``--heads`` heads, ``--dtype``) is compiled by
XLA:TPU with Mosaic, forward alone and forward + backward (``jax.grad`` of a weighted sum: the forward kernel and the
dK/dV and dQ kernels), in two variants:

- ``true``: ``pallas_attention`` at the true head_dim (dit_jax's kernel);
- ``pad128``: q, k, v zero-padded to head_dim 128 around the same kernel and the output sliced back (the padding
  maxdiffusion's TPU kernels apply to head_dims 64/72/88), scale from the true head_dim.

Each JSON line gives XLA's compiled memory (``memory_analysis``: arguments, outputs, temporaries) and its cost
analysis (FLOPs and bytes accessed: for the kernels these are the cost estimates the kernels declare; the pad and
slice passes around them are XLA's own). A compile failing in Mosaic (e.g. a tile it cannot lay out) is one line
with its error. No time is measured: that needs a TPU.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import emit
from dit_jax.nn.pallas_attention import pallas_attention
from dit_jax.plan import topology_devices

LANES = 128


def attention(variant: str, head_dim: int):
    """``(q, k, v) -> out`` at the true head_dim or zero-padded to 128 lanes."""
    if variant == "true" or head_dim % LANES == 0:
        return lambda q, k, v: pallas_attention(q, k, v, interpret=False)
    pad = [(0, 0)] * 3 + [(0, -head_dim % LANES)]

    def padded(q, k, v):
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        return pallas_attention(q, k, v, scale=head_dim**-0.5, interpret=False)[..., :head_dim]

    return padded


def train(fn, head_dim: int):
    weights = jnp.cos(jnp.arange(head_dim, dtype=jnp.float32))
    return jax.grad(lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * weights).sum(), argnums=(0, 1, 2))


def compile_case(fn, shape, dtype, sharding) -> dict:
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)] * 3
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a kernel Mosaic rejects is a result here
        return {"compiled": False, "error": str(e).splitlines()[0][:400]}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = lambda n: round(n / 2**30, 4)  # noqa: E731
    return {
        "compiled": True,
        "compile_s": round(time.perf_counter() - t0, 2),
        "argument_gib": gib(mem.argument_size_in_bytes),
        "output_gib": gib(mem.output_size_in_bytes),
        "temp_gib": gib(mem.temp_size_in_bytes),
        "tflops": round(float(cost.get("flops", 0.0)) / 1e12, 4),
        "bytes_accessed_gib": gib(float(cost.get("bytes accessed", 0.0))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5e-4", help="TPU slice or topology (dit_jax.plan); its first chip is used")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--head-dims", default="64,72,88,128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--passes", default="forward,train")
    args = ap.parse_args()

    device = topology_devices(args.topology)[0]
    sharding = NamedSharding(Mesh(np.array([device]), ("chip",)), P())
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    for tokens in (int(t) for t in args.tokens.split(",")):
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            for pass_ in args.passes.split(","):
                for variant in ("true",) if head_dim % LANES == 0 else ("true", "pad128"):
                    fn = attention(variant, head_dim)
                    fn = fn if pass_ == "forward" else train(fn, head_dim)
                    shape = (args.batch, tokens, args.heads, head_dim)
                    emit({
                        "device": f"{device.device_kind} (compile-only, libtpu; {args.topology})",
                        "case": f"pallas attention {args.heads}x{head_dim}, {tokens} tokens, {pass_}, {variant}",
                        "dtype": args.dtype, "batch": args.batch, "tokens": tokens, "head_dim": head_dim,
                        "pass": pass_, "variant": variant,
                        **compile_case(fn, shape, dtype, sharding),
                    })  # fmt: skip


if __name__ == "__main__":
    main()
