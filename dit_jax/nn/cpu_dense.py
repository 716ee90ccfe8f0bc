"""Dense layers' matrix products on XLA:CPU through an optimised BLAS (``cpu_dense.cc``, an XLA FFI custom call).

XLA:CPU's own dot runs a DiT's large linears (PixArt-Σ at 1024 px: 4096 tokens × 1152 → 1152 / 4608) at 0.7–0.9×
the rate of an optimised BLAS on the same cores (BENCHMARKS.md, Issue 10), and those linears carry about two thirds
of the model's FLOPs. So on CPU, ``layers.Dense`` hands its product to ``cblas_sgemm`` of the OpenBLAS that numpy's
wheels bundle when

- the computation is float32 and contracts x's trailing axes (every ``Dense`` in the models),
- it has at least ``MIN_MACS`` multiply-adds and ``MIN_ROWS`` rows (tokens × batch; smaller ones stay in XLA, whose
  dot is as fast there),
- no mesh splits it over devices (a mesh of one device, or inside ``shard_map``; XLA cannot partition a custom call,
  so a sharded product stays XLA's dot, which it partitions).

The kernel cuts the output into one slab per thread of XLA's intra-op pool and runs each slab as one single-threaded
``cblas_sgemm`` (the BLAS's own thread pool and XLA's would spin against each other). To keep numpy's OpenBLAS and its
thread count untouched, the kernel calls a private copy of the library, kept in the kernel cache and set to one thread.

The gradient uses the same kernel (dx = g·Wᵀ, dW = xᵀ·g), and the product's output is named ``cpu_dense`` so that the
``dots`` remat policies keep saving it as they save XLA's dots (``dit_jax.nn.stack``). Results equal XLA's dot to
fp32 round-off (a different summation order). When the computation is lowered for another platform (an
ahead-of-time TPU plan on a CPU host) XLA's dot takes the kernel's place. The kernel is built like the attention
kernel (``dit_jax.nn.cpu_build``) on first use; without a compiler or a bundled OpenBLAS, or with
``DIT_JAX_CPU_KERNEL=0``, ``available()`` is False with the reason and every product stays XLA's
(``DIT_JAX_CPU_DENSE=0`` turns off this kernel alone). Like any custom call, it cannot be serialised with
``jax.export`` for CPU: export with ``DIT_JAX_CPU_DENSE=0``.
"""

import ctypes
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType

from dit_jax.nn import cpu_build

SOURCE = Path(__file__).with_name("cpu_dense.cc")
TARGET = "dit_jax_cpu_dense"
NAME = "cpu_dense"  # the checkpoint name of the kernel's output (remat policies save it like a dot)
MIN_MACS = 1 << 22  # about 4M multiply-adds: e.g. 1024 tokens × 64 × 64
MIN_ROWS = 512  # rows of x (tokens × batch): fewer, and XLA's dot is as fast (300 caption tokens: 1.02–1.05×)
# cblas_sgemm and openblas_set_num_threads in numpy's OpenBLAS (ILP64: prefixed and suffixed), then plain names
_SGEMM = {"scipy_cblas_sgemm64_": True, "cblas_sgemm64_": True, "cblas_sgemm": False}  # name: 64-bit integers
_SET_THREADS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_state: dict = {}


def _numpy_openblas() -> Path:
    """The OpenBLAS library bundled with numpy's wheels (Linux ``numpy.libs``, macOS ``numpy/.dylibs``)."""
    import numpy

    root = Path(numpy.__file__).parent
    for folder in (root.parent / "numpy.libs", root / ".dylibs"):
        found = sorted(folder.glob("lib*openblas*.so*")) + sorted(folder.glob("lib*openblas*.dylib"))
        if found:
            return found[0]
    raise RuntimeError("this numpy bundles no OpenBLAS library")


def _symbol(library, names):
    for name in names:
        if hasattr(library, name):
            return name, getattr(library, name)
    raise RuntimeError(f"no {names[-1]} in {library._name}")


def _private_blas() -> tuple[int, bool, Path, Path]:
    """(address of cblas_sgemm, whether its integers are 64-bit, numpy's library, the copy) of a private instance
    of numpy's OpenBLAS: a copy of the library in the kernel cache, loaded beside numpy's own (whose thread count
    stays as it is) and set to one thread, since the kernel runs its slabs on XLA's threads."""
    source = _numpy_openblas()
    copy = cpu_build.cache_dir() / "kernels" / f"blas-{source.stat().st_size}-{source.name}"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=copy.parent) as tmp:
            shutil.copyfile(source, Path(tmp) / copy.name)
            os.replace(Path(tmp) / copy.name, copy)  # atomic: a concurrent copy writes the same file
    shared, private = ctypes.CDLL(str(source)), ctypes.CDLL(str(copy))
    name, sgemm = _symbol(private, list(_SGEMM))
    address = ctypes.cast(sgemm, ctypes.c_void_p).value
    if address == ctypes.cast(getattr(shared, name), ctypes.c_void_p).value:
        raise RuntimeError(f"the copy {copy} loaded as numpy's own OpenBLAS")  # never set numpy's to one thread
    _symbol(private, _SET_THREADS)[1](ctypes.c_int(1))
    return address, _SGEMM[name], source, copy


def _setup():
    _state["library"] = path = cpu_build.build(SOURCE)
    library = ctypes.cdll.LoadLibrary(str(path))
    address, ilp64, _state["blas"], _state["blas_copy"] = _private_blas()
    library.DitJaxSetSgemm(ctypes.c_void_p(address), ctypes.c_int(int(ilp64)))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.DitJaxCpuDense), platform="cpu")


def _load() -> str | None:
    """Build, load and register the kernel once per process; the reason it is unavailable, or None."""
    return cpu_build.load_once(_state, "dense", "dense layers keep XLA's dot", _setup, switch="DIT_JAX_CPU_DENSE")


def available() -> bool:
    """Whether the kernel is built and registered in this process (building it on first call)."""
    return _load() is None


def _xla_product(a, b, trans_a, trans_b):
    return jax.lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())))


def _product(a, b, trans_a=False, trans_b=False):
    """``op(a) · op(b)`` for fp32 matrices: the kernel when lowered for CPU, XLA's dot for any other platform."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return jax.lax.platform_dependent(
        a, b,
        cpu=lambda a, b: call(a, b, trans_a=trans_a, trans_b=trans_b),
        default=lambda a, b: _xla_product(a, b, trans_a, trans_b),
    )  # fmt: skip


@jax.custom_vjp
def _matmul(x, w):
    return _product(x, w)


def _matmul_fwd(x, w):
    return _product(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return _product(g, w, trans_b=True), _product(x, g, trans_a=True)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x · w`` for fp32 matrices x (M, K) and w (K, N) with the kernel, its gradient too (call only where
    ``available()``). The product is named ``NAME`` for the remat policies."""
    return checkpoint_name(_matmul(x, w), NAME)


def _unsplit() -> bool:
    """Whether no mesh in context can split the product over devices (none, all manual, or all of size 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    return all(t == AxisType.Manual or size == 1 for size, t in zip(mesh.axis_sizes, mesh.axis_types))


def takes(x: jax.Array, kernel: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether ``dense_product(x, kernel, axes)`` runs on the kernel (building it on first call)."""
    n_in = len(axes)
    macs = math.prod(x.shape) * math.prod(kernel.shape[n_in:])
    return (
        jax.default_backend() == "cpu"
        and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and tuple(a % x.ndim for a in axes) == tuple(range(x.ndim - n_in, x.ndim))
        and macs >= MIN_MACS
        and math.prod(x.shape[: x.ndim - n_in]) >= MIN_ROWS
        and _unsplit()
        and available()
    )


def dense_product(x: jax.Array, kernel: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x's ``axes`` contracted with ``kernel``'s leading axes (``jax.lax.dot_general``), on the kernel where it takes
    the product (see the module docstring) and with XLA's dot otherwise."""
    axes, n_in = tuple(a % x.ndim for a in axes), len(axes)
    if not takes(x, kernel, axes):
        return jax.lax.dot_general(x, kernel, ((axes, tuple(range(n_in))), ((), ())))
    lead, contract, out = x.shape[: x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    k = math.prod(contract)
    y = matmul(x.reshape(math.prod(lead), k), kernel.reshape(k, math.prod(out)))
    return y.reshape(*lead, *out)


def describe() -> str:
    """One line: which BLAS the kernel calls, or why it is unavailable."""
    reason = _load()
    return reason if reason is not None else f"{_state['library']} calling cblas_sgemm of {_state['blas']}"
