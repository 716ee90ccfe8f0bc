"""``import dit_jax`` and every module of it work with the core dependencies alone (DESIGN.md rule 9)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class Block:  # make the optional heavy dependencies unimportable
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "diffusers", "tensorflow", "libtpu"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import dit_jax

    names = sorted(m.name for m in pkgutil.walk_packages(dit_jax.__path__, "dit_jax."))
    for name in names:
        importlib.import_module(name)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "tensorflow"})
    assert not heavy, heavy
    print(len(names), "modules")
    """
)


def test_every_module_imports_without_torch_diffusers_tensorflow():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[0]) > 40
