"""Environment for tests that start `python -m dit_jax.train` (or other) processes of their own."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(devices: int) -> dict[str, str]:
    """This process's environment, on `devices` CPU devices, with the repository importable."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env
