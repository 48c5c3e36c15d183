"""The package's imports follow its layers (docs/architecture.md) and form no circle.

Every `import` and `from ... import` in raytrain/ and jobs/ counts, those inside functions too.
A module may import its own layer or a lower one, never a higher one. The method registry is
loaded by name (raytrain.config.methods, raytrain.methods.discover), which is no import here:
that is the one place the foundation reaches the methods, as a plug-in point.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module's layer is that of the longest prefix it starts with
LAYERS = [
    ("raytrain.log", "raytrain.tree", "raytrain.config", "raytrain.dist", "raytrain.stats"),
    ("raytrain.data",),
    ("raytrain.teachers", "raytrain.models", "raytrain.checkpoint"),
    ("raytrain.losses",),
    ("raytrain.methods",),
    ("raytrain.eval", "raytrain.export", "raytrain.report"),
    ("raytrain.train",),
    ("raytrain.tune", "raytrain.bench"),
    ("raytrain.cli",),
    ("jobs",),
]


def layer(module: str) -> int | None:
    if module == "raytrain":  # the package's own __init__: a docstring
        return 0
    found = [
        (len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes if module == p or module.startswith(p + ".")
    ]
    return max(found)[1] if found else None


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*(ROOT / "raytrain").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from raytrain import checkpoint` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if layer(m) is None] == []


def upward(module: str, imported: set[str]) -> list[str]:
    return sorted(m for m in imported if layer(m) > layer(module))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up(module):
    assert not upward(module, GRAPH[module]), f"{module} (layer {layer(module)}) imports higher layers"


def test_no_circles():
    seen, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        path.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        path.pop()

    for m in sorted(GRAPH):
        visit(m)
    assert circles == []


def test_the_checks_see_what_they_must():
    """Not vacuous: imports inside functions are read, and config importing the registry would
    be refused (it loads it by name instead)."""
    assert "raytrain.train.engines" in GRAPH["raytrain.tune.sweep"]  # imported inside resolve_space
    assert upward("raytrain.config", {"raytrain.methods"}) == ["raytrain.methods"]
    assert "raytrain.methods" not in GRAPH["raytrain.config"]
