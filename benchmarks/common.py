"""Shared helpers for the side-by-side benchmarks: device description, timing, one JSON line per case."""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def device_description() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{d.platform} {d.device_kind}"


PEAK_FLOPS = {  # dense bf16 FLOP/s per device, for MFU
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "TPU v4": 275e12,
}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def time_calls(fn: Callable[[], object], *, warmup: int = 2, iters: int = 5, sync: Callable[[object], None]) -> dict:
    """Median/min wall time (ms) of ``fn()`` after ``warmup`` calls; ``sync`` blocks until the result is ready."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def jax_sync(x) -> None:
    jax.block_until_ready(x)


def torch_sync(x) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(record: dict) -> None:
    """Print one JSON line (the format BENCHMARKS.md is built from)."""
    record = {"device": device_description(), "date": time.strftime("%Y-%m-%d"), **record}
    print(json.dumps(record), flush=True)
