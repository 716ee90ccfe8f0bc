"""The package's imports point strictly downward and form no cycle, and the shared rooms never name a model family.

Layers (README "Layout"): foundation (files, parallel, diffusion) ← (nn, quantize) ← models ← (encoders, convert,
checkpoint, runs) ← (pipelines, train, data) ← entry points. Every import statement counts, also those inside
functions. Within a layer arrows are allowed, but no cycle, neither between modules nor between packages.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent / "dit_jax"

LAYERS = [
    {"dit_jax", "dit_jax.files", "dit_jax.parallel", "dit_jax.diffusion"},
    {"dit_jax.nn", "dit_jax.quantize"},
    {"dit_jax.models"},
    {"dit_jax.encoders", "dit_jax.convert", "dit_jax.checkpoint", "dit_jax.runs", "dit_jax.lora"},
    {"dit_jax.pipelines", "dit_jax.train", "dit_jax.data", "dit_jax.metrics", "dit_jax.features"},
    {
        "dit_jax.sample",
        "dit_jax.evaluate",
        "dit_jax.evaluate_video",
        "dit_jax.plan",
        "dit_jax.train.__main__",
        "dit_jax.convert.__main__",
        "dit_jax.demo",
        "dit_jax.cli",
    },
]
# Rooms that reach a family only through dit_jax.models.family (DESIGN.md rule 11).
FAMILY_FREE = ["train", "pipelines", "plan.py", "evaluate.py", "evaluate_video.py", "sample.py", "convert/api.py",
               "train/__main__.py"]  # fmt: skip
FAMILY_NAME = re.compile(r"DiT(?!F)|PixArt|(^|\.)(dit|pixart)$")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(name: str) -> int:
    best, level = "", None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, i
    assert level is not None, f"{name} is in no layer: add it to LAYERS (and README's Layout)"
    return level


def package_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def imports_of(name: str) -> set[str]:
    """dit_jax modules that ``name`` imports anywhere in its source (``from a import b`` → ``a.b`` if a module)."""
    tree = ast.parse(MODULES[name].read_text())
    is_package = MODULES[name].name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m.split(".")[0] == "dit_jax" and m in MODULES and not name.startswith(m + ".")}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer_and_imports_point_down():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_modules_or_packages():
    assert find_cycle(GRAPH) is None, f"module cycle: {' -> '.join(find_cycle(GRAPH))}"
    packages: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        packages.setdefault(package_of(a), set()).update(
            package_of(b) for b in targets if package_of(b) != package_of(a)
        )
    assert find_cycle(packages) is None, f"package cycle: {' -> '.join(find_cycle(packages))}"


def test_the_checker_sees_upward_imports_and_cycles():
    """The walk above would catch a violation: a function-level import and a two-module cycle."""
    assert "dit_jax.checkpoint" in GRAPH["dit_jax.pipelines.loading"]  # a module-level import is seen
    assert "dit_jax.runs" in GRAPH["dit_jax.pipelines.loading"]  # so is one inside a function
    assert layer_of("dit_jax.train.grids") > layer_of("dit_jax.models.family")
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def _names(path: pathlib.Path) -> set[str]:
    """Identifiers, attributes and imported module names of a file (docstrings, comments and strings excluded)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {a.name for a in node.names}
    return names


def test_shared_rooms_name_no_model_family():
    files = [
        p for room in FAMILY_FREE for p in ([ROOT / room] if room.endswith(".py") else (ROOT / room).rglob("*.py"))
    ]
    assert len(files) > 15
    found = {f"{p.relative_to(ROOT)}: {n}" for p in files for n in _names(p) if FAMILY_NAME.search(n)}
    assert not found, "family names in shared rooms (use dit_jax.models.family):\n" + "\n".join(sorted(found))
    assert FAMILY_NAME.search("DiTConfig") and FAMILY_NAME.search("dit_jax.models.pixart")
    assert not FAMILY_NAME.search("dit_jax.models") and not FAMILY_NAME.search("edit")
