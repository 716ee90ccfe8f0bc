"""Flash attention for XLA:CPU: a C++ kernel (``cpu_attention.cc``) called as an XLA FFI custom call.

XLA:CPU runs the blockwise recurrence's small matmuls at a fraction of the host's FLOP rate (BENCHMARKS.md, Issue 10),
so on CPU the attention forward is a hand-written flash kernel: register-tiled ``q kᵀ`` and ``p v`` with the online
softmax in fp32, one (batch, head, query run) per task on XLA's intra-op thread pool. It is exact to fp32 round-off
against the materialised reference (its ``exp`` is a polynomial within a few ulps), takes any head_dim up to 128 at
its true size, and key masks (``(B|1, 1, 1, S)``); a mask over heads or queries falls back to ``blockwise_attention``.

The kernel is compiled on first use (``dit_jax.nn.cpu_build``) with the host's C++ compiler (``$CXX`` or ``c++``,
``-O3 -march=native``) against the FFI headers that jaxlib ships, into ``$DIT_JAX_CACHE_DIR`` (default
``~/.cache/dit_jax``) under a key of the source, the compiler, jaxlib and the CPU, and loaded from there afterwards (a
few seconds once per machine). Without a compiler, or with ``DIT_JAX_CPU_KERNEL=0``, ``available()`` is False with
the reason, ``attention_backend="auto"`` keeps the XLA path and ``backend="cpu"`` raises ``NotImplementedError``
naming the reason.

Gradients: the kernel also returns each query row's softmax max and normaliser, from which ``blockwise_attention``'s
backward pass recomputes the probabilities block by block (FlashAttention-2), so training memory stays
O(tokens × chunk) and the forward is not run twice. Inputs of other float dtypes are computed in fp32 and cast back.
When the computation is lowered for a platform other than CPU (an ahead-of-time plan for a TPU on a CPU host), the
blockwise path takes its place. Like any custom call without a stability guarantee, the kernel cannot be serialised
with ``jax.export`` for CPU: export with ``DIT_JAX_CPU_KERNEL=0`` (or ``backend="xla"``).

``python -m dit_jax.nn.cpu_attention`` builds the kernel ahead of its first use (a container image, a cluster's login
node before the jobs start, with ``DIT_JAX_CACHE_DIR`` on shared storage), checks it against XLA's materialised
attention and prints where it is, then does the same for the dense-layer kernel (``dit_jax.nn.cpu_dense``); it exits
with status 1 and the reason if a kernel cannot be built or differs from XLA's (a host without a usable BLAS only
says so: dense layers then keep XLA's dot).
"""

import argparse
import ctypes
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.nn import blockwise, cpu_build
from dit_jax.nn.blockwise import blockwise_attention
from dit_jax.nn.kernel_inputs import attention_mask, check_qkv, key_mask_row, per_device

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "dit_jax_cpu_attention"
MAX_HEAD_DIM = 128
_state: dict = {}


def _build() -> Path:
    """The compiled kernel's path, compiling it into the cache first if it is not there."""
    return cpu_build.build(SOURCE)


def _setup():
    _state["library"] = path = _build()
    library = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.DitJaxCpuAttention), platform="cpu")


def _load() -> str | None:
    """Build, load and register the kernel once per process; the reason it is unavailable, or None."""
    return cpu_build.load_once(_state, "attention", "attention keeps the XLA path", _setup)


def available() -> bool:
    """Whether the kernel is built and registered in this process (building it on first call)."""
    return _load() is None


def supports(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
    """Whether the kernel takes these shapes (else ``cpu_attention`` falls back to the blockwise path)."""
    return q.shape[-1] <= MAX_HEAD_DIM and k.shape[1] > 0 and (mask is None or key_mask_row(mask) is not None)


def _kernel(q, k, v, key_mask, scale, has_mask):
    """(out (B, T, H, D), row max (B, H, T), normaliser (B, H, T)), fp32."""
    b, t, h, _ = q.shape
    stat = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(q.shape, jnp.float32), stat, stat), vmap_method="sequential")
    return call(q, k, v, key_mask, scale=np.float32(scale), has_mask=bool(has_mask))


def _blockwise(q, k, v, key_mask, scale, has_mask):
    """The same triple from the XLA blockwise path."""
    mask = key_mask[:, None, None, :] if has_mask else None
    out, (m, norm) = blockwise._forward(q, k, v, mask, scale, blockwise.Q_CHUNK, blockwise.KV_CHUNK)
    return out, m, norm


def _forward(q, k, v, key_mask, scale, has_mask):
    """The kernel when lowered for CPU, the blockwise path for any other platform (chosen at lowering)."""
    return jax.lax.platform_dependent(
        q, k, v, key_mask,
        cpu=lambda *a: _kernel(*a, scale, has_mask),
        default=lambda *a: _blockwise(*a, scale, has_mask),
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, key_mask, scale, has_mask):
    """fp32 q, k, v; key_mask (B, S) bool."""
    return _forward(q, k, v, key_mask, scale, has_mask)[0]


def _attention_fwd(q, k, v, key_mask, scale, has_mask):
    out, m, norm = _forward(q, k, v, key_mask, scale, has_mask)
    return out, (q, k, v, key_mask, out, m, norm)


def _attention_bwd(scale, has_mask, res, g):
    """blockwise_attention's backward pass (FlashAttention-2's recomputation) from the kernel's row statistics."""
    q, k, v, key_mask, out, m, norm = res
    mask = key_mask[:, None, None, :] if has_mask else None
    dq, dk, dv = blockwise._backward(q, k, v, mask, out, (m, norm), g, scale, blockwise.Q_CHUNK, blockwise.KV_CHUNK)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, scale: float | None = None):
    """``softmax(q kᵀ · scale) v`` with the CPU kernel (see the module docstring).

    q: B T H D; k, v: B S H D; mask: None or bool broadcastable to (B, H, T, S). Raises ``NotImplementedError`` when
    the kernel cannot be built here; shapes it does not take (head_dim > 128, masks over heads or queries) run the
    blockwise path.
    """
    reason = _load()
    if reason is not None:
        raise NotImplementedError(reason)
    check_qkv("cpu_attention", q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = attention_mask("cpu_attention", mask)
    if not supports(q, k, mask):
        return blockwise_attention(q, k, v, mask, scale)
    dtype = jnp.result_type(q, k, v)
    b, s = q.shape[0], k.shape[1]
    has_mask = mask is not None
    key_mask = jnp.broadcast_to(key_mask_row(mask), (b, s)) if has_mask else jnp.ones((b, s), bool)
    run = lambda q, k, v, km: _attention(q, k, v, km, float(scale), has_mask)  # noqa: E731
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return per_device(run, q, k, v, key_mask).astype(dtype)


def _check_dense() -> str:
    """Build (or find) the dense-layer kernel and check one product; its line for ``main``'s report."""
    from dit_jax.nn import cpu_dense

    if not cpu_dense.available():
        return f"(dense layers keep XLA's dot: {cpu_dense.describe()})"
    ka, kb = jax.random.split(jax.random.key(1))
    a, b = jax.random.normal(ka, (96, 80), jnp.float32), jax.random.normal(kb, (80, 64), jnp.float32)
    got = jax.jit(cpu_dense.matmul)(a, b)
    err = float(jnp.max(jnp.abs(got - jnp.dot(a, b, precision="highest"))))
    if not err < 1e-4:
        raise RuntimeError(f"the CPU dense kernel at {cpu_dense._state['library']} differs from XLA's dot by {err:.3g}")
    return f"{cpu_dense.describe()}\n(checked against XLA's dot: max |difference| {err:.2e})"


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the CPU kernels for this machine, check them once, and say where they are."""
    parser = argparse.ArgumentParser(
        prog="python -m dit_jax.nn.cpu_attention",
        description="Build the CPU attention kernel (and the dense-layer one, dit_jax.nn.cpu_dense) into the cache "
        "now and check them against XLA's attention and dot.",
    )
    parser.parse_args(argv)
    reason = _load()
    if reason is not None:
        print(f"dit_jax: {reason}", file=sys.stderr)
        return 1
    with jax.default_device(jax.devices("cpu")[0]):  # on a GPU host too: the checks must lower for CPU
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, 200, 2, 72), jnp.float32) for key in keys)
        got = jax.jit(cpu_attention)(q, k, v)
        err = float(jnp.max(jnp.abs(got - jax.nn.dot_product_attention(q, k, v, implementation="xla"))))
        if not err < 1e-4:
            print(
                f"dit_jax: the CPU attention kernel at {_state['library']} differs from the reference by {err:.3g}",
                file=sys.stderr,
            )
            return 1
        try:
            dense = _check_dense()
        except RuntimeError as e:
            print(f"dit_jax: {e}", file=sys.stderr)
            return 1
    print(f"{_state['library']}\n(checked against the reference attention: max |difference| {err:.2e})\n{dense}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
