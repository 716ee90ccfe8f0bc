"""Building the XLA:CPU kernels (``cpu_attention.cc``, ``cpu_dense.cc``) with the host's C++ compiler.

Each kernel is compiled on first use (``$CXX`` or ``c++``, ``-O3 -march=native``) against the FFI headers that jaxlib
ships, into ``$DIT_JAX_CACHE_DIR`` (default ``~/.cache/dit_jax``) under a key of the source, the compiler command,
jaxlib and the CPU, and loaded from there afterwards. ``DIT_JAX_CPU_KERNEL=0`` turns every kernel off.
"""

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import jax


def cache_dir() -> Path:
    return Path(os.environ.get("DIT_JAX_CACHE_DIR") or Path.home() / ".cache" / "dit_jax")


def _switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").lower() in ("0", "false", "no", "off")


_lock = threading.Lock()


def load_once(state: dict, what: str, fallback: str, setup: Callable[[], None], switch: str | None = None):
    """Run ``setup`` (build, load and register a kernel, filling ``state``) once per process; the reason the kernel is
    unavailable, or None. ``DIT_JAX_CPU_KERNEL=0`` (or the kernel's own ``switch`` variable) turns it off; a failure
    warns once, naming what takes the kernel's place (``fallback``)."""
    with _lock:
        if "reason" not in state:
            reason = None
            for variable in ("DIT_JAX_CPU_KERNEL", switch):
                if variable and _switched_off(variable):
                    reason = f"disabled by {variable}"
                    break
            else:
                try:
                    setup()
                except (RuntimeError, OSError, AttributeError) as e:
                    reason = f"the CPU {what} kernel is unavailable: {e}"
                    warnings.warn(f"dit_jax: {reason}; {fallback}", RuntimeWarning, stacklevel=4)
            state["reason"] = reason
        return state["reason"]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags (Linux), else the machine name."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


# Tuned for the host's CPU; compilers that do not take -march=native (clang for Apple silicon) get -mcpu=native,
# and a compiler that takes neither builds for its default target.
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])


def _compile_command(source: Path, out: Path, arch: list[str] = _ARCH_FLAGS[0]) -> list[str]:
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    flags = ["-O3", *arch, "-std=gnu++17", "-ffp-contract=fast", "-fPIC", "-shared"]
    return [*cxx, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(out)]


def build(source: Path) -> Path:
    """The compiled ``source``'s path, compiling it into the cache first if it is not there.

    Raises ``RuntimeError`` with the compiler's message when it cannot be compiled (nothing is left in the cache).
    """
    import jaxlib

    probe = _compile_command(source, Path("x"))
    key = hashlib.sha256(
        b"\0".join(
            [source.read_bytes(), " ".join(probe).encode(), jaxlib.__version__.encode(), _cpu_signature().encode()]
        )
    ).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    what = source.stem.removeprefix("cpu_")
    print(f"dit_jax: compiling the CPU {what} kernel into {lib} (once per machine)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        tmp_lib = Path(tmp) / lib.name
        errors = []
        for arch in _ARCH_FLAGS:
            command = _compile_command(source, tmp_lib, arch)
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"could not run the C++ compiler ({e})") from None
            if proc.returncode == 0:
                break
            errors.append(proc.stderr or proc.stdout)
        else:  # the first attempt's message: the later ones differ only by the target flags
            raise RuntimeError(f"the C++ compiler failed:\n{errors[0][-2000:]}")
        os.replace(tmp_lib, lib)  # atomic: a concurrent build of the same key writes the same file
    return lib
