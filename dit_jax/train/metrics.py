"""What a user sees: ``WORKDIR/metrics.jsonl``, TensorBoard events, a progress bar, peak FLOPs for MFU.

Only process 0 writes. A resumed run appends, after dropping records newer than the restored checkpoint (they
belong to steps that are about to be trained again), so the file holds exactly one record per logged step.
"""

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from dit_jax.files import write_atomic

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device (a v4 chip = one JAX device in megacore mode).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (default: the first), or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name) or name in kind:
            return PEAK_FLOPS[name]
    return None


def _to_python(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:  # NaN → null keeps the file valid JSON
        return None
    return v


class MetricWriter:
    """JSON lines and TensorBoard scalars, written by process 0 only."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard events")

    def _truncate(self, resume_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        if len(kept) != len(lines):
            write_atomic(self.path, lambda tmp: tmp.write_text("".join(kept)))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Steps/s and images/s between two log points (excludes the first step's compile time)."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.time
        return (step - self.step) / elapsed if elapsed > 0 and step > self.step else 0.0


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` in file order."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
