#!/usr/bin/env bash
# Run a command with PyTorch's bundled Intel MKL taking its Intel code path on a non-Intel (AMD) CPU.
#
# MKL checks the CPU vendor and gives AMD CPUs a slow generic GEMM path (measured on a 2-core AMD EPYC host:
# fp32 linear 41 GFLOP/s stock vs 166 GFLOP/s with this shim; XLA:CPU reaches ~175). A CPU comparison against
# stock torch on AMD therefore measures MKL's vendor check, not the framework. The shim overrides MKL's
# `mkl_serv_intel_cpu_true` through LD_PRELOAD; it touches nothing else (JAX does not use MKL).
#
#   benchmarks/with_mkl_intel_path.sh python -m benchmarks.forward --cases dit
set -euo pipefail
lib="${TMPDIR:-/tmp}/dit_jax_mkl_intel_path.so"
if [[ ! -f "$lib" ]]; then
  src="$(mktemp --suffix=.c)"
  echo 'int mkl_serv_intel_cpu_true(void) { return 1; }' > "$src"
  cc -shared -fPIC -O2 -o "$lib.tmp" "$src" && mv "$lib.tmp" "$lib"
  rm -f "$src"
fi
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"
