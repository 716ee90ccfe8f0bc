"""Shared helpers for the side-by-side benchmarks: device description, timing, one JSON line per case.

The JAX path and its PyTorch reference run in the same process on the same device. ``time_interleaved`` times
them round-robin (one call of each in turn), so a change in machine load during a case hits both sides alike;
every record carries the 1-minute load average seen while it was timed. Absolute times count only on a GPU/TPU;
on a CPU quote the ratios (DESIGN.md, "Benchmarks").
"""

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax

# JAX and torch share one device in these benchmarks: JAX must not take 75% of GPU memory up front. (Read when the
# backend starts, so setting it here, before any computation, is in time.)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def device_description() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {_cpu_model() or platform.processor() or platform.machine()})"
    return f"{d.platform} {d.device_kind}"


def on_accelerator() -> bool:
    """True when JAX runs on a GPU or TPU (then bf16 is the default compute dtype and absolute times count)."""
    return jax.default_backend() in ("gpu", "tpu")


def default_dtype() -> str:
    """``bf16`` on an accelerator, ``fp32`` on a CPU (XLA:CPU and torch CPU are slow and inexact in bf16)."""
    return "bf16" if on_accelerator() else "fp32"


PEAK_FLOPS = {  # dense bf16 FLOP/s per device, for MFU
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def load_average() -> float:
    """The machine's 1-minute load average (the timing noise on a shared CPU host)."""
    return round(os.getloadavg()[0], 2)


def wait_quiet(max_load: float | None, *, timeout_s: float = 1800.0, poll_s: float = 15.0) -> float:
    """Block until the 1-minute load average is below ``max_load`` (None: don't wait); returns the load seen.

    On a shared CPU host other jobs distort timings; call this between cases. Gives up after ``timeout_s`` and
    goes on (the record's load fields then say how busy the machine was)."""
    load = load_average()
    if max_load is None:
        return load
    t0 = time.monotonic()
    while load >= max_load and time.monotonic() - t0 < timeout_s:
        time.sleep(poll_s)
        load = load_average()
    return load


def _summary(times: list[float], loads: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "iters": len(times),
        "load": [min(loads), max(loads)],
    }


def time_calls(fn: Callable[[], object], *, warmup: int = 2, iters: int = 5, sync: Callable[[object], None]) -> dict:
    """Median/min wall time (ms) of ``fn()`` after ``warmup`` calls; ``sync`` blocks until the result is ready."""
    for _ in range(warmup):
        sync(fn())
    times, loads = [], []
    for _ in range(iters):
        loads.append(load_average())
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, loads)


def time_interleaved(
    fns: dict[str, tuple[Callable[[], object], Callable[[object], None]]], *, warmup: int = 2, iters: int = 5
) -> dict[str, dict]:
    """Time several ``name: (fn, sync)`` round-robin: after ``warmup`` calls of each, iteration i of every fn runs
    before iteration i + 1 of any, so load changes during the case affect all sides. Returns ``time_calls``'s
    summary per name."""
    for fn, sync in fns.values():
        for _ in range(warmup):
            sync(fn())
    times = {name: [] for name in fns}
    loads = []
    for _ in range(iters):
        loads.append(load_average())
        for name, (fn, sync) in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[name].append((time.perf_counter() - t0) * 1e3)
    loads.append(load_average())
    return {name: _summary(t, loads) for name, t in times.items()}


def comparison_fields(jax_t: dict, torch_t: dict | None, load_before: float | None) -> dict:
    """The fields every side-by-side record shares: the median ratio, the fastest-call times and their ratio (on a
    shared host the minimum is the least load-distorted estimate), the iteration count and the load seen."""
    rec = {"jax_min_ms": round(jax_t["min_ms"], 2)}
    if torch_t is not None:
        rec["speedup_vs_torch"] = round(torch_t["median_ms"] / jax_t["median_ms"], 3)
        rec["torch_min_ms"] = round(torch_t["min_ms"], 2)
        rec["speedup_by_min"] = round(torch_t["min_ms"] / jax_t["min_ms"], 3)
    rec.update(iters=jax_t["iters"], load_before=load_before, load=jax_t["load"])
    return rec


def jax_sync(x) -> None:
    jax.block_until_ready(x)


def torch_sync(x) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str):
    import torch

    return torch.bfloat16 if dtype == "bf16" else torch.float32


def jax_dtype(dtype: str) -> str:
    """The model-config spelling of a benchmark dtype."""
    return "bfloat16" if dtype == "bf16" else "float32"


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def _cpu_model() -> str | None:
    return _cpuinfo("model name")


def cpu_vendor() -> str | None:
    return _cpuinfo("vendor_id")


def torch_cpu_blas() -> str | None:
    """How torch's CPU matmuls run, when torch is loaded and runs on the CPU: MKL on a non-Intel CPU takes a slow
    generic path unless benchmarks/with_mkl_intel_path.sh forced its Intel path (see that script)."""
    torch = sys.modules.get("torch")
    if torch is None or torch.cuda.is_available() or "mkl" not in torch.__config__.show().lower():
        return None
    vendor = cpu_vendor()
    if vendor == "GenuineIntel":
        return "MKL"
    if "mkl_intel_path" in os.environ.get("LD_PRELOAD", ""):
        return f"MKL, Intel code path forced on {vendor} (benchmarks/with_mkl_intel_path.sh)"
    return f"MKL, stock (generic code path on {vendor})"


def emit(record: dict) -> None:
    """Print one JSON line (the format BENCHMARKS.md is built from)."""
    record = {"device": device_description(), "date": time.strftime("%Y-%m-%d"), **record}
    blas = torch_cpu_blas()
    if blas and any(k.startswith("torch") for k in record):
        record["torch_cpu_blas"] = blas
    print(json.dumps(record), flush=True)
